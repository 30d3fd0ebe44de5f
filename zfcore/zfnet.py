"""ZFNet (Zeiler & Fergus 2014, Fig. 3) built from a config.

The architecture is data: a :class:`ZFNetConfig` lists the conv stages and fc widths, and
:class:`ZFNet` turns any config into a network. The paper's network, the small CPU configs and the
Table 3 variants are all entries of :data:`VARIANTS`, not copies of the class.

Every ReLU, pool and norm is its own named module (``relu3``, ``pool5``, ...), and the activation
of a layer named ``convN``/``fcN`` is the output of its ReLU. :meth:`ZFNet.zfatlas_network` says so
in the terms of the model contract (:mod:`zfcore.network`); no other file knows these names.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .network import IMAGENET_MEAN, IMAGENET_STD, LayerInfo, Network, Preprocess


@dataclass(frozen=True)
class ConvStage:
    """One conv layer and what follows it: conv -> ReLU [-> max pool] [-> contrast norm]."""

    name: str  # "conv1".."conv5"; kept when other stages are removed, so names stay stable
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    pool: bool = False
    # Paper: 3x3 stride-2 pools. Padding 1 on pool1/pool2 gives the paper's 110->55->26->13 maps
    # (the paper does not state padding; see shared/paper-facts.md).
    pool_kernel: int = 3
    pool_stride: int = 2
    pool_padding: int = 0
    norm: bool = False


@dataclass(frozen=True)
class LRNConfig:
    """Contrast normalization across feature maps. The paper cites Krizhevsky et al. without
    numbers; these are AlexNet's (5 maps, alpha 1e-4, beta 0.75, k 2)."""

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0


def _paper_conv(widths: tuple[int, int, int] = (384, 384, 256)) -> tuple[ConvStage, ...]:
    c3, c4, c5 = widths
    return (
        ConvStage("conv1", 96, 7, stride=2, padding=1, pool=True, pool_padding=1, norm=True),
        ConvStage("conv2", 256, 5, stride=2, padding=0, pool=True, pool_padding=1, norm=True),
        ConvStage("conv3", c3, 3, padding=1),
        ConvStage("conv4", c4, 3, padding=1),
        ConvStage("conv5", c5, 3, padding=1, pool=True),
    )


@dataclass(frozen=True)
class ZFNetConfig:
    conv: tuple[ConvStage, ...] = field(default_factory=_paper_conv)
    fc: tuple[int, ...] = (4096, 4096)  # widths of fc6, fc7; fewer entries remove layers
    num_classes: int = 1000
    image_size: int = 224  # square input the config is meant for; fixes the fc6 input size
    in_channels: int = 3
    dropout: float = 0.5
    lrn: LRNConfig = field(default_factory=LRNConfig)

    @property
    def conv_names(self) -> list[str]:
        return [s.name for s in self.conv]

    @property
    def fc_names(self) -> list[str]:
        # fc layers are numbered after the paper's: fc6, fc7 (fc8 is the classifier).
        return [f"fc{6 + i}" for i in range(len(self.fc))]

    @property
    def layer_names(self) -> list[str]:
        """Layers whose (post-ReLU) activations can be scanned and projected."""
        return self.conv_names + self.fc_names

    def replace(self, **changes: object) -> ZFNetConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ZFNetConfig:
        data = dict(data)
        conv = tuple(ConvStage(**s) for s in data.pop("conv"))
        lrn = LRNConfig(**data.pop("lrn", {}))
        fc = tuple(data.pop("fc", (4096, 4096)))
        return cls(conv=conv, lrn=lrn, fc=fc, **data)


def _small_conv() -> tuple[ConvStage, ...]:
    # Same kernels/strides as the paper with ~1/4 the filters: 64px input gives maps
    # 30 -> 15 -> 6 -> 3 -> 3 -> 3 -> 1, and the whole net trains in minutes on 2 CPU cores.
    return (
        ConvStage("conv1", 32, 7, stride=2, padding=1, pool=True, pool_padding=1, norm=True),
        ConvStage("conv2", 64, 5, stride=2, padding=0, pool=True, pool_padding=1, norm=True),
        ConvStage("conv3", 96, 3, padding=1),
        ConvStage("conv4", 96, 3, padding=1),
        ConvStage("conv5", 64, 3, padding=1, pool=True),
    )


