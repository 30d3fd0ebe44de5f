"""``zfatlas runs list``, ``zfatlas atlas show|export|diff`` and ``zfatlas serve``: asking the
artifact store questions, from the shell or over HTTP.

Every command takes ``--store URI`` (a path, file:// or s3://bucket/prefix; default
``$ZFATLAS_STORE``, else ``$ZFATLAS_API_STORE``, else ./artifacts) and ``--endpoint-url`` for
S3-compatible servers (named here by the operator, so it gets this process's AWS credentials).
Exit codes: 0 success; 2 bad input (unknown run, layer or channel, malformed date or URI, a local
store folder that does not exist: one line on stderr); 1 the store failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.store import Store

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
DEFAULT_STORE = "./artifacts"


def default_store() -> str:
    """The store a command uses without ``--store``: ``$ZFATLAS_STORE``, else the server's
    ``$ZFATLAS_API_STORE`` (one variable set for both on a machine that serves), else ./artifacts."""
    return os.environ.get("ZFATLAS_STORE") or os.environ.get("ZFATLAS_API_STORE") or DEFAULT_STORE


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=default_store(), metavar="URI",
                   help="artifact store: path, file:// or s3://bucket/prefix (default: $ZFATLAS_STORE, "
                   f"else $ZFATLAS_API_STORE, else {DEFAULT_STORE}; now %(default)s)")
    p.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")


def register(sub: argparse._SubParsersAction) -> None:
    runs = sub.add_parser("runs", help="list committed runs in an artifact store")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    p = runs_sub.add_parser("list", help="committed runs, oldest first")
    p.add_argument("--kind", help="only runs of this kind (atlas, train, ...)")
    p.add_argument("--since", metavar="DATE",
                   help="only runs committed at or after DATE (ISO 8601; UTC when no zone is given)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _store_args(p)
    p.set_defaults(func=runs_list)

    atlas = sub.add_parser("atlas", help="query, export and diff feature atlases")
    atlas_sub = atlas.add_subparsers(dest="atlas_command", required=True, metavar="COMMAND")
    p = atlas_sub.add_parser("show", help="the top-k rows of one channel, with their image keys")
    p.add_argument("run", help="atlas run id")
    p.add_argument("--layer", required=True, help="layer name, as runs list shows it (e.g. conv5, layer4)")
    p.add_argument("--channel", required=True, type=int, help="channel number (0-based)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _store_args(p)
    p.set_defaults(func=atlas_show)

    p = atlas_sub.add_parser("export", help="copy one layer (rows, PNGs, raw projections) to a folder")
    p.add_argument("run", help="atlas run id")
    p.add_argument("--layer", required=True, help="layer name, as runs list shows it")
    p.add_argument("--out", required=True, metavar="DIR", help="destination folder (or s3:// prefix)")
    _store_args(p)
    p.set_defaults(func=atlas_export)

    p = atlas_sub.add_parser("diff", help="per-channel changes between two atlases, most changed first")
    p.add_argument("run_a", help="atlas run id (before)")
    p.add_argument("run_b", help="atlas run id (after)")
    p.add_argument("--layer", action="append", dest="layers", metavar="LAYER",
                   help="compare only this layer (repeatable; default: all common layers)")
    p.add_argument("--store-b", metavar="URI", help="store of RUN_B when it is not in --store")
    p.add_argument("--out", metavar="FILE", help="also write the full table as Parquet (path or s3:// URI)")
    p.add_argument("--limit", type=int, default=30, help="rows printed (default 30; 0: all)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _store_args(p)
    p.set_defaults(func=atlas_diff)

    p = sub.add_parser(
        "serve", help="HTTP API and web atlas viewer over an artifact store",
        description="Serve the HTTP API and the web atlas viewer over an artifact store. Every "
        "setting is also read from ZFATLAS_API_* environment variables (ZFATLAS_API_STORE, "
        "_ENDPOINT_URL, _HOST, _PORT, _TOKEN, ... ; see the README); a flag given here overrides "
        "its variable. The token is only ever read from the environment.",
        epilog="examples:\n  zfatlas serve --store s3://bucket/atlases\n"
        "  ZFATLAS_API_PORT=9000 ZFATLAS_API_TOKEN=... zfatlas serve",
    )
    p.add_argument("--store", metavar="URI",
                   help="artifact store (default: $ZFATLAS_API_STORE, else $ZFATLAS_STORE, else "
                   f"{DEFAULT_STORE})")
    p.add_argument("--endpoint-url", metavar="URL",
                   help="S3-compatible endpoint (default: $ZFATLAS_API_ENDPOINT_URL)")
    p.add_argument("--host", help="address to bind (default: $ZFATLAS_API_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: $ZFATLAS_API_PORT, else 8000; 0: any free port)")
    p.set_defaults(func=serve)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"zfatlas: {message}", file=sys.stderr)
    return code


def _open_store(uri: str, endpoint_url: str | None) -> Store:
    from jobs.store import open_store

    if endpoint_url:
        from jobs.store.s3 import trust_endpoint

        trust_endpoint(endpoint_url)  # given on this command line: the operator's own endpoint
    return open_store(uri, endpoint_url)


def _open_source(uri: str, endpoint_url: str | None) -> Store:
    """A store to read from: a local folder must exist (a typo is an error, not an empty store)."""
    from jobs.store import LocalStore

    store = _open_store(uri, endpoint_url)
    if isinstance(store, LocalStore):
        store.check_readable()
    return store


def _parse_since(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r} is not an ISO 8601 date or time (e.g. 2024-05-01)") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    try:
        moment.astimezone(timezone.utc)  # runs are compared in UTC
    except OverflowError:
        raise ValueError(f"--since {text!r} is outside the times that can be compared in UTC") from None
    return moment


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list | tuple):
            return ",".join(str(v) for v in value) or "-"
        return "-" if value is None else str(value)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _print_json_lines(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        print(json.dumps(row, default=str))


def _run(func: Any, args: argparse.Namespace) -> int:
    """Call ``func(args)``, mapping the errors a user can fix to exit 2 and store failures to 1."""
    from jobs.results.query import QueryError
    from jobs.store import StoreError
    from jobs.store.local import StoreNotFoundError

    try:
        return func(args)
    except QueryError as exc:
        return _fail(str(exc))
    except StoreNotFoundError as exc:  # a store that is not there: a wrong --store, the user's to fix
        return _fail(str(exc).splitlines()[0])
    except StoreError as exc:
        return _fail(str(exc).splitlines()[0], EXIT_FAILED)
    except ValueError as exc:  # malformed URI, date or key
        return _fail(str(exc).splitlines()[0])


def runs_list(args: argparse.Namespace) -> int:
    def body(args: argparse.Namespace) -> int:
        from jobs.results.query import list_runs

        since = _parse_since(args.since) if args.since else None
        runs = list_runs(_open_source(args.store, args.endpoint_url), args.kind, since)
        if args.json:
            _print_json_lines(runs)
        elif runs:
            columns = ["kind", "run_id", "name", "committed_at", "model_arch", "images", "layers"]
            _print_table(runs, columns)
        else:
            print("no committed runs", file=sys.stderr)
        return 0

    return _run(body, args)


def atlas_show(args: argparse.Namespace) -> int:
    def body(args: argparse.Namespace) -> int:
        from jobs.results.query import AtlasReader

        reader = AtlasReader(_open_source(args.store, args.endpoint_url), args.run)
        rows = reader.channel(args.layer, args.channel).to_pylist()
        if args.json:
            _print_json_lines(rows)
            return 0
        for r in rows:
            r["box"] = f"{r['box_top']},{r['box_left']} {r['box_height']}x{r['box_width']}"
            r["yx"] = f"{r['y']},{r['x']}"
        print(f"atlas {args.run}  {args.layer}  channel {args.channel}")
        if rows and rows[0].get("dead"):
            print("  this channel never fired on the dataset: nothing to show")
        _print_table(rows, ["rank", "activation", "image_id", "label", "yx", "box"])
        if reader.format >= 2:
            if rows and not rows[0].get("dead"):
                key = reader.table_key("images", args.layer, args.channel)
                export = f"zfatlas atlas export {args.run} --layer {args.layer} --out DIR"
                print(f"images: {reader.store.uri_of(f'{reader.prefix}/{key}')} (rows of channel "
                      f"{args.channel}); `{export}` writes them as PNG files")
        else:
            for r in rows:
                print(f"  rank {r['rank']}: {reader.store.uri_of(r['patch_key'])}  "
                      f"{reader.store.uri_of(r['projection_key'])}")
        return 0

    return _run(body, args)


def atlas_export(args: argparse.Namespace) -> int:
    def body(args: argparse.Namespace) -> int:
        from jobs.results.query import AtlasReader

        reader = AtlasReader(_open_source(args.store, args.endpoint_url), args.run)
        result = reader.export_layer(args.layer, _open_store(args.out, args.endpoint_url))
        print(f"exported {args.layer} of {args.run}: {result.rows} rows, {result.files} files to "
              f"{result.destination}")
        return 0

    return _run(body, args)


def atlas_diff(args: argparse.Namespace) -> int:
    def body(args: argparse.Namespace) -> int:
        from jobs.results.diff import diff_atlases, write_diff
        from jobs.results.query import AtlasReader
        from jobs.store import store_for_file

        if args.limit < 0:
            raise ValueError("--limit must be >= 0")
        store_a = _open_source(args.store, args.endpoint_url)
        store_b = _open_source(args.store_b, args.endpoint_url) if args.store_b else store_a
        diff = diff_atlases(AtlasReader(store_a, args.run_a), AtlasReader(store_b, args.run_b), args.layers)
        rows = diff.table.to_pylist()
        shown = rows[: args.limit] if args.limit else rows
        if args.json:
            _print_json_lines(shown)
        else:
            for message in diff.warnings:
                print(f"warning: {message}", file=sys.stderr)
            counts = ", ".join(f"{n} {s}" for s, n in diff.counts().items())
            print(f"atlas diff {diff.run_a} -> {diff.run_b}  ({', '.join(diff.layers)}): {counts}")
            _print_table(shown, ["rank", "layer", "channel", "status", "shared_topk", "top_activation_a",
                                 "top_activation_b", "delta_activation", "relative_change"])
            if len(shown) < len(rows):
                print(f"... {len(rows) - len(shown)} more rows (--limit 0 prints all)")
        if args.out:
            out_store, key = store_for_file(args.out, args.endpoint_url)
            where = write_diff(diff, out_store, key)
            print(f"diff table written to {where}", file=sys.stderr if args.json else sys.stdout)
        return 0

    return _run(body, args)


def serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from services.http.settings import Settings

    try:
        # Other settings (the token above all) come from ZFATLAS_API_* environment variables, never
        # from the command line, where other users of the machine could read them.
        given = {"store": args.store, "endpoint_url": args.endpoint_url, "host": args.host, "port": args.port}
        flags = {name: value for name, value in given.items() if value is not None}
        if "store" not in flags and not os.environ.get("ZFATLAS_API_STORE"):
            flags["store"] = default_store()
        settings = Settings(**flags)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        return _fail(f"{where}: {first['msg']}")
    import uvicorn

    from jobs.store import StoreError
    from jobs.store.local import StoreNotFoundError
    from services.server import create_server

    try:
        # Bucket, credentials, a folder that is not there: fail now. Only read access is needed,
        # so a read-only store is served as it is; nothing is created.
        store = _open_store(settings.store, settings.endpoint_url)
        store.check_readable()
    except StoreNotFoundError as exc:
        return _fail(f"{str(exc).splitlines()[0]} (check --store)")
    except StoreError as exc:
        return _fail(str(exc).splitlines()[0], EXIT_FAILED)
    app = create_server(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0
