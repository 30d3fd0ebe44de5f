"""``zfatlas demo``: the whole product on one machine with the embedded defaults.

Two jobs on a local Ray (or the cluster in RAY_ADDRESS), into the local artifact folder: a train
job (the small ZFNet on the procedural dataset, data-parallel on Ray Train, a checkpoint after
every epoch) and the atlas job of the model it trained. Both are ordinary runs, named by their
specs: running the demo again reuses what is committed, and after Ctrl-C in training the next
run resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from zfatlas_cli.failures import fail, fail_with
from zfatlas_cli.output import EXIT_INTERRUPTED, quiet_ray

log = logging.getLogger("zfatlas.demo")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small ZFNet and build its feature atlas on local Ray",
        description="Train the small ZFNet on procedural images (a Ray Train job with a progress bar "
        "and a checkpoint after every epoch), build the feature atlas of what it learned (an atlas "
        "job), print where it is and how long it all took. Running it again reuses the committed "
        "runs; after Ctrl-C, training resumes from its last checkpoint.",
        epilog="examples:\n  zfatlas demo\n  zfatlas demo --epochs 6 --images 1000   # a quicker, "
        "less trained model",
    )
    p.add_argument("--output", default="./artifacts", metavar="DIR", help="artifact folder (or s3:// prefix)")
    p.add_argument("--epochs", type=int, default=18, help="training epochs")
    p.add_argument("--images", type=int, default=3000, help="procedural training images")
    p.add_argument("--atlas-images", type=int, default=2000, help="procedural images the atlas scans")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def _workers() -> int:
    # Two data-parallel workers of one CPU each, where there are two CPUs to run them.
    return max(1, min(2, os.cpu_count() or 1))


def train_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's train job: examples/train-small.yaml, sized by the command line."""
    workers = _workers()
    return {
        "kind": "train",
        "name": "demo-train",
        "seed": 0,
        "model": {"arch": "zfnet-small"},
        "dataset": {"format": "procedural", "num_images": args.images, "seed": 0},
        "epochs": args.epochs,
        "lr": 0.02,
        "schedule": "step",
        "step_size": max(1, args.epochs - 4),  # the last epochs at lr / 10
        "gamma": 0.1,
        "checkpoint_every_epochs": 1,  # Ctrl-C loses at most the epoch under way
        "evolution_epochs": [1, 2, 4, 8, 12, 18],
        "evolution_channels": 6,
        "output": args.output,
        "resources": {"workers": workers, "gpus_per_worker": 1, "cpus_per_worker": 1,
                      "batch_size": 64 // workers},
    }


def atlas_spec(args: argparse.Namespace, checkpoint: str) -> dict[str, Any]:
    return {
        "kind": "atlas",
        "name": "demo",
        "seed": 0,
        "model": {"arch": "zfnet-small", "checkpoint": checkpoint},
        # A different seed from training: the atlas is built on images the model never saw.
        "dataset": {"format": "procedural", "num_images": args.atlas_images, "seed": 1},
        "output": args.output,
        "resources": {"workers": _workers(), "batch_size": 64},
        "shard_size": 250,
    }


def _epochs_done(spec: Any) -> int | None:
    """The last epoch the interrupted training run finished, from its progress file."""
    from jobs.specs.loading import spec_run_id
    from jobs.store import open_store, run_prefix
    from jobs.train.worker import PROGRESS

    try:
        store = open_store(spec.output, spec.endpoint_url)
        return int(store.get_json(f"{run_prefix('train', spec_run_id(spec))}/{PROGRESS}")["epoch"])
    except Exception:  # not written yet: interrupted in the first epoch
        return None


def _command() -> str:
    """How the user ran zfatlas (``.venv/bin/zfatlas`` from ``make demo``), to say how to go on."""
    exe = sys.argv[0] if sys.argv else ""
    if Path(exe).name != "zfatlas":
        return "zfatlas"
    relative = os.path.relpath(exe)
    return relative if not relative.startswith("..") else exe


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def main(args: argparse.Namespace) -> int:
    from jobs.kinds import parse_spec
    from jobs.runner import run_location, run_spec
    from jobs.specs.base import SpecError

    t0 = time.perf_counter()
    try:
        train = parse_spec(train_spec(args))
    except SpecError as exc:
        return fail("; ".join(exc.problems), 2)
    quiet_ray()
    where = run_location(train)
    print(f"training zfnet-small on {args.images} procedural images for {args.epochs} epochs "
          f"({_workers()} Ray Train workers) into {where}", flush=True)
    try:
        trained = run_spec(train, quiet=args.quiet)
    except KeyboardInterrupt:
        done = _epochs_done(train)
        upto = f" after epoch {done} of {args.epochs}" if done else ""
        return fail(f"interrupted{upto}; the training checkpoints are kept in {where}: run the same "
                    "command again to resume", EXIT_INTERRUPTED)
    except Exception as exc:
        return fail_with(exc, args.verbose)
    t_train = time.perf_counter() - t0
    checkpoint = trained["checkpoint_uri"]
    final = trained.get("final") or {}
    error = final.get("val_top1_error")
    print(f"trained: validation top-1 error {error:.3f} (chance 0.900); model {checkpoint}"
          if error is not None else f"trained: model {checkpoint}", flush=True)

    atlas = parse_spec(atlas_spec(args, checkpoint))
    print(f"building its feature atlas over {args.atlas_images} unseen images", flush=True)
    try:
        manifest = run_spec(atlas, quiet=args.quiet)
    except KeyboardInterrupt:
        return fail(f"interrupted; the trained model is kept ({checkpoint}): run the same command "
                    "again to build its atlas", EXIT_INTERRUPTED)
    except Exception as exc:
        return fail_with(exc, args.verbose)
    total = time.perf_counter() - t0

    out = run_location(atlas)
    print(f"atlas written to {out}")
    if not out.startswith("s3://"):
        print(f"  features table: {Path(out) / 'features.parquet'}")
        for layer in manifest.get("summaries", {}):
            print(f"  {layer} summary:  {Path(out) / 'summary' / (layer + '.png')}")
    print(f"browse it: {_command()} serve --store {args.output}   (then open http://127.0.0.1:8000)")
    print(f"demo took {_minutes(total)} (training {_minutes(t_train)}, atlas {_minutes(total - t_train)})")
    return 0
