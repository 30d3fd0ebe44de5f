"""What the API says about a channel beyond its rows: the class names of its labels, its class
selectivity, and a whole layer of channel tiles to sort and filter.

Class selectivity is the share of a channel's top-k images that belong to its most frequent
class: 1.0 for a channel that fires only on one class, about 1/classes for one that does not
care. Labels of -1 (unknown: the job did not record them) count neither way; a channel with no
known label, or a dead one, has none.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from jobs.results.query import AtlasReader

UNKNOWN_LABEL = -1


@dataclass(frozen=True)
class Selectivity:
    top_label: int | None
    share: float | None
    known: int  # rows whose label is known (the share's denominator)


NO_SELECTIVITY = Selectivity(None, None, 0)


def class_selectivity(labels: Iterable[int]) -> Selectivity:
    """The most frequent known label of ``labels`` and its share of the known ones (ties: the
    smaller label, so the answer does not depend on row order)."""
    counts = Counter(label for label in labels if label != UNKNOWN_LABEL)
    if not counts:
        return NO_SELECTIVITY
    known = sum(counts.values())
    top, count = min(counts.items(), key=lambda item: (-item[1], item[0]))
    return Selectivity(top, count / known, known)


def class_names(manifest: dict[str, Any]) -> list[str] | None:
    """The atlas's class names (label n is names[n]); None for atlases written before they were
    recorded."""
    names = manifest.get("class_names")
    return [str(n) for n in names] if isinstance(names, list) else None


def label_name(names: Sequence[str] | None, label: int | None) -> str | None:
    """The class name of ``label``; None when unknown (-1, no names, or out of their range)."""
    if names is None or label is None or not 0 <= label < len(names):
        return None
    return names[label]


@dataclass(frozen=True)
class LayerTile:
    """One channel of a layer as a tile: its top-1 row and its class selectivity."""

    channel: int
    top_activation: float
    dead: bool
    image_id: str
    label: int
    selectivity: Selectivity


def is_dead(row: dict[str, Any]) -> bool:
    """A channel that never fired (format 1 atlases have no ``dead`` column: its activation says)."""
    return bool(row["dead"]) if "dead" in row else not row["activation"] > 0


def layer_tiles(reader: AtlasReader, layer: str) -> list[LayerTile]:
    """Every channel of ``layer`` as a tile, by channel number. One pushed-down scan of the few
    columns a tile needs over the layer's rows: sorting or filtering by selectivity needs every
    channel's labels, not just the page's."""
    columns = ["channel", "rank", "activation", "image_id", "label"]
    if "dead" in reader.features.schema.names:
        columns.append("dead")
    table = reader.layer_rows([layer], columns)
    by_channel: dict[int, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        by_channel.setdefault(row["channel"], []).append(row)
    return [_tile(rows) for _, rows in sorted(by_channel.items())]


def channel_selectivity(rows: Sequence[dict[str, Any]]) -> Selectivity:
    """The class selectivity of one channel's rows (none for a dead channel: its one row's image
    is no image it prefers)."""
    top = min(rows, key=lambda r: r["rank"])
    return NO_SELECTIVITY if is_dead(top) else class_selectivity(r["label"] for r in rows)


def _tile(rows: list[dict[str, Any]]) -> LayerTile:
    top = min(rows, key=lambda r: r["rank"])
    return LayerTile(channel=top["channel"], top_activation=top["activation"], dead=is_dead(top),
                     image_id=top["image_id"], label=top["label"], selectivity=channel_selectivity(rows))


def _by_selectivity(t: LayerTile) -> tuple:
    share = t.selectivity.share
    return (share is None, -(share or 0.0), -t.top_activation, t.channel)


# The tile orders the API offers, as keys for sorted(). Ties fall back to the channel number, so
# the same request always pages through the same order.
SORTS: dict[str, Callable[[LayerTile], tuple]] = {
    "channel": lambda t: (t.channel,),
    "activation": lambda t: (-t.top_activation, t.channel),
    "selectivity": _by_selectivity,  # unknown (dead, unlabelled) last
    "dead": lambda t: (not t.dead, t.channel),
}


@dataclass(frozen=True)
class TileFilter:
    hide_dead: bool = False
    min_selectivity: float | None = None  # channels without a selectivity never pass it
    label: int | None = None  # only channels whose most frequent class is this

    def passes(self, t: LayerTile) -> bool:
        share = t.selectivity.share
        if self.hide_dead and t.dead:
            return False
        if self.min_selectivity is not None and (share is None or share < self.min_selectivity):
            return False
        return self.label is None or t.selectivity.top_label == self.label


def select_tiles(tiles: Sequence[LayerTile], sort: str = "channel",
                 keep: TileFilter = TileFilter()) -> list[LayerTile]:
    """The tiles that pass ``keep``, in the order ``sort`` names (a key of :data:`SORTS`)."""
    kept = [t for t in tiles if keep.passes(t)]
    return kept if sort == "channel" else sorted(kept, key=SORTS[sort])
