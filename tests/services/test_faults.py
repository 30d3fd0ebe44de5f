"""Faults and hostile input at the two HTTP servers (``zfatlas serve``'s API, ``zfatlas scheduler
serve``) and in the scheduler (issue 13): huge bodies, foreign Host headers, symlinks out of the
store, times with no UTC equivalent, jobs that would write or send credentials where they should
not, a cron for a date that never comes, an unreachable Ray Jobs API, stores that are missing or
read-only. Everything runs for real: uvicorn on 127.0.0.1, real sockets, a real Ray Jobs API client
against a port where nothing listens."""

from __future__ import annotations

import json
import os
import select
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi import APIRouter

from jobs.store import open_store
from services.api.app import create_app
from services.http.settings import Settings
from services.scheduler.app import create_scheduler_app
from services.scheduler.db import ScheduleDB
from services.scheduler.model import RetryPolicy, ScheduleConfig, run_id_for
from services.scheduler.scheduler import Scheduler
from services.scheduler.service import SchedulerService, SchedulerSettings
from services.scheduler.submitter import RayJobsSubmitter
from services.server import create_server
from tests.fixtures.api_server import serve
from tests.fixtures.listener import Listener, free_port
from tests.fixtures.synthetic_atlas import synthetic_rows, write_atlas
from tests.services.recording import ManualClock, RecordingCluster
from zfatlas_cli.main import main

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HUGE = 256 << 20  # 256 MiB, streamed, never allocated
SECRET = b"root:x:0:0:root:/root:/bin/bash\n"
SPEC = {
    "kind": "atlas",
    "name": "nightly",
    "dataset": {"format": "procedural", "num_images": 100},
    "layers": ["conv1"],
}
T0 = datetime(2026, 1, 5, 12, 0, 30, tzinfo=timezone.utc)


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    try:
        yield server
    finally:
        server.close()


