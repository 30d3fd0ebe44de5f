"""``zfatlas layers ARCH``: the layers of an architecture, the names a spec's ``layers`` takes."""

from __future__ import annotations

import argparse
import json
import sys

from zfatlas_cli.failures import EXIT_BAD_INPUT, fail, fail_with


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "layers",
        help="list an architecture's layers: channels, map size, receptive field",
        description="List the layers of an architecture (zfnet, zfnet-small, table3-*, "
        "torchvision:<model>, package.module:factory) as a spec's `layers` names them, with "
        "channels, map size and receptive-field size at the input size. '*' marks the layers jobs "
        "use when a spec names none.",
        epilog="examples:\n  zfatlas layers torchvision:resnet18\n"
        "  zfatlas layers zfnet --image-size 224\n"
        "  zfatlas layers torchvision:resnet50 --checkpoint s3://bucket/models/resnet50.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("arch", help="architecture name")
    p.add_argument("--checkpoint", metavar="URI", help="also check that this checkpoint fits")
    p.add_argument("--image-size", type=int, metavar="N", help="input side (default: the architecture's)")
    p.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for --checkpoint")
    p.add_argument("--json", action="store_true", help="one JSON object per layer")
    p.set_defaults(func=layers)


def layers(args: argparse.Namespace) -> int:
    from jobs.networks import CheckpointError, check_checkpoint
    from jobs.specs.base import ModelSpec, SpecError
    from zfcore import architectures
    from zfcore.receptive import geometries

    try:
        arch = architectures.get(args.arch)
        if args.image_size:
            arch = arch.at(args.image_size)
    except architectures.ArchitectureError as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    num_classes = arch.num_classes
    if args.checkpoint:
        if args.endpoint_url:  # named by the operator on the command line: credentials may go there
            from jobs.store.s3 import trust_endpoint

            trust_endpoint(args.endpoint_url)
        try:
            model = ModelSpec(arch=args.arch, checkpoint=args.checkpoint)
            num_classes = check_checkpoint(model, args.endpoint_url).num_classes
        except (CheckpointError, SpecError, ValueError) as exc:
            return fail(str(exc))
        except Exception as exc:
            return fail_with(exc, args.verbose)
    module = arch.build_shapes(num_classes)
    fields = geometries(module, arch.image_size)
    rows = []
    for info in arch.layers:
        geo = fields[info.name]
        rows.append({
            "layer": info.name, "channels": info.channels,
            "map": [info.height, info.width] if info.spatial else None,
            "receptive_field": None if geo.whole else list(geo.size),
            "default": info.name in arch.defaults,
        })
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    width = max(len(r["layer"]) for r in rows)
    print(f"{arch.name} at {arch.image_size}px, {num_classes} classes, {len(rows)} layers ('*': default)")
    print(f"  {'LAYER':<{width}}  {'CHANNELS':>8}  {'MAP':>9}  RECEPTIVE FIELD")
    for r in rows:
        where = f"{r['map'][0]}x{r['map'][1]}" if r["map"] else "vector"
        rf = r["receptive_field"]
        field = f"{rf[0]}x{rf[1]} px" if rf else "whole image"
        mark = "*" if r["default"] else " "
        sys.stdout.write(f"{mark} {r['layer']:<{width}}  {r['channels']:>8}  {where:>9}  {field}\n")
    return 0
