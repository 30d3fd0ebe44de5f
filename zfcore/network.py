"""The model contract: what zfatlas needs of every network it scans, projects or analyses.

A :class:`Network` wraps an ``nn.Module`` and names its *layers*: the activations zfatlas can scan,
each the output of one module of the network. Through it every tool asks the same questions of any
network, and none reaches inside a particular one:

- which layers there are, in forward order, with their channels and map sizes (:meth:`layers`);
- the activations of chosen layers in one forward pass, and the logits when asked
  (:meth:`features`, :meth:`features_and_logits`);
- how an image is prepared for it (:attr:`preprocess`: size, resize, mean, std);
- what the deconvnet and the receptive fields need: the module of a layer, and the network as a
  plain chain of modules when it is one (:meth:`chain`), for the deconvnet's fast path;
- the convolutions whose filters make each layer (:meth:`layer_convs`, for filter statistics),
  and a freshly initialized copy (:meth:`initialized`, the probes' random baseline).

A module that knows its own layers says so with a ``zfatlas_network()`` method returning its
Network (ZFNet names its layers ``conv1``..``fc7`` after the paper); :func:`as_network` asks for it,
so every function of zfcore takes a plain ``nn.Module`` or a Network alike.

Activations are read with forward hooks on the layer modules, so the module's own ``forward`` runs
unchanged; a pass that only needs some layers stops right after the deepest of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# The procedural dataset's and ImageNet's per-channel statistics (inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network's input: resize the short side to ``resize`` (default
    ``image_size``), center-crop ``image_size`` x ``image_size``, scale to [0, 1], then subtract
    ``mean`` and divide by ``std`` per channel."""

    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | None = None

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def resize_to(self) -> int:
        return self.resize or self.image_size


@dataclass(frozen=True)
class LayerInfo:
    """One scannable layer at a given input size: (channels, height, width) of its activation;
    height = width = 1 and ``spatial`` False for vector (fully connected) layers."""

    name: str
    channels: int
    height: int
    width: int
    spatial: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


class _Stop(Exception):
    """Raised by a capture hook once every requested layer is seen: the rest of the pass is skipped."""


