"""``zfatlas dataset pack`` and ``zfatlas dataset index``: moving a dataset to the formats that
read fastest, and indexing WebDataset shards made elsewhere.

Exit codes: 0 success; 2 bad input (a location, format or option that cannot be used, a dataset
with no images); 1 anything else (the store failed).
"""

from __future__ import annotations

import argparse

from zfatlas_cli.failures import EXIT_BAD_INPUT, fail, fail_with


def _failed(exc: Exception, verbose: int) -> int:
    """A failure as the command's one line: bad input (a ValueError that is no store failure)
    exits 2, anything else 1 (with the traceback under ``-v``)."""
    from jobs.store import StoreError

    if isinstance(exc, ValueError) and not isinstance(exc, StoreError):
        return fail(str(exc), EXIT_BAD_INPUT)
    return fail_with(exc, verbose)


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("dataset", help="pack a dataset into WebDataset shards or Parquet; index shards")
    commands = group.add_subparsers(dest="dataset_command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "pack",
        help="copy a dataset into WebDataset shards or Hugging Face-style Parquet",
        description="Copy every image of SRC (original bytes, labels, ids; stable order) into OUT as "
        "WebDataset .tar shards (with index sidecars) or Hugging Face-style Parquet, local or s3://. "
        "The same SRC always packs to the same bytes.",
        epilog="examples:\n"
        "  zfatlas dataset pack ./imagenet/train s3://bucket/imagenet-wds --format webdataset\n"
        "  zfatlas dataset pack s3://bucket/train s3://bucket/train-pq --format parquet --shard-size 5000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="the dataset: a path, file:// or s3:// URI")
    p.add_argument("out", help="where to write the shards: a folder or s3://bucket/prefix")
    p.add_argument("--format", required=True, choices=["webdataset", "parquet"], help="what to write")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per file (1000)")
    p.add_argument(
        "--src-format", choices=["imagefolder", "parquet", "webdataset"], default=None,
        help="SRC's format (default: parquet for a .parquet file, webdataset for a .tar, else imagefolder)",
    )
    p.add_argument("--image-column", default="image", help="SRC Parquet image column")
    p.add_argument("--label-column", default="label", help="SRC Parquet label column / .json label field")
    p.add_argument("--id-column", default=None, help="SRC Parquet id column / .json id field")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for SRC and OUT")
    p.set_defaults(func=pack_command)

    p = commands.add_parser(
        "index",
        help="write index sidecars for WebDataset shards, so opening them reads no shard",
        description="Read every .tar shard at URI that has no usable index sidecar once and write its "
        "<shard>.tar.zfatlas-index beside it. Without sidecars a job reads every shard once when it "
        "opens the dataset, on the driver and on each worker.",
    )
    p.add_argument("uri", help="one .tar, a folder of them, or a folder/name-prefix")
    p.add_argument("--label-column", default="label", help=".json label field (default: label)")
    p.add_argument("--id-column", default=None, help=".json id field (default: id, else the key)")
    p.add_argument("--force", action="store_true", help="rewrite sidecars that are already usable")
    p.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint")
    p.set_defaults(func=index_command)


def _trust(endpoint_url: str | None) -> None:
    if endpoint_url:
        from jobs.store.s3 import trust_endpoint

        trust_endpoint(endpoint_url)  # given on this command line: the operator's own endpoint


def _guess_format(uri: str) -> str:
    lower = uri.lower().rstrip("/")
    if lower.endswith((".parquet", ".parq", ".pq")):
        return "parquet"
    return "webdataset" if lower.endswith(".tar") else "imagefolder"


def pack_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from jobs.datasets import open_dataset
    from jobs.datasets.pack import pack
    from jobs.specs.base import DatasetSpec
    from jobs.specs.loading import format_error
    from jobs.uris import parse_uri

    if args.shard_size < 1:
        return fail(f"--shard-size must be at least 1, got {args.shard_size}", EXIT_BAD_INPUT)
    _trust(args.endpoint_url)
    try:
        parse_uri(args.out)
        spec = DatasetSpec(
            format=args.src_format or _guess_format(args.src), uri=args.src, image_column=args.image_column,
            label_column=args.label_column, id_column=args.id_column, limit=args.limit,
        )
    except ValidationError as exc:
        return fail(format_error(DatasetSpec, exc.errors()[0]).replace("uri:", "SRC:", 1), EXIT_BAD_INPUT)
    except ValueError as exc:
        return fail(f"OUT: {exc}", EXIT_BAD_INPUT)
    try:
        # The image size only matters for decoding, which packing never does.
        source = open_dataset(spec, 16, args.endpoint_url)
        result = pack(source, args.out, args.format, shard_size=args.shard_size,
                      endpoint_url=args.endpoint_url, overwrite=args.overwrite)
    except Exception as exc:
        return _failed(exc, args.verbose)
    files = sum(1 for k in result.keys if not k.endswith(".zfatlas-index"))
    print(f"packed {result.images} images ({result.bytes / 2**20:.1f} MiB) into {files} {args.format} "
          f"files at {args.out} in {result.seconds:.1f}s")
    if result.missing:
        print(f"  {len(result.missing)} images had no bytes to copy (kept as empty members, skipped "
              f"when read), e.g. {result.missing[0][0]}: {result.missing[0][1]}")
    print(f"  read it with: dataset: {{format: {args.format}, uri: {args.out}}}")
    return 0


def index_command(args: argparse.Namespace) -> int:
    from jobs.datasets.webdataset import write_sidecars

    _trust(args.endpoint_url)
    try:
        written = write_sidecars(args.uri, args.endpoint_url, args.label_column, args.id_column,
                                 force=args.force)
    except Exception as exc:
        return _failed(exc, args.verbose)
    print(f"wrote {len(written)} index sidecars at {args.uri}")
    return 0
