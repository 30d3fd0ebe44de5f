"""Top-9 scan cost vs a plain forward, and batched vs one-at-a-time deconvnet projections.

Prints ratios measured side by side in one run (alternating repetitions, medians), so machine
noise cancels. Runs unchanged on a GPU (channels-last there).

    .venv/bin/python benchmarks/scan.py [--variant zfnet] [--batch 32] [--batches 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from zfcore.deconv import project
from zfcore.topk import TopKTracker
from zfcore.zfnet import build

CONV = ["conv1", "conv2", "conv3", "conv4", "conv5"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="zfnet")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--project-items", type=int, default=32)
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build(args.variant).eval().to(device)
    size = model.config.image_size
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    batches = [torch.randn(args.batch, 3, size, size, device=device).to(memory_format=fmt)
               for _ in range(args.batches)]
    with torch.no_grad():
        shapes = {n: tuple(a.shape[1:]) for n, a in model.forward_features(batches[0][:1], CONV).items()}

    @torch.no_grad()
    def plain() -> None:
        for x in batches:
            model(x)

    @torch.no_grad()
    def features_only() -> None:
        for x in batches:
            model.forward_features(x, CONV)

    @torch.no_grad()
    def scan() -> None:
        tracker = TopKTracker(shapes, 9, device)
        for i, x in enumerate(batches):
            idx = torch.arange(i * len(x), (i + 1) * len(x), device=device)
            tracker.update(model.forward_features(x, CONV), idx)
        tracker.results()

    plain()
    scan()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "features": [], "scan": []}
    for _ in range(args.repeats):
        times["plain"].append(timed(plain, device))
        times["features"].append(timed(features_only, device))
        times["scan"].append(timed(scan, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    n_img = args.batch * args.batches
    load = os.getloadavg()
    print(f"load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"
          + ("" if load[0] < 1 else " (NOT QUIET: the ratios below are not quotable)"))
    print(f"device={device} variant={args.variant} images={n_img} ({size}px) repeats={args.repeats}")
    print(f"plain forward (whole net)   {n_img / med['plain']:8.1f} images/s")
    print(f"forward to conv5 only       {n_img / med['features']:8.1f} images/s")
    print(f"top-9 scan, 5 conv layers   {n_img / med['scan']:8.1f} images/s")
    print(f"ratio scan / plain forward        = {med['scan'] / med['plain']:.3f}  (target <= 1.10)")
    print(f"ratio scan / forward to conv5     = {med['scan'] / med['features']:.3f}  (cost of tracking)")

    # Projections: batched calls vs a one-item-at-a-time loop over the same items.
    n = args.project_items
    images = torch.randn(n, 3, size, size, device=device).to(memory_format=fmt)
    channels = torch.randint(0, shapes["conv5"][0], (n,))

    def batched(bs: int):
        def run() -> None:
            for i in range(0, n, bs):
                project(model, images[i : i + bs], "conv5", channels[i : i + bs])
        return run

    runs = {bs: [] for bs in (1, 8, 32)}
    batched(8)()
    for _ in range(max(2, args.repeats // 2)):
        for bs in runs:
            runs[bs].append(timed(batched(bs), device))
    one = statistics.median(runs[1])
    print(f"conv5 projections, {n} items:")
    for bs, ts in runs.items():
        t = statistics.median(ts)
        print(f"  batch {bs:2d}: {n / t:8.1f} projections/s   speed-up vs one-at-a-time = {one / t:.2f}x")


if __name__ == "__main__":
    main()
