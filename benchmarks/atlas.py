"""The atlas job's figures, measured side by side in one run (issue 4):

(a) scan through Ray with one worker vs the same scan in a plain process loop (throughput ratio);
(b) scan compute vs a plain forward of the same model on the same batches;
(c) peak memory of the driver and of a scanner with 10x more images (ratio);
(d) whole atlas wall time vs the compute floor: one forward over the dataset (with its image
    decoding) plus one batched forward/backward of the projected items.

    .venv/bin/python benchmarks/atlas.py [--variant zfnet-small] [--images 4000] [--batch 64]

Runs unchanged on a GPU machine (then the worker uses CUDA, channels-last) and reports images/s
per GPU. Every Ray here is local and bound to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

from jobs.datasets import open_dataset, shard_ranges  # noqa: E402
from jobs.kinds import parse_spec  # noqa: E402
from jobs.runner import run_spec  # noqa: E402
from zfcore.data import to_tensor  # noqa: E402
from zfcore.scan import scan_batches  # noqa: E402
from zfcore.zfnet import build  # noqa: E402

CONV = ["conv1", "conv2", "conv3", "conv4", "conv5"]


def make_spec(args: argparse.Namespace, images: int, out: str, project: bool, run_id: str):
    return parse_spec({
        "kind": "atlas", "name": "bench", "run_id": run_id,
        "model": {"variant": args.variant, "checkpoint": args.checkpoint},
        "dataset": {"format": "procedural", "num_images": images, "seed": 1},
        "output": out, "layers": CONV, "project": project, "shard_size": args.shard,
        "resources": {"workers": 1, "cpus_per_worker": args.threads, "batch_size": args.batch},
    })


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plain_scan(args: argparse.Namespace, images: int) -> float:
    """The scan as one process would write it with zfcore alone: read, normalize, forward, track."""
    spec = make_spec(args, images, "/tmp", False, "x")
    dev = device()
    model = build(args.variant).eval().to(dev)
    model.load_state_dict(torch.load(args.checkpoint, map_location=dev, weights_only=True))
    source = open_dataset(spec.dataset, spec.model.image_size)
    start = time.perf_counter()

    def batches():
        for shard in shard_ranges(len(source), args.shard):
            for i in range(shard.start, shard.stop, args.batch):
                b = source.read(range(i, min(i + args.batch, shard.stop)))
                yield to_tensor(torch.from_numpy(b.images).to(dev)), torch.from_numpy(b.indices).to(dev)

    scan_batches(model, batches(), CONV, 9).results()
    return time.perf_counter() - start


def forward_vs_scan(args: argparse.Namespace) -> tuple[float, float]:
    """(b): plain forward and scan compute over the same pre-decoded batches (medians of 3)."""
    dev = device()
    model = build(args.variant).eval().to(dev)
    size = model.config.image_size
    xs = [torch.randn(args.batch, 3, size, size, device=dev) for _ in range(8)]
    idx = [torch.arange(i * args.batch, (i + 1) * args.batch, device=dev) for i in range(8)]
    fwd, scn = [], []
    for _ in range(3):
        t = time.perf_counter()
        with torch.no_grad():
            for x in xs:
                model(x)
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        scan_batches(model, zip(xs, idx, strict=True), CONV, 9).results()
        scn.append(time.perf_counter() - t)
    return statistics.median(fwd), statistics.median(scn)


def forward_backward_floor(args: argparse.Namespace, items: int) -> float:
    """One batched forward/backward over ``items`` images (the projection phase's compute)."""
    dev = device()
    model = build(args.variant).eval().to(dev)
    size = model.config.image_size
    start = time.perf_counter()
    for i in range(0, items, args.batch):
        x = torch.randn(min(args.batch, items - i), 3, size, size, device=dev, requires_grad=True)
        acts = model.forward_features(x, ["conv5"])["conv5"]
        acts.amax(dim=(1, 2, 3)).sum().backward()
    return time.perf_counter() - start


def child(args: argparse.Namespace) -> None:
    """One atlas run in a fresh process; prints its manifest's memory and timings as JSON."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        m = run_spec(make_spec(args, args.child, out, args.project, f"child-{args.child}"), quiet=True)
        wall = time.perf_counter() - t
    print(json.dumps({"peak": m["peak_rss_mb"], "timings": m["timings"], "wall_s": wall,
                      "rows": m["features_rows"], "workers": m["workers"]}))


def run_child(args: argparse.Namespace, images: int, project: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(images), "--variant", args.variant, "--batch",
           str(args.batch), "--shard", str(args.shard), "--threads", str(args.threads),
           "--checkpoint", args.checkpoint] + (["--project"] if project else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="zfnet-small")
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard", type=int, default=500)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the worker and the plain loop")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--project", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args)
        return

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="zfatlas-bench-")
    args.checkpoint = str(Path(tmp, "model.pt"))
    torch.manual_seed(0)
    torch.save(build(args.variant).state_dict(), args.checkpoint)
    n = args.images
    print(f"device={device()} variant={args.variant} images={n} batch={args.batch} threads={args.threads}")

    # (a) Ray (one worker, scan only) vs a plain loop; alternated, medians.
    plain, ray_scan, ray_wall = [], [], []
    for _ in range(2):
        plain.append(plain_scan(args, n))
        r = run_child(args, n, project=False)
        ray_scan.append(r["timings"]["scan_s"])
        ray_wall.append(r["wall_s"])
    pm, rm = statistics.median(plain), statistics.median(ray_scan)
    print(f"(a) plain loop {n / pm:8.1f} img/s | Ray 1 worker scan {n / rm:8.1f} img/s "
          f"-> ratio {pm / rm:.3f} (target >= 0.9); whole Ray job incl. start-up "
          f"{statistics.median(ray_wall):.1f}s")

    # (b) tracking cost.
    f, s = forward_vs_scan(args)
    print(f"(b) scan compute / plain forward = {s / f:.3f} (target <= 1.10)")

    # (c) memory with 10x the images (fresh processes, so peaks are the run's own).
    small = run_child(args, n // 10, project=True)
    big = run_child(args, n, project=True)
    d = big["peak"]["driver"] / small["peak"]["driver"]
    w = big["peak"]["scanner_max"] / small["peak"]["scanner_max"]
    print(f"(c) peak RSS, {n // 10} -> {n} images: driver {small['peak']['driver']:.0f} -> "
          f"{big['peak']['driver']:.0f} MiB (x{d:.3f}); scanner {small['peak']['scanner_max']:.0f} -> "
          f"{big['peak']['scanner_max']:.0f} MiB (x{w:.3f}) (target <= 1.1)")

    # (d) whole atlas (scan + projections + PNGs + tables) vs compute floor.
    floor_scan = plain_scan(args, n)
    floor_fb = forward_backward_floor(args, big["rows"])
    floor = floor_scan + floor_fb
    total = big["timings"]["total_s"]
    t = big["timings"]
    print(f"(d) atlas total {total:.1f}s (scan {t['scan_s']:.1f}, project {t['project_s']:.1f}, "
          f"write {t['write_s']:.1f}) vs floor {floor:.1f}s (forward+decode {floor_scan:.1f}, "
          f"fwd/bwd of {big['rows']} items {floor_fb:.1f}) -> ratio {total / floor:.2f} (target <= 1.3)")
    if device().type == "cuda":
        print(f"GPU: {n / rm:.1f} images/s per GPU in the scan (one worker)")


if __name__ == "__main__":
    main()