class Network:
    """An ``nn.Module`` with named layers (see the module docstring).

    ``layers`` maps each layer's name to the path (as ``module.named_modules()`` names it) of the
    module whose output is that layer's activation, in forward order. ``chain``, when given,
    returns the network's modules in execution order if its forward pass is exactly that chain.
    ``convs`` maps a layer to the path of the convolution whose filters produce it. ``rebuild``
    builds a fresh module of the same architecture (its init drawn from the global RNG).
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Mapping[str, str],
        preprocess: Preprocess,
        *,
        chain: Callable[[], list[nn.Module]] | None = None,
        convs: Mapping[str, str] | None = None,
        rebuild: Callable[[], nn.Module] | None = None,
    ) -> None:
        self.module = module
        self.preprocess = preprocess
        self._paths = dict(layers)
        self._chain = chain
        self._convs = dict(convs or {})
        self._rebuild = rebuild
        self._shapes: dict[int, dict[str, LayerInfo]] = {}
        # Layers whose activation a later in-place op overwrites (found on first use): captured
        # as copies from then on (see _capture).
        self._copy: set[str] = set()

    def __repr__(self) -> str:
        return f"Network({type(self.module).__name__}, layers={self.layer_names})"

    # --- layers ---

    @property
    def layer_names(self) -> list[str]:
        """Scannable layers, in forward order."""
        return list(self._paths)

    def layer_path(self, layer: str) -> str:
        """The module path whose output is ``layer``'s activation."""
        self.check_layers([layer])
        return self._paths[layer]

    def layer_module(self, layer: str) -> nn.Module:
        """The module whose output is ``layer``'s activation (hook it to read that layer)."""
        return self.module.get_submodule(self.layer_path(layer))

    def check_layers(self, layers: Iterable[str]) -> None:
        unknown = [name for name in layers if name not in self._paths]
        if unknown:
            raise KeyError(f"unknown layers {sorted(unknown)}; this model has {self.layer_names}")

    def layers(self, image_size: int | None = None) -> dict[str, LayerInfo]:
        """Every layer's :class:`LayerInfo` at a square input of ``image_size`` (default: the
        preprocess size), measured by one forward pass of a zero image (cached per size)."""
        size = image_size or self.preprocess.image_size
        if size not in self._shapes:
            param = next(self.module.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            probe = torch.zeros(1, self.preprocess.channels, size, size, device=device)
            with torch.no_grad(), evaluating(self.module):
                acts = self.features(probe, self.layer_names)
            self._shapes[size] = {
                name: LayerInfo(name, a.shape[1], *(a.shape[2:4] if a.ndim == 4 else (1, 1)), a.ndim == 4)
                for name, a in acts.items()
            }
        return self._shapes[size]

    def spatial_layers(self) -> list[str]:
        """Layers with (C, H, W) maps, in forward order (conv layers, as opposed to vectors)."""
        return [name for name, info in self.layers().items() if info.spatial]

    def vector_layers(self) -> list[str]:
        """Layers that are one vector per image (fully connected ones), in forward order."""
        return [name for name, info in self.layers().items() if not info.spatial]

    def layer_convs(self) -> dict[str, nn.Conv2d]:
        """The convolution whose filters produce each conv layer (filter statistics, training)."""
        return {layer: self.module.get_submodule(path) for layer, path in self._convs.items()}

    def chain(self) -> list[nn.Module] | None:
        """The modules the forward pass runs, in order, when it is exactly that chain; else None."""
        return self._chain() if self._chain else None

    def initialized(self, seed: int) -> nn.Module:
        """A fresh module of this architecture with its init drawn from ``seed`` (the global RNG is
        left untouched), in eval mode."""
        if self._rebuild is None:
            raise TypeError(f"{type(self.module).__name__} cannot be rebuilt: give its Network a rebuild")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = self._rebuild()
        return fresh.eval()

    # --- forward passes ---

    def features(self, x: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        """Activations of ``layers`` in one pass, stopping after the deepest one requested.

        x: (B, C, H, W). Spatial activations are (B, C', H', W'), vector ones (B, F).
        """
        acts, _ = self._run(x, list(layers), logits=False)
        return acts

    def features_and_logits(
        self, x: torch.Tensor, layers: Iterable[str]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One full forward pass: (activations by layer name, logits (B, num_classes))."""
        acts, logits = self._run(x, list(layers), logits=True)
        assert logits is not None
        return acts, logits

    def _run(
        self, x: torch.Tensor, layers: list[str], *, logits: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        self.check_layers(layers)
        wanted = set(layers)
        for _attempt in range(2):
            out: dict[str, torch.Tensor] = {}
            versions: dict[str, int] = {}
            handles = [
                self.layer_module(name).register_forward_hook(
                    self._capture(name, wanted, out, versions, logits)
                )
                for name in wanted
            ]
            result = None
            try:
                result = self.module(x)
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
            # An in-place op after a hook (``ReLU(inplace=True)`` after a conv, ``out += identity``)
            # changes the captured tensor; its version counter says so. Capture copies of those
            # layers from now on and run again, once.
            changed = {n for n, t in out.items() if t._version != versions[n]}
            if not changed:
                return out, result
            self._copy |= changed
        raise RuntimeError(f"activations of {sorted(changed)} keep changing after they are computed")

    def _capture(
        self,
        name: str,
        wanted: set[str],
        out: dict[str, torch.Tensor],
        versions: dict[str, int],
        logits: bool,
    ) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if name in out:
                return  # a module called twice: its first call is the layer (see layers())
            value = output.clone() if name in self._copy else output
            out[name] = value
            versions[name] = value._version
            if not logits and len(out) == len(wanted):
                raise _Stop

        return hook


_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Network] = weakref.WeakKeyDictionary()


def as_network(model: nn.Module | Network) -> Network:
    """The :class:`Network` of ``model``: itself if it is one, else the one its
    ``zfatlas_network()`` method returns (kept for the module's lifetime)."""
    if isinstance(model, Network):
        return model
    network = _ATTACHED.get(model)
    if network is None:
        describe = getattr(model, "zfatlas_network", None)
        if describe is None:
            raise TypeError(
                f"{type(model).__name__} does not describe its layers (no zfatlas_network() method)"
            )
        network = describe()
        _ATTACHED[model] = network
    return network


def output_layer(module: nn.Module) -> str:
    """Path of the module that makes the class scores: the last ``nn.Linear`` registered (the
    classifier of every torchvision model, ZFNet's fc8)."""
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no nn.Linear classifier")
    return linears[-1]


def module_of(model: nn.Module | Network) -> nn.Module:
    """The ``nn.Module`` behind ``model``."""
    return model.module if isinstance(model, Network) else model


@contextmanager
def evaluating(model: nn.Module | Network) -> Any:
    """Put the module in eval mode (dropout off, BatchNorm on its running statistics) for the block
    and restore its mode afterwards, so an analysis never leaves a caller's training model switched."""
    module = module_of(model)
    was_training = module.training
    module.eval()
    try:
        yield model
    finally:
        module.train(was_training)


def flat(activation: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, D): a layer's activation as one feature vector per image (the paper's x^l)."""
    return activation.reshape(activation.shape[0], -1)

