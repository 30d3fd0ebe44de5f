"""The atlas job's figures, measured side by side in one run (issues 4 and 14):

(a) scan through Ray with one worker vs the same scan in a plain process loop (throughput ratio);
(b) scan compute vs a plain forward of the same model on the same batches;
(c) peak memory of the driver and of a scanner with 10x more images (ratio);
(d) the whole atlas (scan, projections, tables, upload; start-up reported apart) vs its compute
    floor: decoding and one forward over the dataset with top-k tracking, plus the projection
    compute of the same winning items (``project_windows`` on images already decoded); medians
    of ``--reps`` runs of each, alternated;
(e) objects and bytes per atlas, and, with ``--before TREE`` (a checkout of an older zfatlas,
    e.g. ``git worktree add /tmp/zfatlas-before 53492b0``), the same atlas built by that tree in
    the same run: project phase and objects before/after.

    .venv/bin/python benchmarks/atlas.py [--variant zfnet-small] [--images 4000] [--batch 64]
        [--before /tmp/zfatlas-before] [--skip a,b,c] [--reps 3]

A ratio is only worth quoting from a quiet machine: the load average is printed first, the run
waits up to ``--wait-quiet`` seconds for it to fall below 1, and every ratio is marked NOT
QUOTABLE when it did not. Runs unchanged on a GPU machine (the worker uses CUDA, channels-last).
Every Ray here is local and bound to 127.0.0.1.
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

# Only what the children of an older tree (--before) also have is imported here.
from jobs.datasets import open_dataset, shard_ranges  # noqa: E402
from jobs.kinds import parse_spec  # noqa: E402
from zfcore.scan import scan_batches  # noqa: E402
from zfcore.zfnet import build  # noqa: E402

CONV = ["conv1", "conv2", "conv3", "conv4", "conv5"]
HERE = Path(__file__).resolve().parent.parent


class Quiet:
    """The machine's load average when the measurements started; ratios carry the verdict."""

    def __init__(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while os.getloadavg()[0] >= 1 and time.monotonic() < deadline:
            time.sleep(5)
        self.start = os.getloadavg()
        self.quiet = self.start[0] < 1

    def __str__(self) -> str:
        a, b, c = self.start
        verdict = "quiet" if self.quiet else "NOT QUIET: no ratio below is quotable"
        return f"load average at start {a:.2f}, {b:.2f}, {c:.2f} ({verdict})"

    def ratio(self, value: float, target: str) -> str:
        mark = "" if self.quiet else f" NOT QUOTABLE (load {self.start[0]:.2f} > 1)"
        return f"{value:.3f} (target {target}){mark}"


def spec_dict(args: argparse.Namespace, images: int, out: str, project: bool, run_id: str) -> dict:
    return {
        "kind": "atlas", "name": "bench", "run_id": run_id,
        "model": {"variant": args.variant, "checkpoint": args.checkpoint},
        "dataset": {"format": "procedural", "num_images": images, "seed": 1},
        "output": out, "layers": CONV, "project": project, "shard_size": args.shard,
        "resources": {"workers": 1, "cpus_per_worker": args.threads, "batch_size": args.batch},
        **({"endpoint_url": args.endpoint_url} if args.endpoint_url else {}),
    }


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    model = build(args.variant).eval().to(device())
    model.load_state_dict(torch.load(args.checkpoint, map_location=device(), weights_only=True))
    return model


def plain_scan(args: argparse.Namespace, images: int) -> tuple[float, dict]:
    """The scan as one process would write it without Ray: read (the same prefetcher as the
    workers: the next batch decoded in threads during the forward), normalize, forward, track.
    Returns (seconds, the top-k results)."""
    from jobs.datasets import Prefetcher
    from jobs.runtime.device import to_device

    spec = parse_spec(spec_dict(args, images, "/tmp", False, "x"))
    dev = device()
    model = load_model(args)
    source = open_dataset(spec.dataset, spec.preprocess)
    prefetcher = Prefetcher(source, args.threads)
    start = time.perf_counter()

    def batches():
        for shard in shard_ranges(len(source), args.shard):
            steps = range(shard.start, shard.stop, args.batch)
            chunks = [range(i, min(i + args.batch, shard.stop)) for i in steps]
            for b in prefetcher.batches(chunks):
                yield to_device(b.images, dev, spec.preprocess), torch.from_numpy(b.indices).to(dev)

    results = scan_batches(model, batches(), CONV, spec.k).results()
    return time.perf_counter() - start, results


def projection_floor(args: argparse.Namespace, images: int, results: dict) -> tuple[float, int]:
    """The projection compute alone: the same winning items as the atlas, grouped the same way,
    through ``project_windows`` on images decoded beforehand (untimed). Returns (seconds, items)."""
    from jobs.atlas.scanner import projection_groups
    from jobs.runtime.device import to_device
    from zfcore.deconv import project_windows

    spec = parse_spec(spec_dict(args, images, "/tmp", True, "x"))
    dev = device()
    model = load_model(args)
    source = open_dataset(spec.dataset, spec.preprocess)
    groups = projection_groups(results, CONV, max(1, args.batch // spec.k))
    spent, items = 0.0, 0
    for group in groups:
        live = [it for it in group["items"] if not it[6]]
        if not live:
            continue
        wanted = sorted({it[2] for it in live})
        batch = source.read(wanted)
        at = {int(i): n for n, i in enumerate(batch.indices)}
        x = to_device(batch.images, dev, spec.preprocess)
        start = time.perf_counter()
        for i in range(0, len(live), args.batch):
            chunk = live[i : i + args.batch]
            out = project_windows(model, x, group["layer"], [at[it[2]] for it in chunk],
                                  [it[0] for it in chunk], positions=[(it[3], it[4]) for it in chunk])
            out.windows.cpu()
        spent += time.perf_counter() - start
        items += len(live)
    return spent, items


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


def count_objects(out: str) -> tuple[int, int]:
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def child(args: argparse.Namespace) -> None:
    """One atlas run in a fresh process with whatever zfatlas is first on the path (this tree or
    ``--before``); prints its manifest's figures and the objects it left as JSON."""
    from jobs.runner import run_spec

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output or tmp
        t = time.perf_counter()
        spec = parse_spec(spec_dict(args, args.child, out, args.project, f"child-{args.child}"))
        m = run_spec(spec, quiet=True)
        wall = time.perf_counter() - t
        objects, size = count_objects(out) if not args.output else (None, None)
    print(json.dumps({"peak": m["peak_rss_mb"], "timings": m["timings"], "wall_s": wall,
                      "rows": m["features_rows"], "objects": objects, "bytes": size,
                      "format": m.get("format", 1)}))


def run_child(args: argparse.Namespace, images: int, project: bool, tree: Path = HERE,
              output: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(images), "--variant",
           args.variant, "--batch", str(args.batch), "--shard", str(args.shard), "--threads",
           str(args.threads), "--checkpoint", args.checkpoint]
    cmd += ["--project"] if project else []
    cmd += ["--output", output] if output else []
    cmd += ["--endpoint-url", args.endpoint_url] if args.endpoint_url else []
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=tree, env=env)
    if done.returncode:
        raise SystemExit(f"atlas child in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="zfnet-small")
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard", type=int, default=500)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the worker and the plain loop")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--before", type=Path, default=None, help="an older zfatlas checkout to compare with")
    p.add_argument("--skip", default="", help="comma-separated figures to skip: a,b,c")
    p.add_argument("--reps", type=int, default=3, help="runs of the atlas and of its floor for (d)")
    p.add_argument("--wait-quiet", type=float, default=120, help="seconds to wait for load < 1")
    p.add_argument("--endpoint-url", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--project", action="store_true", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.child is not None:
        child(args)
        return
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="zfatlas-bench-")
    args.checkpoint = str(Path(tmp, "model.pt"))
    torch.manual_seed(0)
    torch.save(build(args.variant).state_dict(), args.checkpoint)
    n = args.images
    quiet = Quiet(args.wait_quiet)
    print(f"device={device()} variant={args.variant} images={n} batch={args.batch} threads={args.threads}")
    print(quiet)

    if "a" not in skip:  # Ray (one worker, scan only) vs a plain loop; alternated, medians of 3.
        plain, ray_scan, ray_start = [], [], []
        for _ in range(3):
            plain.append(plain_scan(args, n)[0])
            r = run_child(args, n, project=False)
            ray_scan.append(r["timings"]["scan_s"])
            ray_start.append(r["timings"]["startup_s"])
        pm, rm = statistics.median(plain), statistics.median(ray_scan)
        print(f"(a) plain loop {n / pm:8.1f} img/s | Ray 1 worker scan {n / rm:8.1f} img/s -> ratio "
              f"{quiet.ratio(pm / rm, '>= 0.95')}; Ray start-up {statistics.median(ray_start):.1f}s apart")
        if device().type == "cuda":
            print(f"    GPU: {n / rm:.1f} images/s per GPU in the scan (one worker)")

    if "b" not in skip:
        f, s = forward_vs_scan(args)
        print(f"(b) scan compute / plain forward = {quiet.ratio(s / f, '<= 1.10')}")

    # (d) the whole atlas without its start-up vs decode + forward + projection compute: medians
    # of --reps runs of each, alternated (one run of either moves by 10-15% on this machine).
    wholes, floors, bigs = [], [], []
    for _ in range(args.reps):
        big = run_child(args, n, project=True)
        bigs.append(big)
        wholes.append(big["timings"]["total_s"] - big["timings"]["startup_s"])
        floor_scan, results = plain_scan(args, n)
        floor_proj, items = projection_floor(args, n, results)
        floors.append((floor_scan + floor_proj, floor_scan, floor_proj))
    whole = statistics.median(wholes)
    big = bigs[wholes.index(whole)] if args.reps % 2 else bigs[0]
    floor, floor_scan, floor_proj = sorted(floors)[len(floors) // 2]
    if "c" not in skip:  # memory with 10x the images (fresh processes: the peaks are the run's own)
        small = run_child(args, n // 10, project=True)
        d = big["peak"]["driver"] / small["peak"]["driver"]
        w = big["peak"]["scanner_max"] / small["peak"]["scanner_max"]
        print(f"(c) peak RSS, {n // 10} -> {n} images: driver {small['peak']['driver']:.0f} -> "
              f"{big['peak']['driver']:.0f} MiB (x{d:.3f}); scanner {small['peak']['scanner_max']:.0f} -> "
              f"{big['peak']['scanner_max']:.0f} MiB (x{w:.3f}) (target <= 1.1)")
    t = big["timings"]
    runs = "; ".join(f"{w:.2f} = scan {b['timings']['scan_s']:.2f} + project {b['timings']['project_s']:.2f} "
                     f"+ write {b['timings']['write_s']:.2f}" for w, b in zip(wholes, bigs, strict=True))
    print(f"(d) atlas {whole:.2f}s, start-up apart ({t['startup_s']:.1f}s), median of {args.reps}: {runs}")
    print(f"    vs floor {floor:.2f}s "
          f"(median of {', '.join(f'{f[0]:.2f}' for f in floors)}: decode+forward {floor_scan:.2f}, "
          f"projection compute of {items} items {floor_proj:.2f})")
    print(f"    -> ratio {quiet.ratio(whole / floor, '<= 1.3')}")
    print(f"(e) format {big['format']}: {big['objects']} objects, {big['bytes'] / 1e6:.1f} MB, "
          f"{big['rows']} feature rows")
    if args.before:
        old = run_child(args, n, project=True, tree=args.before)
        ot = old["timings"]
        print(f"    before ({args.before}, format {old['format']}): {old['objects']} objects, "
              f"{old['bytes'] / 1e6:.1f} MB; project phase {ot['project_s']:.1f}s -> {t['project_s']:.1f}s "
              f"(x{ot['project_s'] / t['project_s']:.1f}); write {ot['write_s']:.1f}s -> "
              f"{t['write_s']:.1f}s; "
              f"whole atlas {ot['total_s']:.1f}s -> {t['total_s']:.1f}s")
    print(f"load average at end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