def _drop(names: Iterable[str], stages: tuple[ConvStage, ...]) -> tuple[ConvStage, ...]:
    gone = set(names)
    return tuple(s for s in stages if s.name not in gone)


PAPER = ZFNetConfig()

#: Named configurations. "zfnet" is Fig. 3; the "table3-*" entries are the paper's ablations.
VARIANTS: dict[str, ZFNetConfig] = {
    "zfnet": PAPER,
    "zfnet-small": ZFNetConfig(conv=_small_conv(), fc=(256, 256), num_classes=10, image_size=64),
    "table3-fc2048": PAPER.replace(fc=(2048, 2048)),
    "table3-fc8192": PAPER.replace(fc=(8192, 8192)),
    "table3-wide": PAPER.replace(conv=_paper_conv((512, 1024, 512))),
    "table3-wide-fc8192": PAPER.replace(conv=_paper_conv((512, 1024, 512)), fc=(8192, 8192)),
    "table3-no-conv3-4": PAPER.replace(conv=_drop(["conv3", "conv4"], _paper_conv())),
    "table3-no-fc7": PAPER.replace(fc=(4096,)),
    "table3-no-fc6-7": PAPER.replace(fc=()),
    "table3-no-conv3-4-fc6-7": PAPER.replace(conv=_drop(["conv3", "conv4"], _paper_conv()), fc=()),
}


def feature_map_sizes(config: ZFNetConfig, image_size: int | None = None) -> dict[str, int]:
    """Side of every spatial map (conv, pool) for a square input, computed from the config."""
    side = image_size or config.image_size
    sizes: dict[str, int] = {"input": side}
    for i, s in enumerate(config.conv, start=1):
        side = (side + 2 * s.padding - s.kernel) // s.stride + 1
        sizes[s.name] = side
        if s.pool:
            side = (side + 2 * s.pool_padding - s.pool_kernel) // s.pool_stride + 1
            sizes[f"pool{_index(s.name, i)}"] = side
    return sizes


def zfnet_preprocess(config: ZFNetConfig) -> Preprocess:
    """The project's preprocessing for a config: images resized (short side) and center-cropped to
    its image size, ImageNet's per-channel statistics (the procedural set is on the same scale)."""
    channels = config.in_channels
    return Preprocess(
        image_size=config.image_size,
        mean=IMAGENET_MEAN if channels == 3 else (0.5,) * channels,
        std=IMAGENET_STD if channels == 3 else (0.25,) * channels,
    )


def layer_infos(config: ZFNetConfig, image_size: int | None = None) -> list[LayerInfo]:
    """The scannable layers of a config, from the config alone (no network is built)."""
    sides = feature_map_sizes(config, image_size)
    convs = [LayerInfo(s.name, s.out_channels, sides[s.name], sides[s.name], True) for s in config.conv]
    last = config.conv[-1].name
    if image_size is not None and sides[last] != feature_map_sizes(config)[last]:
        # fc6 is sized for the config's own input: at another size only the conv layers run.
        return convs
    fcs = [LayerInfo(n, width, 1, 1, False) for n, width in zip(config.fc_names, config.fc, strict=True)]
    return convs + fcs


def _index(name: str, fallback: int) -> int:
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else fallback


