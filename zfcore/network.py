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

import copy
import difflib
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    module whose output is that layer's activation, in forward order; None (any module): every
    module that runs once per forward pass and returns a map (B, C, H, W) or a vector (B, F) is a
    layer, named by its path (:func:`discover`). ``defaults`` are the layers jobs use when a spec
    names none (None: the last layer at each resolution, and the last vector before the
    classifier). ``chain``, when given, returns the network's modules in execution order if its
    forward pass is exactly that chain. ``convs`` maps a layer to the path of the convolution whose
    filters produce it (None: every convolution that is a layer). ``rebuild`` builds a fresh module
    of the same architecture (its init drawn from the global RNG).
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Mapping[str, str] | None,
        preprocess: Preprocess,
        *,
        defaults: Sequence[str] | None = None,
        chain: Callable[[], list[nn.Module]] | None = None,
        convs: Mapping[str, str] | None = None,
        rebuild: Callable[[], nn.Module] | None = None,
    ) -> None:
        self.module = module
        self.preprocess = preprocess
        self._paths = dict(layers) if layers is not None else None
        self._defaults = list(defaults) if defaults is not None else None
        self._chain = chain
        self._convs = dict(convs) if convs is not None else None
        self._rebuild = rebuild
        self._shapes: dict[int, dict[str, LayerInfo]] = {}
        self._found: Discovery | None = None
        # Layers whose activation a later in-place op overwrites (found on first use): captured
        # as copies from then on (see _capture).
        self._copy: set[str] = set()

    def __repr__(self) -> str:
        return f"Network({type(self.module).__name__}, {len(self.layer_names)} layers)"

    def configured(
        self,
        *,
        preprocess: Preprocess | None = None,
        defaults: Sequence[str] | None = None,
        rebuild: Callable[[], nn.Module] | None = None,
    ) -> Network:
        """The same network (module, layers, chain, convs) with other preprocessing, default layers
        or rebuild."""
        return Network(
            self.module,
            self._paths,
            preprocess or self.preprocess,
            defaults=defaults if defaults is not None else self._defaults,
            chain=self._chain,
            convs=self._convs,
            rebuild=rebuild or self._rebuild,
        )

    # --- layers ---

    def _discovered(self) -> Discovery:
        if self._found is None:
            self._found = discover(self.module, self.preprocess.channels, self.preprocess.image_size)
        return self._found

    @property
    def layer_names(self) -> list[str]:
        """Scannable layers, in forward order."""
        if self._paths is not None:
            return list(self._paths)
        return [info.name for info in self._discovered().layers]

    @property
    def default_layers(self) -> list[str]:
        """The layers jobs use when a spec names none, in forward order."""
        if self._defaults is not None:
            return list(self._defaults)
        if self._paths is not None:
            return list(self._paths)
        return list(self._discovered().defaults)

    def layer_path(self, layer: str) -> str:
        """The module path whose output is ``layer``'s activation."""
        if self._paths is None:
            self._check_path(layer)
            return layer
        self.check_layers([layer])
        return self._paths[layer]

    def layer_module(self, layer: str) -> nn.Module:
        """The module whose output is ``layer``'s activation (hook it to read that layer)."""
        return self.module.get_submodule(self.layer_path(layer))

    def _check_path(self, layer: str) -> None:
        if isinstance(layer, str) and layer:
            try:
                self.module.get_submodule(layer)
                return
            except AttributeError:
                pass
        close = difflib.get_close_matches(str(layer), self.layer_names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"{type(self.module).__name__} has no module {layer!r}{hint}")

    def check_layers(self, layers: Iterable[str]) -> None:
        """KeyError naming the first layer this network does not have (with the closest name)."""
        if self._paths is None:
            for layer in layers:
                self._check_path(layer)
            return
        unknown = [name for name in layers if name not in self._paths]
        if unknown:
            raise KeyError(f"unknown layers {sorted(unknown)}; this model has {self.layer_names}")

    def layers(self, image_size: int | None = None) -> dict[str, LayerInfo]:
        """Every layer's :class:`LayerInfo` at a square input of ``image_size`` (default: the
        preprocess size), measured by one forward pass of a zero image (cached per size)."""
        size = image_size or self.preprocess.image_size
        if size not in self._shapes:
            probe = zeros_like_input(self.module, self.preprocess.channels, size)
            with torch.no_grad(), evaluating(self.module):
                try:
                    acts = self.features(probe, self.layer_names)
                except RuntimeError:
                    # Fully connected layers sized for another input (zfnet-small's fc6 at 224 px)
                    # do not run, but the maps before them do: the layers up to the first that fails.
                    acts = {}
                    for name in self.layer_names:
                        try:
                            acts.update(self.features(probe, [name]))
                        except RuntimeError:
                            break
            self._shapes[size] = {name: _info(name, a) for name, a in acts.items()}
        return self._shapes[size]

    def spatial_layers(self) -> list[str]:
        """The default layers that are (C, H, W) maps, in forward order (conv layers)."""
        info = self.layers()
        return [name for name in self.default_layers if info[name].spatial]

    def vector_layers(self) -> list[str]:
        """The default layers that are one vector per image (fully connected ones), in order."""
        info = self.layers()
        return [name for name in self.default_layers if not info[name].spatial]

    def layer_convs(self) -> dict[str, nn.Conv2d]:
        """The convolution whose filters produce each conv layer (filter statistics, training)."""
        if self._convs is None:
            names = set(self.layer_names)
            convs = self.module.named_modules()
            return {path: m for path, m in convs if isinstance(m, nn.Conv2d) and path in names}
        return {layer: self.module.get_submodule(path) for layer, path in self._convs.items()}

    def chain(self) -> list[nn.Module] | None:
        """The modules the forward pass runs, in order, when it is exactly that chain; else None."""
        return self._chain() if self._chain else None

    def initialized(self, seed: int) -> nn.Module:
        """A fresh module of this architecture with its init drawn from ``seed`` (the global RNG is
        left untouched), in eval mode. Without a ``rebuild``: a copy whose every submodule's
        ``reset_parameters()`` is called."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self._rebuild is not None:
                fresh = self._rebuild()
            else:
                fresh = copy.deepcopy(self.module)
                for m in fresh.modules():
                    if callable(getattr(m, "reset_parameters", None)):
                        m.reset_parameters()
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


def _info(name: str, a: torch.Tensor) -> LayerInfo:
    return LayerInfo(name, a.shape[1], *(a.shape[2:4] if a.ndim == 4 else (1, 1)), a.ndim == 4)


@dataclass(frozen=True)
class Discovery:
    """A module's layers (every module run once per pass that returns a map or a vector, the
    classifier excluded), in forward order, and the default ones."""

    layers: tuple[LayerInfo, ...]
    defaults: tuple[str, ...]


def discover(module: nn.Module, channels: int, image_size: int) -> Discovery:
    """The layers of any module, from one forward pass of a zero image (on the module's device;
    a module on the ``meta`` device costs no compute). See :class:`Discovery`.

    Defaults: per run of layers at one map size, the last one among the shallowest module paths
    (so ``layer3``, not ``layer3.5.relu``), leaving out 1x1 maps; then the last vector (or 1x1
    map) before the classifier, the input of the paper's linear probes.
    """
    calls: dict[str, int] = {}
    outputs: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def record(m: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
                if isinstance(output, torch.Tensor):
                    outputs[name] = output

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in module.named_modules() if name]
    try:
        with torch.no_grad(), evaluating(module):
            result = module(zeros_like_input(module, channels, image_size))
    finally:
        for h in handles:
            h.remove()
    once = [n for n in order if calls[n] == 1 and n in outputs and outputs[n] is not result]
    layers = [_info(name, outputs[name]) for name in once if outputs[name].ndim in (2, 4)]
    # The classifier and what wraps it (a container, a final pool of class maps) are the output,
    # not a layer: drop the trailing layers that are as wide as the output.
    width = result.numel() if isinstance(result, torch.Tensor) else -1
    while layers and layers[-1].channels * layers[-1].height * layers[-1].width == width:
        layers.pop()
    return Discovery(tuple(layers), tuple(_default_layers(layers)))


def _default_layers(layers: list[LayerInfo]) -> list[str]:
    """The stages of a network: its top-level layers (a lone container, like VGG's ``features``,
    opened up into its children), the last one at each map size; then its last vector (or 1x1
    map) before the classifier."""
    by_name = {info.name: info for info in layers}

    def children(prefix: str) -> list[str]:
        depth = prefix.count(".") + 1 if prefix else 0
        start = f"{prefix}." if prefix else ""
        return [n for n in by_name if n.startswith(start) and n.count(".") == depth]

    def is_map(name: str) -> bool:
        info = by_name[name]
        return info.spatial and info.height * info.width > 1

    level = children("")
    for _ in range(3):  # open up containers until the level shows the network's resolutions
        if len({(by_name[n].height, by_name[n].width) for n in level if is_map(n)}) >= 3:
            break
        inside = {n: children(n) for n in level}
        widest = max(level, key=lambda n: len(inside[n]), default=None)
        if widest is None or not inside[widest]:
            break
        at = level.index(widest)
        level = level[:at] + inside[widest] + level[at + 1:]
    stages: list[str] = []
    for name in level:
        if not is_map(name):
            continue
        size = (by_name[name].height, by_name[name].width)
        if stages and (by_name[stages[-1]].height, by_name[stages[-1]].width) == size:
            stages[-1] = name
        else:
            stages.append(name)
    vectors = [info for info in layers if not is_map(info.name)]
    if vectors:
        depth = min(info.name.count(".") for info in vectors)
        stages.append([info.name for info in vectors if info.name.count(".") == depth][-1])
    return stages


_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Network] = weakref.WeakKeyDictionary()


def as_network(model: nn.Module | Network) -> Network:
    """The :class:`Network` of ``model``: itself if it is one; else the one attached to it
    (:func:`attach`), or that its ``zfatlas_network()`` method returns; else one whose layers are
    its module paths, with ImageNet preprocessing at 224 px. Kept for the module's lifetime."""
    if isinstance(model, Network):
        return model
    network = _ATTACHED.get(model)
    if network is None:
        describe = getattr(model, "zfatlas_network", None)
        network = describe() if describe is not None else Network(model, None, Preprocess(224, resize=256))
        _ATTACHED[model] = network
    return network


def attach(network: Network) -> Network:
    """Make ``network`` what :func:`as_network` returns for its module (a builder that knows the
    architecture's preprocessing attaches it)."""
    _ATTACHED[network.module] = network
    return network


def output_layer(module: nn.Module) -> str:
    """Path of the module that makes the class scores: the last ``nn.Linear`` registered (the
    classifier of every torchvision model, ZFNet's fc8)."""
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no nn.Linear classifier")
    return linears[-1]


def zeros_like_input(module: nn.Module, channels: int, size: int, batch: int = 1) -> torch.Tensor:
    """A zero image batch (B, channels, size, size) on the module's device, in its dtype."""
    param = next(module.parameters(), None)
    if param is None:
        return torch.zeros(batch, channels, size, size)
    return torch.zeros(batch, channels, size, size, device=param.device, dtype=param.dtype)


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

