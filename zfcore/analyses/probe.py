"""Linear probes on frozen features (Zeiler & Fergus, section 5, Tables 4, 5 and 7).

The trained network is frozen; each layer's activation becomes a feature vector and a linear
classifier is trained on top with N images per class of another dataset, over several random
train/test folds. Two classifiers, as in Table 7:

- softmax: multinomial logistic regression, L2-regularized, fitted full-batch with L-BFGS;
- linear SVM: one-vs-rest, squared hinge loss, L2-regularized (the LinearSVC / liblinear primal),
  also fitted with L-BFGS since the squared hinge is differentiable.

Features are standardized with the training fold's mean and std (the test fold never informs
them): the layers' scales differ by orders of magnitude and a single regularization strength only
means the same thing on every layer after standardizing. The paper's "non-pretrained" baseline is
the same probe on a randomly initialized network of the same architecture (:func:`random_init`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..network import Network, as_network, evaluating, flat

CLASSIFIERS: tuple[str, ...] = ("softmax", "svm")


@dataclass(frozen=True)
class LinearProbe:
    """A fitted linear classifier with its input standardization; float32 tensors on the device
    of the features it was fitted on."""

    weight: torch.Tensor  # (K, D)
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (D,) training-fold feature mean
    scale: torch.Tensor  # (D,) training-fold feature std (1 where a feature is constant)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) raw features -> (N, K) class scores."""
        return ((x.float() - self.mean) / self.scale) @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) int64 predicted classes."""
        return self.scores(x).argmax(dim=1)


def random_init(model: nn.Module | Network, seed: int = 0) -> nn.Module:
    """A fresh network of ``model``'s architecture with its init drawn from ``seed`` (the global
    RNG is left untouched), in eval mode: the paper's "non-pretrained" baseline."""
    return as_network(model).initialized(seed)


@torch.no_grad()
def extract_features(
    model: nn.Module | Network,
    images: torch.Tensor,
    layers: Sequence[str],
    *,
    grid: int | dict[str, int | None] | None = None,
    batch_size: int = 128,
) -> dict[str, torch.Tensor]:
    """Frozen features of ``layers`` for images (N, 3, H, W): {layer: (N, D) float32 on the CPU}.

    ``grid``: conv maps are average-pooled to grid x grid cells before flattening (D = C grid^2), to
    keep low layers' vectors a manageable size on large inputs; None keeps the whole map
    (D = C H' W'); a dict gives it per layer. fc layers are (N, F) either way.
    """
    network = as_network(model)
    grids = grid if isinstance(grid, dict) else {name: grid for name in layers}
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    with evaluating(network):
        for start in range(0, images.shape[0], batch_size):
            acts, _ = network.features_and_logits(images[start : start + batch_size], layers)
            for name, a in acts.items():
                cells = grids.get(name)
                if cells is not None and a.ndim == 4:
                    a = F.adaptive_avg_pool2d(a, cells)
                parts[name].append(flat(a).float().cpu())
    return {name: torch.cat(p) for name, p in parts.items()}


def _standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def _fit(
    x: torch.Tensor, num_classes: int, loss_fn, l2: float, max_iter: int
) -> LinearProbe:
    """Full-batch L-BFGS on loss_fn(scores) + l2 / 2 ||W||^2 (the bias is not penalized)."""
    x = x.float()
    mean, scale = _standardize(x)
    z = (x - mean) / scale
    weight = torch.zeros(num_classes, z.shape[1], device=z.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(z @ weight.T + bias) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, scale)


def fit_softmax(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, *, l2: float = 1e-2, max_iter: int = 200
) -> LinearProbe:
    """Multinomial logistic regression: mean cross-entropy + l2 / 2 ||W||^2. x (N, D), y (N,)."""
    y = torch.as_tensor(y, dtype=torch.long, device=x.device)
    return _fit(x, num_classes, lambda s: F.cross_entropy(s, y), l2, max_iter)


