"""Batched occlusion sensitivity vs one forward pass per square position, same model and images.

All paths are zfcore.analyses.occlusion.occlusion_sensitivity: ``batch_size=1, windowed=False`` is
one plain forward per position (the reference); "batched" pushes ``--batch`` occluded copies
through per pass; "batched + windowed" (the default) also recomputes the first convolution only
where each square changes it. Repetitions alternate between the paths and medians are reported,
so machine noise hits all alike; the results are compared too (they must agree to 1e-5). The load
average is printed first: ratios from a machine with load >= 1 are marked NOT QUOTABLE. Runs
unchanged on a GPU.

    .venv/bin/python benchmarks/occlusion.py [--variant zfnet-small] [--images 4] [--patch 16]
        [--stride 4] [--batch 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from zfcore.analyses.occlusion import OcclusionResult, occlusion_sensitivity, square_offsets
from zfcore.zfnet import build


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_all(
    model, images: torch.Tensor, labels: list[int], args, batch_size: int, windowed: bool
) -> list[OcclusionResult]:
    return [
        occlusion_sensitivity(model, img, lab, layer=args.layer, size=args.patch, stride=args.stride,
                              batch_size=batch_size, window=windowed)
        for img, lab in zip(images, labels, strict=True)
    ]


def timed(fn, device: torch.device) -> tuple[float, list[OcclusionResult]]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="zfnet-small")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--layer", default="conv5")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="occluded copies per forward (batched path)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build(args.variant).to(device).eval()
    size = model.config.image_size
    images = torch.randn(args.images, 3, size, size, device=device)
    labels = [i % model.config.num_classes for i in range(args.images)]
    positions = len(square_offsets(size, args.patch, args.stride)) ** 2

    load = os.getloadavg()
    quiet = load[0] < 1
    paths = {
        "one forward per position": (1, False),
        f"batched, {args.batch} per forward": (args.batch, False),
        "batched + windowed conv1": (args.batch, True),
    }
    for batch, windowed in paths.values():  # warm-up (allocator, kernels) before timing
        run_all(model, images[:1], labels[:1], args, batch, windowed)
    times: dict[str, list[float]] = {name: [] for name in paths}
    results: dict[str, list[OcclusionResult]] = {}
    for _ in range(args.reps):
        for name, (batch, windowed) in paths.items():
            def job(b: int = batch, w: bool = windowed) -> list[OcclusionResult]:
                return run_all(model, images, labels, args, b, w)

            t, results[name] = timed(job, device)
            times[name].append(t)
    reference = results["one forward per position"]
    diff = max(
        max(float((b.true_prob - s.true_prob).abs().max()), float((b.activation - s.activation).abs().max()))
        for out in results.values() for b, s in zip(out, reference, strict=True)
    )
    forwards = args.images * positions
    threads = torch.get_num_threads()
    print(f"load average at start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"
          + ("" if quiet else " (NOT QUIET: ratios below are not quotable)"))
    print(f"device {device} ({threads} threads), {args.variant} at {size}px, layer {args.layer}")
    print(f"{args.images} images x {positions} positions (patch {args.patch}, stride {args.stride}) "
          f"= {forwards} occluded images; median of {args.reps}")
    base = statistics.median(times["one forward per position"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:28s}: {t:8.3f} s  ({forwards / t:8.1f} positions/s)  speed-up {base / t:5.2f}x"
              + ("" if quiet else " NOT QUOTABLE"))
    print(f"max |difference| of activation and true-class probability: {diff:.2e}")


if __name__ == "__main__":
    main()
