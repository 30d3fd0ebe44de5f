"""Architectures by name: what a spec's ``model.arch`` can name, and how each is built.

- ``zfnet``, ``zfnet-small``, ``table3-*``: ZFNet and its variants (:data:`zfcore.zfnet.VARIANTS`);
  layers ``conv1``..``conv5``, ``fc6``, ``fc7``; the project's preprocessing.
- ``torchvision:<name>``: any classification model of ``torchvision.models`` (``resnet50``,
  ``vgg16``, ``densenet121``, ...), built with ``weights=None`` (users bring checkpoints); layers
  are module paths; ImageNet preprocessing (resize 256, crop 224; 342/299 for Inception v3).
- ``package.module:factory``: the user's own, a callable taking ``num_classes`` and returning an
  ``nn.Module``, importable where the job runs. Its preprocessing is ImageNet's unless the module
  describes itself with ``zfatlas_network()``.

Every architecture describes its layers without computing anything: the network is built on
PyTorch's ``meta`` device and one forward pass there gives every module's output shape. Built
for real (:meth:`Architecture.build`), the module comes with its :class:`zfcore.network.Network`
attached, so every tool sees its preprocessing.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .network import LayerInfo, Network, Preprocess, attach, discover
from .zfnet import VARIANTS, ZFNet, layer_infos, zfnet_preprocess

TORCHVISION = "torchvision:"
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# Models whose auxiliary heads only run in training (and then change what forward returns).
_NO_AUX = {"googlenet", "inception_v3"}


class ArchitectureError(ValueError):
    """The name does not describe a buildable architecture (the message says why)."""


@dataclass(frozen=True)
class Architecture:
    """A buildable network: its layers at the preprocessing size, the default ones, and its
    default class count."""

    name: str
    preprocess: Preprocess
    num_classes: int
    layers: tuple[LayerInfo, ...]
    defaults: tuple[str, ...]
    family: str  # "zfnet", "torchvision" or "user"
    _build: Callable[[int], nn.Module] = dataclasses.field(repr=False, compare=False)

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def layer_names(self) -> list[str]:
        return [info.name for info in self.layers]

    def layer(self, name: str) -> LayerInfo:
        return next(info for info in self.layers if info.name == name)

    @property
    def spatial_layers(self) -> list[str]:
        """The default layers that are maps (C, H, W)."""
        return [name for name in self.defaults if self.layer(name).spatial]

    @property
    def vector_layers(self) -> list[str]:
        """The default layers that are vectors (fully connected ones)."""
        return [name for name in self.defaults if not self.layer(name).spatial]

    def build(self, num_classes: int | None = None, preprocess: Preprocess | None = None) -> nn.Module:
        """A new network (init drawn from the global RNG) with ``num_classes`` outputs; its Network
        (``preprocess`` or the architecture's) is attached to it."""
        n = num_classes or self.num_classes
        module = self._build(n)
        own = module.zfatlas_network() if hasattr(module, "zfatlas_network") else None
        own = own or Network(module, None, self.preprocess)
        attach(own.configured(preprocess=preprocess or self.preprocess, rebuild=lambda: self._build(n)))
        return module

    def build_shapes(self, num_classes: int | None = None, preprocess: Preprocess | None = None) -> nn.Module:
        """The network on PyTorch's ``meta`` device: every shape, no memory, no init (checks and
        descriptions that need no values)."""
        return _shapes_only(lambda n: self.build(n, preprocess), num_classes or self.num_classes)

    def at(self, image_size: int) -> Architecture:
        """The same architecture described at another input size (layers' map sizes change; a size
        too small for the network raises ArchitectureError)."""
        if image_size == self.image_size:
            return self
        return _describe(self.name, dataclasses.replace(self.preprocess, image_size=image_size))


def names() -> list[str]:
    """The named architectures (ZFNet's variants and torchvision's models), sorted; plus any
    ``package.module:factory``."""
    return sorted(VARIANTS) + [TORCHVISION + n for n in _torchvision_models()]


@functools.cache
def _torchvision_models() -> tuple[str, ...]:
    import torchvision.models as tvm

    return tuple(tvm.list_models(module=tvm))


def get(name: str) -> Architecture:
    """The architecture called ``name``; ArchitectureError (a KeyError-like message with the
    closest names) otherwise."""
    return _describe(name, None)


@functools.lru_cache(maxsize=64)
def _describe(name: str, preprocess: Preprocess | None) -> Architecture:
    family, build, default_pre, num_classes = _resolve(name)
    pre = preprocess or default_pre
    if family == "zfnet":
        config = VARIANTS[name]
        try:
            infos = layer_infos(config, pre.image_size)
        except ValueError as exc:
            raise ArchitectureError(str(exc)) from None
        if any(i.height < 1 for i in infos):
            raise ArchitectureError(f"{pre.image_size}px images are too small for {name}")
        return Architecture(name, pre, num_classes, tuple(infos), tuple(i.name for i in infos), family, build)
    module = _shapes_only(build, num_classes)
    own = module.zfatlas_network() if hasattr(module, "zfatlas_network") else None
    if own is not None and preprocess is None:
        pre = own.preprocess
    try:
        found = discover(module, pre.channels, pre.image_size)
    except RuntimeError as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise ArchitectureError(f"{pre.image_size}px images do not fit {name}: {first}") from None
    if own is None:
        return Architecture(name, pre, num_classes, found.layers, found.defaults, family, build)
    # A module that names its own layers: the shapes of the modules behind them.
    by_path = {info.name: info for info in found.layers}
    infos = tuple(dataclasses.replace(by_path[own.layer_path(n)], name=n) for n in own.layer_names)
    return Architecture(name, pre, num_classes, infos, tuple(own.default_layers), family, build)


class _SkipInit(TorchFunctionMode):
    """Random init of meta tensors is skipped (there are no values to draw); PyTorch would run it
    through its reference kernels, which import the compiler stack (and with it read the current
    directory, which a Ray job's driver may no longer have)."""

    _INIT = {
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_,
        torch.Tensor.bernoulli_, torch.Tensor.random_, torch.Tensor.exponential_,
        *(getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")),
    }

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # nn.init.normal_(tensor=...) passes it by name
        if func in self._INIT and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def _shapes_only(build: Callable[[int], nn.Module], num_classes: int) -> nn.Module:
    """The network on the ``meta`` device (shapes, no memory, no init); on the CPU, with the global
    RNG left as it was, for the few whose constructors compute with real tensors (RegNet)."""
    try:
        with torch.device("meta"), _SkipInit():
            return build(num_classes)
    except (NotImplementedError, RuntimeError):
        with torch.random.fork_rng(devices=[]):
            return build(num_classes)


def _resolve(name: str) -> tuple[str, Callable[[int], nn.Module], Preprocess, int]:
    """(family, build(num_classes), default preprocessing, default class count) of a name."""
    if name in VARIANTS:
        config = VARIANTS[name]
        pre = zfnet_preprocess(config)
        return "zfnet", lambda n: ZFNet(num_classes=n, config=config), pre, config.num_classes
    if name.startswith(TORCHVISION):
        model = name[len(TORCHVISION):]
        if model not in _torchvision_models():
            close = difflib.get_close_matches(model, _torchvision_models(), n=1)
            hint = f" (did you mean {TORCHVISION + close[0]!r}?)" if close else ""
            raise ArchitectureError(f"torchvision has no classification model {model!r}{hint}")
        import torchvision.models as tvm

        extra = {"aux_logits": False, "init_weights": True} if model in _NO_AUX else {}
        side, resize = (299, 342) if model == "inception_v3" else (224, 256)
        return (
            "torchvision",
            lambda n: tvm.get_model(model, weights=None, num_classes=n, **extra),
            Preprocess(side, resize=resize),
            1000,
        )
    if _FACTORY.match(name):
        factory = _import_factory(name)
        default = inspect.signature(factory).parameters.get("num_classes")
        n = default.default if default is not None and isinstance(default.default, int) else 1000
        return "user", lambda k: _call_factory(name, factory, k), Preprocess(224, resize=256), n
    close = difflib.get_close_matches(name, names(), n=1)
    if name in _torchvision_models():
        close = [TORCHVISION + name]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ArchitectureError(
        f"unknown architecture {name!r}{hint}; use a ZFNet variant ({', '.join(sorted(VARIANTS))}), "
        f"torchvision:<model> or package.module:factory"
    )


def _import_factory(name: str) -> Callable[..., nn.Module]:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchitectureError(f"cannot import {module_name!r} for {name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ArchitectureError(f"{module_name} has no callable {attr!r}")
    return factory


def _call_factory(name: str, factory: Callable[..., nn.Module], num_classes: int) -> nn.Module:
    module = factory(num_classes=num_classes)
    if not isinstance(module, nn.Module):
        raise ArchitectureError(f"{name} returned {type(module).__name__}, not an nn.Module")
    return module
