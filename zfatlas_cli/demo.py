"""``zfatlas demo``: the whole product on one machine with the embedded defaults.

Trains a small ZFNet on the procedural dataset (a plain PyTorch loop, a few minutes on a CPU),
then runs the atlas job on a local Ray into the local artifact folder and prints where it is.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

log = logging.getLogger("zfatlas.demo")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small ZFNet and build its feature atlas on local Ray")
    p.add_argument("--output", default="./artifacts", help="artifact folder (default ./artifacts)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20, ~1-2 min)")
    p.add_argument("--images", type=int, default=3000, help="procedural training images")
    p.add_argument("--atlas-images", type=int, default=2000, help="procedural images scanned")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from jobs.kinds import parse_spec
    from jobs.runner import run_spec
    from zfcore.data import ProceduralDataset
    from zfcore.training import fit_procedural
    from zfcore.zfnet import build

    out = Path(args.output)
    checkpoint = out / "checkpoints" / f"demo-zfnet-small-e{args.epochs}-n{args.images}.pt"
    if checkpoint.exists():
        log.info("reusing the trained model %s", checkpoint)
    else:
        log.info("training zfnet-small on %d procedural images for %d epochs", args.images, args.epochs)
        torch.manual_seed(0)
        model = build("zfnet-small")
        result = fit_procedural(model, ProceduralDataset(args.images, 64, seed=0), epochs=args.epochs,
                                batch_size=64, lr=0.02, seed=0)
        log.info("validation top-1 error %.3f", result.val["top1_error"])
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "val": result.val}, tmp)
        tmp.replace(checkpoint)

    spec = parse_spec({
        "kind": "atlas",
        "name": "demo",
        "seed": 0,
        "model": {"arch": "zfnet-small", "checkpoint": str(checkpoint.resolve())},
        # A different seed from training: the atlas is built on images the model never saw.
        "dataset": {"format": "procedural", "num_images": args.atlas_images, "seed": 1},
        "output": str(out),
        "resources": {"workers": 2, "batch_size": 64},
        "shard_size": 250,
    })
    manifest = run_spec(spec, quiet=args.quiet)
    where = Path(out, "atlas", manifest["run_id"]).resolve()
    print(f"atlas written to {where}")
    print(f"  features table: {where / 'features.parquet'}")
    for layer in manifest.get("summaries", {}):
        print(f"  {layer} summary:  {where / 'summary' / (layer + '.png')}")
    print(f"browse it: .venv/bin/zfatlas serve --store {out}   (then open http://127.0.0.1:8000)")
    return 0
