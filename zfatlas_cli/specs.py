"""``zfatlas validate``, ``zfatlas schema`` and ``zfatlas run``: job specs from the command line.

Exit codes: 0 success; 2 a spec problem (unreadable file, bad YAML, invalid field: one line per
problem on stderr, ``field.path: reason``); 1 the job or the store failed; 130 interrupted (Ctrl-C:
nothing is committed; a training run keeps its checkpoints and the same spec resumes from them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from zfatlas_cli.failures import fail, fail_with
from zfatlas_cli.output import EXIT_INTERRUPTED, quiet_ray

if TYPE_CHECKING:
    from jobs.specs.base import SpecBase

log = logging.getLogger("zfatlas.specs")

EXIT_SPEC = 2
EXIT_FAILED = 1


def register(sub: argparse._SubParsersAction) -> None:
    set_help = "override one field, e.g. --set k=16 --set dataset.num_images=500 (repeatable)"

    p = sub.add_parser("validate", help="check a spec and print it with every default filled in")
    p.add_argument("spec", help="spec file (YAML or JSON), or - for stdin")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help=set_help
    )
    p.set_defaults(func=validate)

    p = sub.add_parser("schema", help="print the JSON Schema of a job kind (for editor completion)")
    p.add_argument("kind", help="train, atlas, occlusion, invariance, correspondence, probe, or all")
    p.set_defaults(func=schema)

    p = sub.add_parser(
        "run",
        help="run a spec and print where its run is stored",
        description="Run a job spec on Ray (the cluster in RAY_ADDRESS, else a local Ray bound to "
        "127.0.0.1) and print where its run is stored. A run's id comes from its spec: running a "
        "committed spec again does nothing and prints the run. Progress bars go to stderr.",
        epilog="examples:\n"
        "  zfatlas run examples/atlas-small.yaml\n"
        "  zfatlas run examples/atlas-small.yaml --set k=16 --output s3://bucket/atlases\n"
        "  zfatlas run examples/train-small.yaml --json | jq .checkpoint_uri",
    )
    p.add_argument("spec", help="spec file (YAML or JSON), or - for stdin")
    p.add_argument("--output", metavar="URI", help="artifact store to use instead of the spec's output")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help=set_help
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--json", action="store_true",
        help="print the committed run's summary (id, location, model, dataset, layers, timings) as one "
        "JSON object instead of its location",
    )
    p.add_argument(
        "--wait", type=float, default=0, metavar="SECONDS",
        help="if another writer holds the run, wait up to this long for it to commit (default: stop at "
        "once, naming it)",
    )
    p.set_defaults(func=run)


def load_spec_or_report(args: argparse.Namespace) -> SpecBase | None:
    """The spec named by args.spec (a path or - for stdin) with args.overrides applied, or None
    after printing one line per problem to stderr (the caller exits 2)."""
    # jobs.kinds (and through zfcore, torch) is imported only when a command runs: `zfatlas --help`
    # and the other command groups stay fast.
    from jobs.kinds import load_spec
    from jobs.specs.base import SpecError

    source = sys.stdin.read() if args.spec == "-" else args.spec
    try:
        if args.spec == "-" and "\n" not in source:
            source += "\n"  # a one-line document must still be read as text, not as a file name
        return load_spec(source, args.overrides)
    except SpecError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def validate(args: argparse.Namespace) -> int:
    from jobs.specs.loading import dump_yaml

    spec = load_spec_or_report(args)
    if spec is None:
        return EXIT_SPEC
    sys.stdout.write(dump_yaml(spec))
    return 0


def schema(args: argparse.Namespace) -> int:
    from jobs.kinds import schema as json_schema
    from jobs.specs.base import SpecError

    try:
        doc = json_schema(args.kind)
    except SpecError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return EXIT_SPEC
    print(json.dumps(doc, indent=2))
    return 0


def run_json(manifest: dict[str, Any], location: str) -> dict[str, Any]:
    """What ``zfatlas run --json`` prints: the run's summary as ``runs list --json`` gives it, its
    location and, for a training run, its final checkpoint."""
    from jobs.results.query import run_summary

    doc = {**run_summary(manifest), "uri": location}
    if manifest.get("checkpoint_uri"):
        doc["checkpoint_uri"] = manifest["checkpoint_uri"]
    doc["images_skipped"] = manifest.get("images_skipped", 0)
    doc["timings"] = manifest.get("timings")
    return doc


def interrupted(spec: SpecBase, output: str | None) -> int:
    """After Ctrl-C: one line saying what is left of the run, exit 130."""
    from jobs.kinds import job_kind
    from jobs.runner import run_location
    from jobs.specs.loading import spec_run_id
    from jobs.store import open_store, run_prefix

    name = f"{spec.kind}/{spec_run_id(spec)}"
    kept = False
    if job_kind(spec.kind).resumable:
        try:
            store = open_store(output or spec.output, spec.endpoint_url)
            kept = bool(store.list_keys(run_prefix(spec.kind, spec_run_id(spec)) + "/"))
        except Exception:  # the store is what failed: nothing to say about it
            kept = False
    if kept:
        where = run_location(spec, output)
        return fail(f"interrupted; {name} is not committed, what it wrote is kept at {where}: run the "
                    "same spec again to resume", EXIT_INTERRUPTED)
    return fail(f"interrupted; {name} is not committed and left nothing behind", EXIT_INTERRUPTED)


def run(args: argparse.Namespace) -> int:
    from jobs.runner import ray_submission_id, run_location, run_spec
    from jobs.specs.base import SpecError
    from jobs.store import StoreError
    from jobs.submission.submit import prepare

    spec = load_spec_or_report(args)
    if spec is None:
        return EXIT_SPEC
    if ray_submission_id():
        # A Ray Jobs API entrypoint runs in its unpacked working_dir, which Ray (2.60) may remove
        # while the job runs (seen when the driver connects); torch reads the current directory
        # when its compiler stack loads. The spec is read: pin its paths and leave that folder.
        spec = prepare(spec)
        os.chdir(tempfile.gettempdir())
    quiet_ray()
    try:
        manifest = run_spec(spec, output=args.output, quiet=args.quiet, wait_s=args.wait)
    except KeyboardInterrupt:
        return interrupted(spec, args.output)
    except SpecError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return EXIT_SPEC
    except StoreError as exc:
        return fail(str(exc).splitlines()[0])
    except Exception as exc:  # the job failed: one line (the traceback with -v), nothing committed
        return fail_with(exc, args.verbose)
    # Unreadable images are reported by the job itself (one warning) and listed in the manifest.
    location = run_location(spec, args.output)
    if args.json:
        print(json.dumps(run_json(manifest, location), default=str))
    else:
        print(location)
    return 0
