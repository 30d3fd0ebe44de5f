"""Streaming top-k of every channel of several layers.

Each image counts once per channel, ranked by its spatial maximum in that channel's map (as in
the paper's Fig. 2, where the 9 images of a feature are distinct). The tracker keeps, for every
(layer, channel), the k best (value, image index, position) seen so far: O(layers x channels x k)
memory whatever the dataset size.

Order is total: value descending, then image index ascending, then position ascending. So the
result does not depend on batch order or sharding, and trackers fed disjoint shards merge into
exactly the tracker fed everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EMPTY_INDEX = -1  # image index of a slot not filled yet (fewer than k images seen)


@dataclass
class TopK:
    """The k best of every channel of one layer. All tensors (C, k), best first."""

    values: torch.Tensor  # float32; -inf in unfilled slots
    image_index: torch.Tensor  # int64; -1 in unfilled slots
    position: torch.Tensor  # int64 flat index y * width + x into the (height, width) map
    height: int
    width: int

    def positions_yx(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.position // self.width, self.position % self.width


def _ordered(values: torch.Tensor, index: torch.Tensor, pos: torch.Tensor, k: int, hw: int):
    """Keep the k best rows of (N, C) candidates per column, in the tracker's total order."""
    # Two stable sorts = one lexicographic sort: first by (image, position), then by value.
    key = index * hw + pos
    order = torch.argsort(key, dim=0, stable=True)
    values, index, pos = values.gather(0, order), index.gather(0, order), pos.gather(0, order)
    order = torch.argsort(values, dim=0, descending=True, stable=True)[:k]
    return values.gather(0, order), index.gather(0, order), pos.gather(0, order)


class TopKTracker:
    """Tracks the top-k activations of every channel of several layers at once.

    ``layers`` maps layer name -> (channels, height, width) of its activation map (1, 1 for fc).
    """

    def __init__(
        self, layers: dict[str, tuple[int, int, int]], k: int = 9, device: str | torch.device = "cpu"
    ) -> None:
        if not 1 <= k <= 100:
            raise ValueError("k must be in 1..100")
        self.k = k
        self.shapes = dict(layers)
        self.device = torch.device(device)
        self._state: dict[str, list[torch.Tensor]] = {}
        for name, (c, _, _) in self.shapes.items():
            self._state[name] = [
                torch.full((k, c), float("-inf"), device=self.device),
                torch.full((k, c), _EMPTY_INDEX, dtype=torch.long, device=self.device),
                torch.zeros((k, c), dtype=torch.long, device=self.device),
            ]

    @torch.no_grad()
    def update(self, activations: dict[str, torch.Tensor], image_index: torch.Tensor) -> None:
        """Feed one batch: activations (B, C, H, W) or (B, C) per tracked layer, and the (B,)
        global index of each image in the dataset's stable order."""
        image_index = torch.as_tensor(image_index, device=self.device).long().view(-1)
        for name, acts in activations.items():
            if name not in self._state:
                continue
            c, h, w = self.shapes[name]
            b = acts.shape[0]
            flat = acts.detach().reshape(b, c, -1)
            if flat.shape[2] != h * w:
                raise ValueError(f"{name}: expected maps of {h}x{w}, got {tuple(acts.shape)}")
            best, where = flat.max(dim=2)  # (B, C); argmax is the first maximum
            best = torch.nan_to_num(best.float(), nan=float("-inf")).to(self.device)
            vals, idx, pos = self._state[name]
            self._state[name] = list(
                _ordered(
                    torch.cat((vals, best)),
                    torch.cat((idx, image_index.view(b, 1).expand(b, c))),
                    torch.cat((pos, where.to(self.device))),
                    self.k,
                    h * w,
                )
            )

    def merge(self, other: TopKTracker) -> TopKTracker:
        """Fold another tracker's results (e.g. another shard's) into this one; returns self."""
        if other.k != self.k or other.shapes != self.shapes:
            raise ValueError("can only merge trackers of the same layers and k")
        for name, (_, h, w) in self.shapes.items():
            mine, theirs = self._state[name], [t.to(self.device) for t in other._state[name]]
            self._state[name] = list(
                _ordered(*(torch.cat((a, b)) for a, b in zip(mine, theirs, strict=True)), self.k, h * w)
            )
        return self

    def results(self) -> dict[str, TopK]:
        """Per layer, (C, k) tensors on the CPU, best first."""
        out = {}
        for name, (vals, idx, pos) in self._state.items():
            _, h, w = self.shapes[name]
            out[name] = TopK(vals.t().cpu(), idx.t().cpu(), pos.t().cpu(), h, w)
        return out

    def state_dict(self) -> dict:
        """Plain CPU tensors, cheap to pickle between processes (e.g. Ray actors)."""
        return {
            "k": self.k,
            "shapes": self.shapes,
            "state": {n: [t.cpu() for t in s] for n, s in self._state.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: str | torch.device = "cpu") -> TopKTracker:
        tracker = cls(state["shapes"], state["k"], device)
        tracker._state = {n: [t.to(tracker.device) for t in s] for n, s in state["state"].items()}
        return tracker
