"""The analyses' pictures: heat maps over images and line/bar plots, as uint8 RGB arrays.

Everything returns an (H, W, 3) uint8 array for :meth:`jobs.store.runs.RunWriter.put_png`. Figures are
drawn with matplotlib's object API on an Agg canvas (no pyplot): no global figure state, so actors
can draw concurrently and nothing needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jobs.rendering.images import enlarge

DPI = 100


def figure_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` to an (H, W, 3) uint8 array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def heat_overlay(
    image: np.ndarray,
    values: np.ndarray,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    min_side: int = 256,
) -> np.ndarray:
    """``values`` (H, W) colour-mapped and blended over ``image`` (H, W, 3) uint8 -> uint8, enlarged
    (nearest neighbour) to at least ``min_side`` pixels so small inputs stay legible.
    vmin/vmax default to the values' range (a constant map is drawn at the low end)."""
    values = np.asarray(values, dtype=np.float64)
    lo = float(values.min()) if vmin is None else vmin
    hi = float(values.max()) if vmax is None else vmax
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    colours = colormaps[cmap](np.clip(scaled, 0, 1))[..., :3]
    blend = (1 - alpha) * image.astype(np.float64) / 255 + alpha * colours
    return enlarge((np.clip(blend, 0, 1) * 255).round().astype(np.uint8), min_side)


def occlusion_figure(
    image: np.ndarray,
    activation: np.ndarray,
    projection: np.ndarray,
    true_prob: np.ndarray,
    top_class: np.ndarray,
    class_names: Sequence[str],
    *,
    title: str,
    layer: str,
    channel: int,
) -> np.ndarray:
    """Fig. 7's row for one image: (a) the image, (b) the summed activation of the tracked map per
    square position, (c) its deconv projection, (d) true-class probability, (e) most probable class.
    activation/true_prob/top_class are the measured (R, C) grids, one cell per square position in
    image order (as the paper draws them); projection is an (h, w, 3) uint8 display image."""
    fig = Figure(figsize=(12.5, 2.9), dpi=DPI)
    axes = fig.subplots(1, 5)
    axes[0].imshow(image)
    axes[0].set_title("(a) input")
    im = axes[1].imshow(activation, cmap="jet")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[1].set_title(f"(b) {layer} map {channel}, summed")
    axes[2].imshow(projection)
    axes[2].set_title("(c) deconv projection")
    im = axes[3].imshow(true_prob, cmap="jet", vmin=0, vmax=1)
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    axes[3].set_title("(d) p(true class)")
    present = sorted({int(c) for c in np.unique(top_class)})
    palette = colormaps["tab20"]
    colours = np.array([palette(c % 20)[:3] for c in range(max(present) + 1)])
    axes[4].imshow(colours[top_class.astype(np.int64)])
    axes[4].set_title("(e) most probable class")
    for c in present:
        name = class_names[c] if c < len(class_names) else str(c)
        axes[4].plot([], [], "s", color=colours[c], label=name)
    axes[4].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return figure_rgb(fig)


_AXIS = {"translate": "vertical shift (pixels)", "scale": "scale factor", "rotate": "rotation (degrees)"}


def invariance_figure(
    kind: str,
    values: Sequence[float],
    distances: dict[str, np.ndarray],
    true_prob: np.ndarray,
    image_labels: Sequence[str],
) -> np.ndarray:
    """One column of Fig. 5: per layer the Euclidean feature distance to the original, then the
    true-class probability, against the transform's value; one line per image.
    distances: {layer: (B, V)}; true_prob: (B, V)."""
    panels = len(distances) + 1
    fig = Figure(figsize=(4.0 * panels, 3.2), dpi=DPI)
    axes = fig.subplots(1, panels)
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    for ax, (layer, d) in zip(axes, distances.items(), strict=False):
        for b, name in enumerate(image_labels):
            ax.plot(x[order], d[b][order], marker=".", label=name)
        ax.set_title(f"{layer}: Euclidean distance")
    for b, name in enumerate(image_labels):
        axes[-1].plot(x[order], true_prob[b][order], marker=".", label=name)
    axes[-1].set_ylim(-0.02, 1.02)
    axes[-1].set_title("p(true class)")
    axes[-1].legend(fontsize=7, frameon=False)
    for ax in axes:
        ax.set_xlabel(_AXIS.get(kind, kind))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_rgb(fig)


def bar_figure(
    groups: Sequence[str],
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    ylabel: str,
    title: str,
) -> np.ndarray:
    """Grouped bars with error bars: ``series`` {name: (means per group, stds per group)}."""
    fig = Figure(figsize=(1.2 + 1.3 * len(groups) * max(1, len(series)) / 2, 3.4), dpi=DPI)
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, (means, stds)) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(x, list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return figure_rgb(fig)


def line_figure(
    panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
    x_labels: Sequence[str],
    *,
    ylabel: str,
) -> np.ndarray:
    """One panel per key of ``panels``; in each, one line with error bars per series
    {name: (means, stds)} over the categorical x axis ``x_labels``."""
    fig = Figure(figsize=(5.0 * len(panels), 3.6), dpi=DPI)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    x = np.arange(len(x_labels))
    for ax, (title, series) in zip(axes, panels.items(), strict=True):
        for name, (means, stds) in series.items():
            ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=name)
        ax.set_xticks(x, list(x_labels))
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return figure_rgb(fig)