class ZFNet(nn.Module):
    """ZFNet from a :class:`ZFNetConfig` (default: the paper's Fig. 3 network).

    ``features`` holds conv1..conv5 with their ReLUs, pools and norms; ``classifier`` holds
    fc6/fc7 (ReLU, dropout) and ``fc8``, the C-way classifier.
    """

    def __init__(self, num_classes: int | None = None, config: ZFNetConfig | None = None) -> None:
        super().__init__()
        config = config or PAPER
        if num_classes is not None:
            config = config.replace(num_classes=num_classes)
        self.config = config

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = config.in_channels
        for i, s in enumerate(config.conv, start=1):
            n = _index(s.name, i)
            layers[s.name] = nn.Conv2d(in_ch, s.out_channels, s.kernel, s.stride, s.padding)
            layers[f"relu{n}"] = nn.ReLU()
            if s.pool:
                layers[f"pool{n}"] = nn.MaxPool2d(s.pool_kernel, s.pool_stride, s.pool_padding)
            if s.norm:
                lrn = config.lrn
                layers[f"norm{n}"] = nn.LocalResponseNorm(lrn.size, lrn.alpha, lrn.beta, lrn.k)
            in_ch = s.out_channels
        self.features = nn.Sequential(layers)

        side = feature_map_sizes(config)
        last = list(side.values())[-1]
        if last < 1:
            raise ValueError(f"image_size {config.image_size} is too small for this config")
        head: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = in_ch * last * last  # 256 * 6 * 6 = 9216 for the paper's network
        for n, out in zip(range(6, 6 + len(config.fc)), config.fc, strict=True):
            head[f"fc{n}"] = nn.Linear(width, out)
            head[f"relu{n}"] = nn.ReLU()
            head[f"drop{n}"] = nn.Dropout(config.dropout)
            width = out
        head["fc8"] = nn.Linear(width, config.num_classes)
        self.classifier = nn.Sequential(head)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The paper's N(0, 0.01^2) init is reported unstable by reimplementations, and PyTorch's
        # default shrinks the signal ~2x per layer (the small configs then never leave chance).
        # He init keeps activations O(1) through all layers; biases start at 0 as in the paper.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.fc8.weight, std=0.01)

    @property
    def layer_names(self) -> list[str]:
        return self.config.layer_names

    def activation_module(self, layer: str) -> nn.ReLU:
        """The ReLU whose output is ``layer``'s activation (hook it to read that layer)."""
        if layer not in self.layer_names:
            raise KeyError(f"unknown layer {layer!r}; this model has {self.layer_names}")
        n = _index(layer, 0)
        owner = self.features if layer.startswith("conv") else self.classifier
        return owner.get_submodule(f"relu{n}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        return self.classifier(self.features(x))

    def forward_features(self, x: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        """Activations of ``layers`` in one pass, stopping after the deepest one requested.

        Conv activations are (B, C, H', W'); fc activations are (B, F).
        """
        return self.zfatlas_network().features(x, layers)

    def zfatlas_network(self) -> Network:
        """This network in the terms of the model contract: layers conv1..conv5, fc6, fc7 (the
        outputs of their ReLUs), the project's preprocessing, and the plain chain of modules that
        ``forward`` runs (the deconvnet's fast path walks it)."""
        config = self.config
        paths = {
            layer: ("features." if i < len(config.conv) else "classifier.") + f"relu{_index(layer, i + 1)}"
            for i, layer in enumerate(config.layer_names)
        }
        return Network(
            self,
            paths,
            zfnet_preprocess(config),
            chain=lambda: [*self.features.children(), *self.classifier.children()],
            convs={name: f"features.{name}" for name in config.conv_names},
            rebuild=lambda: ZFNet(config=config),
        )


def build(variant: str = "zfnet", num_classes: int | None = None) -> ZFNet:
    """A model from a :data:`VARIANTS` name."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown model variant {variant!r}; known: {sorted(VARIANTS)}")
    return ZFNet(num_classes=num_classes, config=VARIANTS[variant])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the paper's results for this network, shown beside a run's own numbers ------------------

#: Table 7 (accuracy %, Caltech-101 at 30 / Caltech-256 at 60 images per class), by (classifier,
#: layer). Shown beside the trained network's rows; the datasets differ, so compare directions.
PAPER_TABLE7: dict[tuple[str, str], tuple[float, float]] = {
    ("svm", "conv1"): (44.8, 24.6),
    ("svm", "conv2"): (66.2, 39.6),
    ("svm", "conv3"): (72.3, 46.0),
    ("svm", "conv4"): (76.6, 51.3),
    ("svm", "conv5"): (86.2, 65.6),
    ("svm", "fc7"): (85.5, 71.7),
    ("softmax", "conv5"): (82.9, 65.7),
    ("softmax", "fc7"): (85.4, 72.6),
}

#: Table 1 (Delta, layer 5 / layer 7: mean, std) for the paper's dog-face parts.
PAPER_TABLE1: dict[str, dict[str, list[float]]] = {
    "right eye": {"layer5": [0.067, 0.007], "layer7": [0.069, 0.015]},
    "left eye": {"layer5": [0.069, 0.007], "layer7": [0.068, 0.013]},
    "nose": {"layer5": [0.079, 0.017], "layer7": [0.069, 0.011]},
    "random": {"layer5": [0.107, 0.017], "layer7": [0.073, 0.014]},
}