def fit_linear_svm(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, *, c: float = 1.0, max_iter: int = 200
) -> LinearProbe:
    """One-vs-rest linear SVM, squared hinge: 1/2 ||W||^2 + C sum_i sum_k max(0, 1 - t_ik s_ik)^2,
    t_ik = +1 for the image's class and -1 otherwise (liblinear's L2-loss primal). It is minimized
    divided by C N, i.e. as a mean loss with l2 = 1 / (C N). x (N, D), y (N,)."""
    y = torch.as_tensor(y, dtype=torch.long, device=x.device)
    targets = F.one_hot(y, num_classes).float() * 2 - 1

    def squared_hinge(s: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - targets * s).pow(2).sum(dim=1).mean()

    return _fit(x, num_classes, squared_hinge, 1.0 / (c * len(y)), max_iter)


def per_class_split(
    labels: torch.Tensor, n_train: int, generator: torch.Generator, n_test: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fold: ``n_train`` random images of every class to train on, and of the rest up to
    ``n_test`` per class (all when None) to test on, as in the paper's Caltech protocol.
    Returns two sorted (M,) int64 index tensors. Raises if a class has fewer than n_train + 1."""
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    train, test = [], []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).view(-1)
        if len(members) <= n_train:
            raise ValueError(f"class {cls} has {len(members)} images; need more than {n_train}")
        shuffled = members[torch.randperm(len(members), generator=generator)]
        train.append(shuffled[:n_train])
        rest = shuffled[n_train:]
        test.append(rest if n_test is None else rest[:n_test])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


@dataclass(frozen=True)
class ProbeScore:
    """Test accuracy (fraction) of one classifier on one layer in one fold."""

    layer: str
    classifier: str
    fold: int
    accuracy: float
    n_train: int
    n_test: int


@dataclass(frozen=True)
class ProbeSummary:
    """Mean and std over folds of :class:`ProbeScore` accuracies, the "mean ± std" of Tables 4/7."""

    layer: str
    classifier: str
    mean: float
    std: float
    folds: int


def probe_layers(
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    *,
    n_train: int,
    folds: int = 5,
    classifiers: Sequence[str] = CLASSIFIERS,
    n_test: int | None = None,
    seed: int = 0,
    l2: float = 1e-2,
    c: float = 1.0,
    max_iter: int = 200,
) -> list[ProbeScore]:
    """Train and test every classifier on every layer's features ({layer: (N, D)}, labels (N,)) in
    ``folds`` random per-class splits. Every layer and classifier of fold f sees the same split,
    drawn from ``seed + f``, so layers are compared on identical images. Fitting runs on the
    features' device (a GPU when they are there)."""
    unknown = set(classifiers) - set(CLASSIFIERS)
    if unknown:
        raise ValueError(f"unknown classifiers {sorted(unknown)}; known: {CLASSIFIERS}")
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    scores = []
    for fold in range(folds):
        train, test = per_class_split(labels, n_train, torch.Generator().manual_seed(seed + fold), n_test)
        for layer, x in features.items():
            y = labels.to(x.device)
            tr, te = train.to(x.device), test.to(x.device)
            for name in classifiers:
                if name == "softmax":
                    probe = fit_softmax(x[tr], y[tr], num_classes, l2=l2, max_iter=max_iter)
                else:
                    probe = fit_linear_svm(x[tr], y[tr], num_classes, c=c, max_iter=max_iter)
                accuracy = float((probe.predict(x[te]) == y[te]).float().mean())
                scores.append(ProbeScore(layer, name, fold, accuracy, len(train), len(test)))
    return scores


def summarize(scores: Sequence[ProbeScore]) -> list[ProbeSummary]:
    """Mean ± std (population std over folds) per (layer, classifier), in first-seen order."""
    groups: dict[tuple[str, str], list[float]] = {}
    for s in scores:
        groups.setdefault((s.layer, s.classifier), []).append(s.accuracy)
    out = []
    for (layer, classifier), accs in groups.items():
        t = torch.tensor(accs, dtype=torch.float64)
        out.append(ProbeSummary(layer, classifier, float(t.mean()), float(t.std(unbiased=False)), len(accs)))
    return out


def pooled_grid(channels: int, side: int, max_features: int) -> int | None:
    """The grid for :func:`extract_features` that keeps a (channels, side, side) conv map at or under
    ``max_features`` values: None (the whole map) when it already fits, else the largest g with
    channels g^2 <= max_features (at least 1)."""
    if channels * side * side <= max_features:
        return None
    return max(1, min(side, int(math.isqrt(max_features // channels))))
