"""Architectures by name: what a spec's ``model`` can name, and how each is built.

Every entry builds an ``nn.Module`` that honours the model contract (:mod:`zfcore.network`) and
can describe its layers without building the network (validating a spec stays cheap even for the
paper's 62M-parameter net). Today's entries are ZFNet and its variants (:data:`zfcore.zfnet.VARIANTS`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .network import LayerInfo
from .zfnet import VARIANTS, ZFNet, layer_infos


@dataclass(frozen=True)
class Architecture:
    """A buildable network: its layers at ``image_size`` and its default class count."""

    name: str
    image_size: int
    num_classes: int
    layers: tuple[LayerInfo, ...]
    _build: Callable[[int], nn.Module]

    @property
    def layer_names(self) -> list[str]:
        return [info.name for info in self.layers]

    @property
    def spatial_layers(self) -> list[str]:
        return [info.name for info in self.layers if info.spatial]

    @property
    def vector_layers(self) -> list[str]:
        return [info.name for info in self.layers if not info.spatial]

    def build(self, num_classes: int | None = None) -> nn.Module:
        """A new network (init drawn from the global RNG), classifier width ``num_classes``."""
        return self._build(num_classes or self.num_classes)


def _zfnet(name: str) -> Architecture:
    config = VARIANTS[name]
    return Architecture(
        name, config.image_size, config.num_classes, tuple(layer_infos(config)),
        lambda n: ZFNet(num_classes=n, config=config),
    )


def names() -> list[str]:
    """Every architecture name, sorted."""
    return sorted(VARIANTS)


def get(name: str) -> Architecture:
    """The architecture called ``name``; KeyError with the closest names otherwise."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown model variant {name!r}{hint}; known: {', '.join(names())}")
    return _zfnet(name)
