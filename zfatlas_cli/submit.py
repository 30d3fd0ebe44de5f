"""``zfatlas submit`` and ``zfatlas jobs list|status|logs|stop``: specs on a Ray cluster.

The cluster is named by ``--address`` (the Jobs API, ``http://HEAD:8265``), else by
``RAY_API_SERVER_ADDRESS``, else ``http://127.0.0.1:8265``. Exit codes: 0 success; 2 a spec problem
(nothing is submitted); 1 the cluster could not be reached or refused; ``jobs status`` and
``submit --wait`` also exit 1 when the job did not succeed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from zfatlas_cli.specs import EXIT_FAILED, EXIT_SPEC, load_spec_or_report

if TYPE_CHECKING:
    from jobs.specs.base import SpecBase
    from jobs.submission.ray_jobs import JobSummary

log = logging.getLogger("zfatlas.submit")

POLL_S = 2.0


def register(sub: argparse._SubParsersAction) -> None:
    address_help = (
        "Ray Jobs API, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)"
    )

    p = sub.add_parser("submit", help="validate a spec locally, submit it to a Ray cluster, print the job id")
    p.add_argument("spec", help="spec file (YAML or JSON), or - for stdin")
    p.add_argument("--address", help=address_help)
    p.add_argument("--output", metavar="URI", help="artifact store to use instead of the spec's output")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one field, e.g. --set k=16 (repeatable)",
    )
    p.add_argument(
        "--py-module",
        dest="py_modules",
        action="append",
        default=[],
        metavar="DIR",
        help="a Python package folder to ship with the job, e.g. your model's for "
        "model.arch: mypkg.models:build (repeatable; it is also importable here, for validation)",
    )
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 unless it succeeded")
    p.set_defaults(func=submit)

    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    p = jobs_sub.add_parser("list", help="submitted jobs, newest first")
    p.add_argument("--address", help=address_help)
    p.add_argument("--all", action="store_true", help="also jobs not submitted by zfatlas")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=list_jobs)

    p = jobs_sub.add_parser("status", help="a job's status (exit 1 if it failed or was stopped)")
    p.add_argument("job_id", help="the Ray job's submission id, as submit printed it (or jobs list shows)")
    p.add_argument("--address", help=address_help)
    p.add_argument("--json", action="store_true",
                   help="print the whole job (times, entrypoint, message, run) as JSON")
    p.set_defaults(func=status)

    p = jobs_sub.add_parser("logs", help="a job's output")
    p.add_argument("job_id", help="the Ray job's submission id, as submit printed it (or jobs list shows)")
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=logs)

    p = jobs_sub.add_parser("stop", help="stop a job")
    p.add_argument("job_id", help="the Ray job's submission id, as submit printed it (or jobs list shows)")
    p.add_argument("--address", help=address_help)
    p.set_defaults(func=stop)


def _fail(exc: Exception) -> int:
    print(f"zfatlas: {exc}", file=sys.stderr)
    return EXIT_FAILED


def submit(args: argparse.Namespace) -> int:
    from jobs.specs.base import SpecError
    from jobs.submission.ray_jobs import JobsAPIError, job_info, jobs_client
    from jobs.submission.submit import prepare
    from jobs.submission.submit import submit as submit_spec

    packages = []
    for folder in args.py_modules:
        path = Path(folder).expanduser().resolve()
        if not (path / "__init__.py").is_file():
            print(f"--py-module: {folder} is not a Python package folder (no __init__.py)", file=sys.stderr)
            return EXIT_SPEC
        packages.append(str(path))
        sys.path.insert(0, str(path.parent))  # the spec's model.arch may name it: validate here too
    spec = load_spec_or_report(args)
    if spec is None:
        return EXIT_SPEC
    try:
        job = prepare(spec, args.output)  # a bad --output is a spec problem, found before connecting
    except (SpecError, ValueError) as exc:
        print(f"output: {exc}", file=sys.stderr)
        return EXIT_SPEC
    committed = committed_location(job)
    if committed is not None:
        # The job would find its run committed and do nothing: say so, and start nothing.
        print(f"{job.kind}/{job.run_id} is already committed: nothing submitted", file=sys.stderr)
        print(committed)
        return 0
    try:
        client = jobs_client(args.address)
        job_id = submit_spec(spec, output=args.output, client=client, py_modules=packages)
    except JobsAPIError as exc:
        return _fail(exc)
    print(job_id)
    if not args.wait:
        return 0
    try:
        while not (job := job_info(client, job_id)).finished:
            time.sleep(POLL_S)
    except JobsAPIError as exc:
        return _fail(exc)
    print(job.status)
    return 0 if job.status == "SUCCEEDED" else EXIT_FAILED


def committed_location(job: SpecBase) -> str | None:
    """Where the prepared spec's run is committed, if this machine can see its store and it is;
    None otherwise (a store only the cluster reaches is the job's to check)."""
    from jobs.store import MANIFEST, StoreError, open_store, run_prefix

    try:
        store = open_store(job.output, job.endpoint_url)
        prefix = run_prefix(job.kind, str(job.run_id))
        if not store.exists(f"{prefix}/{MANIFEST}"):
            return None
    except (StoreError, ValueError, OSError) as exc:
        log.info("could not look for a committed run before submitting (%s); submitting", exc)
        return None
    return store.uri_of(prefix)


def _row(job: JobSummary) -> str:
    started = job.start_time.strftime("%Y-%m-%d %H:%M:%S") if job.start_time else "-"
    return f"{job.job_id:<40} {job.status:<10} {started:<19}  {job.kind or '-':<12} {job.run_id or '-'}"


def list_jobs(args: argparse.Namespace) -> int:
    from jobs.submission.ray_jobs import JobsAPIError, jobs_client
    from jobs.submission.ray_jobs import list_jobs as query

    try:
        jobs = query(jobs_client(args.address), zfatlas_only=not args.all)
    except JobsAPIError as exc:
        return _fail(exc)
    if args.json:
        for job in jobs:
            print(json.dumps(job.to_dict()))
        return 0
    print(f"{'JOB ID':<40} {'STATUS':<10} {'STARTED (UTC)':<19}  {'KIND':<12} RUN ID")
    for job in jobs:
        print(_row(job))
    return 0


def status(args: argparse.Namespace) -> int:
    from jobs.submission.ray_jobs import JobsAPIError, job_info, jobs_client

    try:
        job = job_info(jobs_client(args.address), args.job_id)
    except JobsAPIError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(job.to_dict(), indent=2))
    else:
        print(f"{job.job_id} {job.status}")  # one line, for scripts; --json has the rest
        if job.status in ("FAILED", "STOPPED") and job.message:
            print(f"zfatlas: {job.message.strip().splitlines()[-1]}", file=sys.stderr)
    return EXIT_FAILED if job.status in ("FAILED", "STOPPED") else 0


def logs(args: argparse.Namespace) -> int:
    from jobs.submission.ray_jobs import JobsAPIError, follow_logs, job_logs, jobs_client

    try:
        client = jobs_client(args.address)
        if args.follow:
            follow_logs(client, args.job_id, lambda chunk: (sys.stdout.write(chunk), sys.stdout.flush()))
        else:
            sys.stdout.write(job_logs(client, args.job_id))
    except JobsAPIError as exc:
        return _fail(exc)
    return 0


def stop(args: argparse.Namespace) -> int:
    from jobs.submission.ray_jobs import JobsAPIError, jobs_client, stop_job

    try:
        stopped = stop_job(jobs_client(args.address), args.job_id)
    except JobsAPIError as exc:
        return _fail(exc)
    print(f"{args.job_id} {'stopping' if stopped else 'already finished'}")
    return 0
