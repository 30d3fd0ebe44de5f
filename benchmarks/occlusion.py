"""Batched occlusion sensitivity vs one forward pass per square position, same model and images.

Both paths are zfcore.analyses.occlusion.occlusion_sensitivity: ``batch_size=1`` is one forward per
position, the batched path pushes ``--batch`` occluded copies through per pass. Repetitions
alternate between the two and medians are reported, so machine noise hits both alike; the results
are compared too (they must agree to 1e-5). Runs unchanged on a GPU.

    .venv/bin/python benchmarks/occlusion.py [--variant zfnet-small] [--images 4] [--patch 16]
        [--stride 4] [--batch 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zfcore.analyses.occlusion import OcclusionResult, occlusion_sensitivity, square_offsets
from zfcore.zfnet import build


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_all(model, images: torch.Tensor, labels: list[int], args, batch_size: int) -> list[OcclusionResult]:
    return [
        occlusion_sensitivity(model, img, lab, layer=args.layer, size=args.patch, stride=args.stride,
                              batch_size=batch_size)
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

    # Warm-up both paths (allocator, kernels) before timing.
    run_all(model, images[:1], labels[:1], args, args.batch)
    run_all(model, images[:1], labels[:1], args, 1)
    batched_t, single_t = [], []
    for _ in range(args.reps):
        t, batched = timed(lambda: run_all(model, images, labels, args, args.batch), device)
        batched_t.append(t)
        t, single = timed(lambda: run_all(model, images, labels, args, 1), device)
        single_t.append(t)
    diff = max(
        max(float((b.true_prob - s.true_prob).abs().max()), float((b.activation - s.activation).abs().max()))
        for b, s in zip(batched, single, strict=True)
    )
    tb, ts = statistics.median(batched_t), statistics.median(single_t)
    forwards = args.images * positions
    threads = torch.get_num_threads()
    print(f"device {device} ({threads} threads), {args.variant} at {size}px, layer {args.layer}")
    print(f"{args.images} images x {positions} positions (patch {args.patch}, stride {args.stride}) "
          f"= {forwards} occluded images; median of {args.reps}")
    print(f"one forward per position : {ts:8.3f} s  ({forwards / ts:8.1f} positions/s)")
    print(f"batched, {args.batch:4d} per forward : {tb:8.3f} s  ({forwards / tb:8.1f} positions/s)")
    print(f"speed-up (per-position / batched): {ts / tb:.2f}x")
    print(f"max |difference| of activation and true-class probability: {diff:.2e}")


if __name__ == "__main__":
    main()
