"""The scheduler's HTTP router under uvicorn on 127.0.0.1, through a real HTTP client: schedules and
submission behind the API's bearer token, on the scheduler's own app and mounted in the main API
app."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone

import httpx
import pytest

from services.http.settings import Settings
from services.scheduler.app import create_scheduler_app
from services.scheduler.model import ScheduleConfig
from services.scheduler.scheduler import Scheduler
from services.scheduler.service import SchedulerService, SchedulerSettings
from services.server import create_server
from tests.fixtures.api_server import serve
from tests.services.recording import ManualClock, RecordingCluster

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Nothing listens there: any request that reached for the cluster would fail with 502.
NO_CLUSTER = "http://127.0.0.1:9"
SPEC = {
    "kind": "atlas",
    "name": "nightly",
    "dataset": {"format": "procedural", "num_images": 100},
    "layers": ["conv1"],
}
SCHEDULE = {"name": "nightly", "cron": "0 2 * * *", "timezone": "Europe/Berlin", "spec": SPEC}


@pytest.fixture
def service(tmp_path) -> SchedulerService:
    return SchedulerService(SchedulerSettings(db=str(tmp_path / "s.db"), ray_address=NO_CLUSTER))


@pytest.fixture
def client(service) -> Iterator[httpx.Client]:
    # serve() runs without the app's lifespan: the scheduling loop does not start.
    with (
        serve(create_scheduler_app(service, Settings(token=TOKEN))) as url,
        httpx.Client(base_url=url) as http,
    ):
        yield http


def test_schedules_need_the_token_to_change_and_show_their_next_fire_times(client):
    assert client.post("/api/schedules", json=SCHEDULE).status_code == 401
    assert (
        client.post("/api/schedules", json=SCHEDULE, headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )

    created = client.post("/api/schedules", json=SCHEDULE, headers=AUTH)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "nightly" and body["concurrency"] == "forbid" and body["catchup"] == "latest"
    times = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t in body["next_fire_times"]]
    assert len(times) == 3 and all(t.minute == 0 and t.hour in (0, 1) for t in times)  # 02:00 Berlin
    assert client.post("/api/schedules", json=SCHEDULE, headers=AUTH).status_code == 409

    listed = client.get("/api/schedules", params={"next": 5}).json()  # reads: open on loopback
    assert [s["name"] for s in listed] == ["nightly"] and len(listed[0]["next_fire_times"]) == 5

    assert client.post("/api/schedules/nightly/pause").status_code == 401
    paused = client.post("/api/schedules/nightly/pause", headers=AUTH).json()
    assert paused["paused"] is True and paused["next_fire_times"] == []
    assert client.post("/api/schedules/nightly/resume", headers=AUTH).json()["paused"] is False

    assert client.delete("/api/schedules/nightly").status_code == 401
    assert client.delete("/api/schedules/nightly", headers=AUTH).status_code == 204
    assert client.get("/api/schedules/nightly").status_code == 404
    assert client.post("/api/schedules/nightly/pause", headers=AUTH).status_code == 404


def test_a_bad_schedule_is_rejected_with_the_field_that_is_wrong(client):
    bad = {**SCHEDULE, "cron": "0 25 * * *", "spec": {**SPEC, "k": 0}}
    answer = client.post("/api/schedules", json=bad, headers=AUTH)
    assert answer.status_code == 422
    problems = {tuple(e["loc"]): e["msg"] for e in answer.json()["detail"]}
    assert ("body", "cron") in problems and "spec.k" in problems[("body", "spec")]


def test_history_lists_each_run_with_its_attempts(client, service):
    clock, cluster = ManualClock(datetime(2026, 1, 5, 0, 30, tzinfo=timezone.utc)), RecordingCluster()
    with service.db.transaction() as tx:
        tx.insert_schedule(ScheduleConfig(**SCHEDULE), clock.now())
    Scheduler(service.db, cluster, clock).run(until=datetime(2026, 1, 5, 1, 0, 5, tzinfo=timezone.utc))

    [run] = client.get("/api/schedules/nightly/history").json()
    assert run["run_id"] == "nightly-20260105T0100Z" and run["status"] == "running"
    assert run["scheduled_at"] == "2026-01-05T01:00:00Z"
    assert [a["ray_job_id"] for a in run["history"]] == ["nightly-20260105T0100Z"]


def test_submission_validates_before_it_reaches_for_the_cluster(client):
    assert client.post("/api/jobs", json={"spec": SPEC}).status_code == 401
    bad = client.post("/api/jobs", json={"spec": {**SPEC, "layers": ["conv9"]}}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["problems"] == [
        "layers.0: unknown layer 'conv9' (did you mean 'conv5'?); "
        "model 'zfnet-small' has conv1, conv2, conv3, conv4, conv5, fc6, fc7"
    ]
    bad_set = client.post("/api/jobs", json={"spec": SPEC, "overrides": ["k=0"]}, headers=AUTH)
    assert bad_set.status_code == 422 and bad_set.json()["problems"][0].startswith("k: ")
    # A valid spec does reach for the cluster, which is not there: a gateway error, not a crash.
    unreachable = client.post("/api/jobs", json={"spec": SPEC}, headers=AUTH)
    assert unreachable.status_code == 502 and "Ray Jobs API" in unreachable.json()["detail"]


def test_the_router_is_mounted_in_the_main_api_app(tmp_path, monkeypatch):
    monkeypatch.setenv("ZFATLAS_SCHEDULER_DB", str(tmp_path / "api.db"))
    monkeypatch.setenv("ZFATLAS_SCHEDULER_RAY_ADDRESS", NO_CLUSTER)
    app = create_server(Settings(store=str(tmp_path / "store"), token=TOKEN))
    with serve(app) as url, httpx.Client(base_url=url) as api:
        assert api.post("/api/schedules", json=SCHEDULE, headers=AUTH).status_code == 201
        assert [s["name"] for s in api.get("/api/schedules").json()] == ["nightly"]
        paths = api.get("/openapi.json").json()["paths"]
    assert (tmp_path / "api.db").is_file()
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/schedules/{name}/history"} <= set(paths)
