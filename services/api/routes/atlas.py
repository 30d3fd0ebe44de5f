"""``/api/atlases``: an atlas's layers, its channels as tiles (paged) and one channel's top-k."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query

from jobs.results.query import run_summary
from services.api.bodies import (
    AtlasOut,
    Box,
    ChannelOut,
    ErrorOut,
    FeatureOut,
    LayerOut,
    Page,
    RunSummary,
    TileOut,
)
from services.api.catalog import Catalog
from services.api.channels import (
    Selectivity,
    TileFilter,
    channel_selectivity,
    class_names,
    is_dead,
    label_name,
    select_tiles,
)
from services.api.deps import NAME_PATTERN, PageParams, catalog, image_url, page_params
from services.http.security import require_read_access
from services.http.settings import Settings

MAX_CHANNEL = 1_000_000
MAX_LABEL = 1_000_000
RunId = Path(pattern=NAME_PATTERN, description="Atlas run id.")
Layer = Path(pattern=NAME_PATTERN, description="Layer name, e.g. conv5.")
Channel = Path(ge=0, le=MAX_CHANNEL, description="Channel index.")
ERRORS = {404: {"model": ErrorOut}, 400: {"model": ErrorOut}}
TileSort = Literal["channel", "activation", "selectivity", "dead"]


def channel_base(run_id: str, layer: str, channel: int) -> str:
    return f"/api/atlases/{quote(run_id)}/layers/{quote(layer)}/channels/{channel}"


def source_url(run_id: str, layer: str, channel: int, rank: int) -> str:
    return f"{channel_base(run_id, layer, channel)}/sources/{rank}.png"


def grid_url(run_id: str, layer: str, channel: int, kind: str, dead: bool = False) -> str | None:
    """The PNG of a channel's 3x3 grid (``kind`` patch or projection); None for a dead channel."""
    return None if dead else f"{channel_base(run_id, layer, channel)}/grids/{kind}.png"


def item_url(run_id: str, layer: str, channel: int, rank: int, kind: str) -> str:
    return f"{channel_base(run_id, layer, channel)}/images/{rank}/{kind}.png"


def selectivity_fields(selectivity: Selectivity, names: list[str] | None) -> dict[str, Any]:
    """The fields of :class:`SelectivityFields` for a channel."""
    return {"top_label": selectivity.top_label, "selectivity": selectivity.share,
            "top_label_name": label_name(names, selectivity.top_label)}


def tile_filter(
    hide_dead: bool = Query(False, description="Leave out the channels that never fired."),
    min_selectivity: float | None = Query(
        None, ge=0, le=1, description="Only channels with at least this class selectivity."
    ),
    label: int | None = Query(
        None, ge=0, le=MAX_LABEL, description="Only channels whose most frequent class is this label."
    ),
) -> TileFilter:
    return TileFilter(hide_dead=hide_dead, min_selectivity=min_selectivity, label=label)


def router(settings: Settings) -> APIRouter:
    api = APIRouter(prefix="/api/atlases", tags=["atlases"], dependencies=[Depends(require_read_access)])
    page = page_params(settings)

    @api.get("/{run_id}", response_model=AtlasOut, summary="An atlas and its layers", responses=ERRORS)
    def atlas(run_id: str = RunId, cat: Catalog = Depends(catalog)) -> AtlasOut:
        reader = cat.reader(run_id)
        layers = [LayerOut(name=i.name, channels=i.channels, k=i.k, summary_url=image_url(i.summary_key))
                  for i in reader.layers()]
        dataset = (reader.manifest.get("spec") or {}).get("dataset") or {}
        return AtlasOut(summary=RunSummary(**run_summary(reader.manifest)), layers=layers,
                        class_names=class_names(reader.manifest), dataset_uri=dataset.get("uri"))

    @api.get(
        "/{run_id}/layers/{layer}/channels",
        response_model=Page[TileOut],
        summary="A layer's channels as tiles (top activation, class selectivity, 3x3 grid images), "
        "sorted, filtered and paged",
        responses=ERRORS,
    )
    def tiles(
        run_id: str = RunId,
        layer: str = Layer,
        sort: TileSort = Query(
            "channel", description="channel number; activation (strongest first); selectivity "
            "(most selective first, unknown last); dead (dead channels first)."
        ),
        keep: TileFilter = Depends(tile_filter),
        params: PageParams = Depends(page),
        cat: Catalog = Depends(catalog),
    ) -> Page[TileOut]:
        """``total`` counts the channels that pass the filters. The layer is read once (a scan of
        the columns a tile needs) and kept: each later page, sort or filter reads nothing."""
        names = class_names(cat.reader(run_id).manifest)
        chosen = select_tiles(cat.tiles(run_id, layer), sort, keep)
        items = [
            TileOut(channel=t.channel, top_activation=t.top_activation, dead=t.dead,
                    image_id=t.image_id, label=t.label, label_name=label_name(names, t.label),
                    **selectivity_fields(t.selectivity, names),
                    projection_grid_url=grid_url(run_id, layer, t.channel, "projection", t.dead),
                    patch_grid_url=grid_url(run_id, layer, t.channel, "patch", t.dead))
            for t in chosen[params.offset : params.offset + params.limit]
        ]
        return params.page(items, len(chosen))

    @api.get(
        "/{run_id}/layers/{layer}/channels/{channel}",
        response_model=ChannelOut,
        summary="One channel's top-k activations with their images and receptive boxes",
        responses=ERRORS,
    )
    def channel(
        run_id: str = RunId, layer: str = Layer, channel: int = Channel, cat: Catalog = Depends(catalog)
    ) -> ChannelOut:
        reader = cat.reader(run_id)
        names = class_names(reader.manifest)
        rows = reader.channel(layer, channel).to_pylist()
        dead = is_dead(rows[0])
        features = [
            FeatureOut(
                rank=r["rank"], activation=r["activation"], image_id=r["image_id"],
                image_index=r["image_index"], label=r["label"], label_name=label_name(names, r["label"]),
                y=r["y"], x=r["x"],
                box=Box(top=r["box_top"], left=r["box_left"], height=r["box_height"], width=r["box_width"]),
                patch_url=None if dead else item_url(run_id, layer, channel, r["rank"], "patch"),
                projection_url=None if dead else item_url(run_id, layer, channel, r["rank"], "projection"),
                source_url=source_url(run_id, layer, channel, r["rank"]),
            )
            for r in rows
        ]
        return ChannelOut(
            run_id=run_id, layer=layer, channel=channel, dead=dead, features=features,
            **selectivity_fields(channel_selectivity(rows), names),
            projection_grid_url=grid_url(run_id, layer, channel, "projection", dead),
            patch_grid_url=grid_url(run_id, layer, channel, "patch", dead),
        )

    return api