def post_streamed(url: str, path: str, *, declared: bool) -> tuple[int, int, bytes]:
    """POST a 256 MiB body to ``url + path`` without a token, from a socket fed 64 KiB at a time
    (announced by Content-Length, or chunked with none), stopping when the server answers. Returns
    the status, the bytes of body sent by then, and the response head."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {HUGE}\r\n" if declared else "Transfer-Encoding: chunked\r\n"
    sock.sendall(f"{head}\r\n".encode())
    piece = b"x" * 65536
    frame = piece if declared else b"%x\r\n" % len(piece) + piece + b"\r\n"
    sent, pending, response = 0, memoryview(b""), b""
    sock.setblocking(False)
    try:
        while b"\r\n\r\n" not in response:
            readable, writable, _ = select.select([sock], [sock] if sent < HUGE else [], [], 30)
            if not readable and not writable:
                raise AssertionError(f"no answer after {sent} bytes")
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
                continue
            if not pending:
                pending = memoryview(frame)
            try:
                n = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                continue  # the server stopped reading: its answer is what is left to read
            pending, sent = pending[n:], sent + n
    finally:
        sock.close()
    status = int(response.split(b" ", 2)[1]) if response else 0
    return status, sent, response.split(b"\r\n\r\n")[0]


# --- the two servers --------------------------------------------------------------------------


@pytest.fixture
def store_dir(tmp_path) -> Path:
    """A local store with one committed atlas ``a``, and outside it a file worth stealing."""
    root = tmp_path / "store"
    write_atlas(open_store(str(root)), "a", synthetic_rows("a"))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "passwd").write_bytes(SECRET)
    (tmp_path / "outside" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + SECRET)
    return root


@pytest.fixture
def api_url(store_dir, tmp_path, monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("ZFATLAS_SCHEDULER_DB", str(tmp_path / "api.db"))
    monkeypatch.setenv("ZFATLAS_SCHEDULER_RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")
    with serve(create_server(Settings(store=str(store_dir), token=TOKEN, max_request_bytes=4096))) as url:
        yield url


@pytest.fixture
def service(tmp_path) -> SchedulerService:
    db = str(tmp_path / "scheduler.db")
    return SchedulerService(SchedulerSettings(db=db, ray_address=f"http://127.0.0.1:{free_port()}"))


@pytest.fixture
def scheduler_url(service, store_dir) -> Iterator[str]:
    with serve(create_scheduler_app(service, Settings(store=str(store_dir), token=TOKEN))) as url:
        yield url


@pytest.fixture(params=["api", "scheduler"])
def server(request) -> tuple[str, str]:
    """(base URL, a read endpoint open on loopback) of each server in turn."""
    if request.param == "api":
        return request.getfixturevalue("api_url"), "/api/runs"
    return request.getfixturevalue("scheduler_url"), "/api/schedules"


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_256_mib_body_is_refused_before_it_is_read_and_before_auth(server, declared):
    url, _ = server
    status, sent, head = post_streamed(url, "/api/schedules", declared=declared)
    assert status == 413, head  # not 401: the body is bounded before the token is even looked at
    # Announced: answered before any of the body is read. Streamed: as soon as it crosses the limit
    # (what was sent meanwhile sits in socket buffers, a few MiB at most).
    assert sent < 32 << 20, sent
    assert b"x-content-type-options: nosniff" in head.lower()


def test_a_foreign_host_header_is_refused_by_both_servers(server):
    url, read = server
    with httpx.Client(base_url=url, timeout=30) as http:
        for name in ("evil.example.com", "evil.example.com:8000", "127.0.0.1.evil.example.com", "0.0.0.0"):
            refused = http.get(read, headers={"Host": name})
            assert refused.status_code == 400, (name, refused.text)
            assert "ZFATLAS_API_ALLOWED_HOSTS" in refused.json()["detail"]
        change = http.post("/api/schedules", json={}, headers={**AUTH, "Host": "evil.example.com"})
        assert change.status_code == 400
        for name in ("127.0.0.1", "127.0.0.1:1234", "localhost", "LOCALHOST:80", "[::1]", "[::1]:8000"):
            assert http.get(read, headers={"Host": name}).status_code == 200, name


def test_more_host_names_are_allowed_by_setting(store_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ZFATLAS_API_ALLOWED_HOSTS", "atlas.example.org, *.corp.example")
    settings = Settings(store=str(store_dir))
    assert settings.allowed_hosts == ["atlas.example.org", "*.corp.example"]
    app = create_server(settings, store=open_store(str(store_dir)))
    with serve(app) as url, httpx.Client(base_url=url) as http:
        for name, code in [("atlas.example.org:8000", 200), ("viewer.corp.example", 200),
                           ("corp.example", 400), ("atlas.example.org.evil.example", 400)]:
            assert http.get("/api/runs", headers={"Host": name}).status_code == code, name
    assert Settings(host="10.1.2.3", token=TOKEN).host_allowed("10.1.2.3:8000")  # the bound address
    assert not Settings(host="0.0.0.0", token=TOKEN).host_allowed("10.1.2.3:8000")
    with pytest.raises(ValueError, match="not a host name"):
        Settings(allowed_hosts=["http://atlas.example.org/"])


def test_every_response_says_nosniff_and_may_not_be_framed(store_dir, scheduler_url):
    broken = APIRouter()

    @broken.get("/api/broken")
    def fail() -> None:
        raise RuntimeError("a bug")

    app = create_app(Settings(store=str(store_dir), token=TOKEN, max_request_bytes=1024), routers=[broken])
    with serve(app) as api_url:
        answers = [
            httpx.get(f"{api_url}/"),  # the viewer
            httpx.get(f"{api_url}/static/viewer.js"),
            httpx.get(f"{api_url}/api/runs"),
            httpx.get(f"{api_url}/api/images/atlas/a/summary/conv1.png"),
            httpx.get(f"{api_url}/api/atlases/nope"),  # 404
            httpx.get(f"{api_url}/api/runs", params={"limit": 0}),  # 422
            httpx.get(f"{api_url}/api/runs", headers={"Host": "evil.example.com"}),  # 400
            httpx.post(f"{api_url}/api/diffs", content=b"x" * 2048, headers=AUTH),  # 413
            httpx.post(f"{api_url}/api/diffs", json={}),  # 401
            httpx.get(f"{api_url}/api/broken"),  # 500
            httpx.get(f"{scheduler_url}/healthz"),
            httpx.get(f"{scheduler_url}/api/schedules/nope"),
        ]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 404, 422, 400, 413, 401, 500, 200, 404]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.url
        assert answer.headers["content-security-policy"] == "frame-ancestors 'none'", answer.url
        assert answer.headers["x-frame-options"] == "DENY", answer.url


def test_a_symlink_in_a_committed_run_is_never_followed_out_of_the_store(store_dir, api_url):
    outside = store_dir.parent / "outside"
    summary = store_dir / "atlas" / "a" / "summary"
    (summary / "evil.png").symlink_to(outside / "passwd")
    (summary / "evil-relative.png").symlink_to(Path("../../../..") / "outside" / "x.png")
    (store_dir / "atlas" / "a" / "linked").symlink_to(outside, target_is_directory=True)
    (summary / "alias.png").symlink_to("conv1.png")  # a link that stays inside: served
    with httpx.Client(base_url=api_url, timeout=30) as http:
        for key in ("atlas/a/summary/evil.png", "atlas/a/summary/evil-relative.png", "atlas/a/linked/x.png"):
            answer = http.get(f"/api/images/{key}")
            assert answer.status_code == 404, key
            assert b"root:x:" not in answer.content
        alias = http.get("/api/images/atlas/a/summary/alias.png")
        assert alias.status_code == 200 and alias.content == (summary / "conv1.png").read_bytes()
        assert http.get("/api/runs").json()["total"] == 1


def test_a_time_with_no_utc_equivalent_is_bad_input_not_a_crash(store_dir, api_url, capsys):
    for since in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        answer = httpx.get(f"{api_url}/api/runs", params={"since": since})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"] == ["query", "since"]
        assert main(["runs", "list", "--since", since, "--store", str(store_dir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("zfatlas: --since") and "UTC" in err and err.count("\n") == 1
    earliest = httpx.get(f"{api_url}/api/runs", params={"since": "0001-01-02T00:00:00+14:00"})
    assert earliest.json()["total"] == 1


# --- what may be submitted over HTTP ----------------------------------------------------------


def test_submitted_jobs_write_only_under_the_servers_store_and_name_no_stray_fields(
    scheduler_url, store_dir, listener
):
    with httpx.Client(base_url=scheduler_url, timeout=30, headers=AUTH) as http:
        typo = http.post("/api/jobs", json={"spec": SPEC, "overides": ["k=4"]})
        assert typo.status_code == 422 and "overides" in typo.text

        for body in ({"spec": {**SPEC, "output": "/etc/zfatlas"}}, {"spec": SPEC, "output": "/etc/zfatlas"},
                     {"spec": {**SPEC, "output": f"{store_dir}/../elsewhere"}},
                     {"spec": SPEC, "overrides": ["output=s3://someone-elses-bucket/x"]}):
            refused = http.post("/api/jobs", json=body)
            assert refused.status_code == 422, body
            [problem] = refused.json()["problems"]
            assert problem.startswith("output: ") and "outside this server's store" in problem

        stray = http.post("/api/jobs", json={"spec": {**SPEC, "endpoint_url": listener.url}})
        assert stray.status_code == 422
        assert stray.json()["problems"] == [
            f"endpoint_url: {listener.url} is not an allowed S3 endpoint (set ZFATLAS_S3_ENDPOINTS here "
            "and where the job runs)"
        ]
        # Inside the store (or with no output: the store itself) the spec is fine: it reaches for
        # the cluster, which is not there.
        for body in ({"spec": SPEC}, {"spec": {**SPEC, "output": str(store_dir / "nightly")}}):
            assert http.post("/api/jobs", json=body).status_code == 502, body

        schedule = {"name": "nightly", "cron": "0 2 * * *", "spec": SPEC}
        elsewhere = http.post("/api/schedules", json={**schedule, "spec": {**SPEC, "output": "/tmp/x"}})
        assert elsewhere.status_code == 422 and elsewhere.json()["problems"][0].startswith("spec.output: ")
        added = http.post("/api/schedules", json=schedule)
        assert added.status_code == 201 and added.json()["spec"]["output"] == str(store_dir)
    assert listener.connections == 0 and listener.received == b""


def test_other_outputs_are_allowed_by_setting(service, store_dir, tmp_path):
    other = tmp_path / "shared"
    allowed = [str(other), "s3://team-bucket/atlases"]
    settings = Settings(store=str(store_dir), token=TOKEN, allowed_outputs=allowed)
    app = create_scheduler_app(service, settings)
    with serve(app) as url, httpx.Client(base_url=url, headers=AUTH) as http:
        for output, code in [(str(other / "x"), 502), ("s3://team-bucket/atlases/nightly", 502),
                             ("s3://team-bucket/atlases-old", 422), (str(tmp_path / "sharedish"), 422)]:
            assert http.post("/api/jobs", json={"spec": SPEC, "output": output}).status_code == code, output


# --- the scheduler ----------------------------------------------------------------------------


def test_a_cron_for_a_date_that_never_comes_is_refused(scheduler_url, tmp_path, capsys):
    bad = {"name": "leap", "cron": "0 0 30 2 *", "spec": SPEC}
    answer = httpx.post(f"{scheduler_url}/api/schedules", json=bad, headers=AUTH)
    assert answer.status_code == 422
    [problem] = answer.json()["detail"]
    assert problem["loc"] == ["body", "cron"] and "never fires" in problem["msg"]
    assert httpx.get(f"{scheduler_url}/api/schedules").json() == []

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    db = str(tmp_path / "cli.db")
    assert main(["schedule", "add", "leap", "--cron", "0 0 31 4 *", "--spec", str(spec), "--db", db]) == 2
    assert capsys.readouterr().err == (
        "zfatlas: cron: '0 0 31 4 *' never fires: no date matches its day and month fields\n"
    )


def test_a_bad_row_in_an_old_database_stops_no_other_schedule(service, scheduler_url, capsys):
    """A row stored before crons were checked (or edited by hand) is listed with its problem and
    never fired; every other schedule fires as before."""
    db = service.db
    with db.transaction() as tx:
        tx.insert_schedule(ScheduleConfig(name="every-minute", cron="* * * * *", spec=SPEC), T0)
    raw = ScheduleConfig(name="aaa-leap", cron="0 2 * * *", spec=SPEC).model_dump(mode="json")
    with sqlite3.connect(db.path) as conn:  # as an older zfatlas stored it: sorted before the good one
        conn.execute("INSERT INTO schedules VALUES (?, ?, 0, ?, ?)",
                     ("aaa-leap", json.dumps({**raw, "cron": "0 0 30 2 *"}), "2026-01-01T00:00:00Z",
                      "2026-01-01T00:00:00Z"))
        conn.execute("INSERT INTO schedules VALUES (?, ?, 0, ?, ?)",
                     ("aab-garbage", "{not json", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"))

    cluster = RecordingCluster(auto_finish="SUCCEEDED")
    Scheduler(db, cluster, ManualClock(T0)).run(until=T0 + timedelta(minutes=3))
    assert cluster.accepted == [run_id_for("every-minute", T0.replace(second=0) + timedelta(minutes=m))
                                for m in (1, 2, 3)]

    listed = httpx.get(f"{scheduler_url}/api/schedules")
    assert listed.status_code == 200
    by_name = {s["name"]: s for s in listed.json()}
    assert "never fires" in by_name["aaa-leap"]["problem"] and by_name["aaa-leap"]["next_fire_times"] == []
    assert by_name["aab-garbage"]["problem"].startswith("unreadable configuration")
    assert by_name["every-minute"]["problem"] is None and len(by_name["every-minute"]["next_fire_times"]) == 3
    one = httpx.get(f"{scheduler_url}/api/schedules/aaa-leap").json()
    assert one["problem"] == by_name["aaa-leap"]["problem"]

    assert main(["schedule", "list", "--db", str(db.path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert " invalid " in rows["aaa-leap"] and "never fires" in rows["aaa-leap"]
    assert " active " in rows["every-minute"]
    assert main(["schedule", "remove", "aaa-leap", "--db", str(db.path)]) == 0  # and it can be cleaned up
    assert httpx.delete(f"{scheduler_url}/api/schedules/aab-garbage", headers=AUTH).status_code == 204
    assert [s["name"] for s in httpx.get(f"{scheduler_url}/api/schedules").json()] == ["every-minute"]


def test_an_unreachable_jobs_api_is_retried_with_backoff_then_failed(tmp_path):
    """The real Ray Jobs API client against a loopback port where nothing listens: every attempt
    fails, is retried after its backoff, and the run ends failed with the reason; under 'allow'
    no run is left pending."""
    address = f"http://127.0.0.1:{free_port()}"
    clock = ManualClock(T0)
    sched = Scheduler(ScheduleDB(tmp_path / "s.db"), RayJobsSubmitter(address), clock)
    retry = RetryPolicy(max_attempts=3, backoff_s=30, backoff_factor=2)
    with sched.db.transaction() as tx:
        tx.insert_schedule(ScheduleConfig(name="nightly", cron="* * * * *", spec=SPEC,
                                          concurrency="allow", retry=retry), T0)
    sched.run(until=T0 + timedelta(minutes=4))

    with sched.db.reading() as tx:
        runs = {r.run_id: r for r in tx.runs(schedule="nightly", with_history=True)}
    assert len(runs) == 4 and not [r for r in runs.values() if r.status == "pending"]
    first = runs[run_id_for("nightly", T0.replace(second=0) + timedelta(minutes=1))]
    assert first.status == "failed" and first.attempts == 3
    assert first.message.startswith("failed after 3 attempt(s): ")
    assert f"Ray Jobs API at {address}" in first.message  # the reason, naming the address
    assert [a.status for a in first.history] == ["UNCONFIRMED", "UNREACHABLE", "UNREACHABLE"]
    pairs = zip(first.history, first.history[1:], strict=False)
    waits = [(b.claimed_at - a.finished_at).total_seconds() for a, b in pairs]
    assert waits == [30, 60]
    assert all(r.status in ("retrying", "failed") for r in runs.values())


# --- stores that are missing or read-only -----------------------------------------------------


def test_serve_and_runs_list_refuse_a_store_folder_that_does_not_exist(tmp_path, capsys):
    typo = tmp_path / "artifcats"
    assert main(["serve", "--store", str(typo), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err == f"zfatlas: no store at {typo}: the folder does not exist (check --store)\n"
    assert not typo.exists()  # and nothing was created
    assert main(["runs", "list", "--store", str(typo)]) == 2
    assert capsys.readouterr().err == f"zfatlas: no store at {typo}: the folder does not exist\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["runs", "list", "--store", str(empty)]) == 0  # there, but empty: not an error
    assert "no committed runs" in capsys.readouterr().err


def test_serve_serves_a_read_only_store(store_dir):
    for folder, _, files in os.walk(store_dir):
        for name in files:
            Path(folder, name).chmod(0o444)
        Path(folder).chmod(0o555)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZFATLAS_API_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "zfatlas_cli.main", "serve", "--store", str(store_dir), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "zfatlas serve did not start"
                time.sleep(0.5)
        assert answer.status_code == 200 and [r["run_id"] for r in answer.json()["items"]] == ["a"]
    finally:
        server.terminate()
        server.wait(30)
        for folder, _, _ in os.walk(store_dir):
            Path(folder).chmod(stat.S_IRWXU)

