"""The scheduler with an injected clock: fire times, exactly-once across restarts and replicas,
catch-up, concurrency and retry policies. The cluster is an in-memory recording of submissions
(tests/services/recording.py) except in the last test, which fires through the real Ray Jobs API
on the loopback cluster."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from jobs.store import open_store, read_manifest
from jobs.submission.ray_jobs import JobsAPIError, job_info, jobs_client, list_jobs
from services.scheduler.cron import fire_times_between, next_fire_times
from services.scheduler.db import ScheduleDB
from services.scheduler.model import RetryPolicy, ScheduleConfig, run_id_for
from services.scheduler.scheduler import Scheduler
from services.scheduler.submitter import AlreadySubmittedError, RayJobsSubmitter
from services.scheduler.template import render
from tests.services.recording import ManualClock, RecordingCluster
from zfcore.zfnet import build

T0 = datetime(2026, 1, 5, 12, 0, 30, tzinfo=timezone.utc)  # 30 s past a minute


def utc(hour: int, minute: int, second: int = 0, day: int = 5) -> datetime:
    return datetime(2026, 1, day, hour, minute, second, tzinfo=timezone.utc)


TEMPLATE = {
    "kind": "atlas",
    "name": "nightly",
    "model": {"arch": "zfnet-small"},
    "dataset": {"format": "procedural", "num_images": 100, "seed": 1},
    "layers": ["conv1"],
    "resources": {"workers": 1, "batch_size": 50},
}


def add(db: ScheduleDB, now: datetime, name: str = "every-minute", cron: str = "* * * * *", **policy) -> None:
    with db.transaction() as tx:
        tx.insert_schedule(
            ScheduleConfig(name=name, cron=cron, spec=policy.pop("spec", TEMPLATE), **policy), now
        )


def history(db: ScheduleDB, name: str = "every-minute") -> dict[str, str]:
    with db.reading() as tx:
        return {r.run_id: r.status for r in reversed(tx.runs(schedule=name))}


def minute_ids(name: str, *minutes: int) -> list[str]:
    return [run_id_for(name, utc(12, m)) for m in minutes]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "scheduler.db"


def scheduler(db_path: Path, cluster: RecordingCluster, clock: ManualClock, **options) -> Scheduler:
    # A new ScheduleDB per scheduler: a restarted process or another replica opens the file anew.
    return Scheduler(ScheduleDB(db_path), cluster, clock, **options)


# --- cron -----------------------------------------------------------------------------------


def test_cron_fire_times_follow_the_time_zone_and_fire_a_wall_clock_time_once():
    # 02:00 New York is 07:00 UTC in winter and 06:00 UTC in summer.
    before_dst = datetime(2026, 3, 6, 12, tzinfo=timezone.utc)
    assert next_fire_times("0 2 * * *", "America/New_York", before_dst, 3) == [
        datetime(2026, 3, 7, 7, tzinfo=timezone.utc),
        datetime(2026, 3, 8, 7, tzinfo=timezone.utc),  # 02:00 does not exist that day: 03:00 EDT
        datetime(2026, 3, 9, 6, tzinfo=timezone.utc),
    ]
    # 01:30 happens twice when clocks go back (1 Nov 2026): it fires once.
    fall = datetime(2026, 10, 31, 12, tzinfo=timezone.utc)
    assert next_fire_times("30 1 * * *", "America/New_York", fall, 2) == [
        datetime(2026, 11, 1, 5, 30, tzinfo=timezone.utc),
        datetime(2026, 11, 2, 6, 30, tzinfo=timezone.utc),
    ]
    # Bounds: after < t <= until.
    times, truncated = fire_times_between("* * * * *", "UTC", utc(12, 0), utc(12, 3))
    assert times == [utc(12, 1), utc(12, 2), utc(12, 3)] and not truncated
    times, truncated = fire_times_between("* * * * *", "UTC", utc(12, 0), utc(12, 3), limit=2)
    assert times == [utc(12, 2), utc(12, 3)] and truncated


def test_schedule_config_rejects_bad_input_with_field_paths():
    bad = [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * * * * *"}, "five-field"),
        ({"timezone": "Mars/Olympus"}, "time zone"),
        ({"spec": {**TEMPLATE, "run_id": "x"}}, "spec.run_id"),
        ({"spec": {**TEMPLATE, "k": 0}}, "spec.k"),
        ({"spec": {**TEMPLATE, "model": {"checkpoint": "latest:gs://bucket/x"}}}, "spec.model.checkpoint"),
        ({"name": "Nightly Atlas"}, "slug"),
    ]
    for change, expected in bad:
        fields = {"name": "n", "cron": "0 2 * * *", "spec": TEMPLATE, **change}
        with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
            ScheduleConfig(**fields)


# --- firing ---------------------------------------------------------------------------------


def test_every_minute_schedule_fires_once_per_minute(db_path):
    clock, cluster = ManualClock(T0), RecordingCluster(auto_finish="SUCCEEDED")
    sched = scheduler(db_path, cluster, clock)
    add(sched.db, T0)
    sched.run(until=utc(12, 10, 30))

    expected = minute_ids("every-minute", *range(1, 11))
    assert cluster.submit_calls == expected  # one submission per minute, in order, none twice
    assert history(sched.db) == dict.fromkeys(expected, "succeeded")
    job = cluster.jobs[expected[0]]
    assert job.spec.run_id == expected[0] == "every-minute-20260105T1201Z"
    assert job.metadata["zfatlas_scheduled_at"] == "2026-01-05T12:01:00Z"
    # It slept between fires instead of spinning: about one wake-up per minute and per poll.
    assert len(clock.slept) < 10 * 8


@pytest.mark.parametrize(
    "kill_point", ["after_each_fire", "after_claim_before_submit", "after_submit_before_record"]
)
def test_killing_and_restarting_the_scheduler_never_duplicates_a_run(db_path, kill_point):
    class Killed(BaseException):
        """The process dies here (not an Exception: nothing in the scheduler catches it)."""

    clock, cluster = ManualClock(T0), RecordingCluster(auto_finish="SUCCEEDED")
    add(ScheduleDB(db_path), T0)
    if kill_point == "after_each_fire":
        for until in (utc(12, 3, 30), utc(12, 3, 45), utc(12, 6, 30)):
            scheduler(db_path, cluster, clock).run(until=until)  # each run() is a fresh process
    else:
        victim = run_id_for("every-minute", utc(12, 2))

        def die(job_id: str) -> None:
            if job_id == victim and kill_point == "after_submit_before_record":
                raise Killed

        def refuse(spec, submission_id, metadata):
            if submission_id == victim and kill_point == "after_claim_before_submit" and not refused:
                refused.append(submission_id)
                raise Killed
            return RecordingCluster.submit(cluster, spec, submission_id, metadata)

        refused: list[str] = []
        cluster.after_accept = die
        cluster.submit = refuse  # type: ignore[method-assign]
        with pytest.raises(Killed):
            scheduler(db_path, cluster, clock, claim_grace_s=30).run(until=utc(12, 6, 30))
        cluster.after_accept = None
        clock.advance(seconds=45)  # the restart comes after the claim grace
        scheduler(db_path, cluster, clock, claim_grace_s=30).run(until=utc(12, 6, 30))

    expected = minute_ids("every-minute", *range(1, 7))
    assert cluster.accepted == expected  # every minute exactly once
    assert history(ScheduleDB(db_path)) == dict.fromkeys(expected, "succeeded")
    assert len(cluster.submit_calls) == len(expected)  # and never even a refused duplicate


def test_two_replicas_on_one_database_never_duplicate(db_path):
    cluster = RecordingCluster(auto_finish="SUCCEEDED")
    add(ScheduleDB(db_path), T0)
    replicas = [scheduler(db_path, cluster, ManualClock(T0)) for _ in range(4)]
    barrier = threading.Barrier(len(replicas))
    errors: list[BaseException] = []

    def replica(sched: Scheduler) -> None:
        try:
            for minute in range(1, 11):
                sched.clock.current = utc(12, minute, 5)  # type: ignore[attr-defined]
                barrier.wait()  # every replica ticks at the same moment
                sched.tick()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(s,)) for s in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    expected = minute_ids("every-minute", *range(1, 11))
    assert sorted(cluster.accepted) == expected
    assert len(cluster.submit_calls) == len(expected)


# --- catch-up -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "ran"),
    [
        ({"catchup": "none", "starting_deadline_s": 10}, []),
        ({"catchup": "none", "starting_deadline_s": 60}, [10]),
        ({"catchup": "latest"}, [10]),
        ({"catchup": "all", "max_catchup": 3, "concurrency": "allow"}, [8, 9, 10]),
    ],
    ids=["none-past-deadline", "none-within-deadline", "latest", "all-max-3"],
)
def test_runs_missed_while_down_are_caught_up_per_policy(db_path, policy, ran):
    clock, cluster = ManualClock(T0), RecordingCluster()
    add(ScheduleDB(db_path), T0, **policy)
    clock.current = utc(12, 10, 20)  # down from 12:00:30 to 12:10:20: ten fire times passed
    scheduler(db_path, cluster, clock).tick()

    assert cluster.accepted == minute_ids("every-minute", *ran)
    statuses = history(ScheduleDB(db_path))
    assert len(statuses) == 10
    assert [rid for rid, s in statuses.items() if s == "missed"] == minute_ids(
        "every-minute", *(m for m in range(1, 11) if m not in ran)
    )
    # From then on it is on time again: 12:11 fires (with 'forbid', only once 12:10 has finished).
    cluster.finish_all()
    scheduler(db_path, cluster, clock).run(until=utc(12, 11, 0))
    assert cluster.accepted[-1] == run_id_for("every-minute", utc(12, 11))


def test_paused_schedule_does_not_fire_and_resumes_without_catching_up(db_path):
    clock, cluster = ManualClock(T0), RecordingCluster(auto_finish="SUCCEEDED")
    sched = scheduler(db_path, cluster, clock)
    add(sched.db, T0)
    with sched.db.transaction() as tx:
        tx.set_paused("every-minute", True, T0)
    sched.run(until=utc(12, 5, 30))
    assert cluster.accepted == []
    with sched.db.transaction() as tx:
        tx.set_paused("every-minute", False, clock.now())
    sched.run(until=utc(12, 7, 30))
    assert cluster.accepted == minute_ids("every-minute", 6, 7)


# --- concurrency ----------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", ["forbid", "replace", "allow"])
def test_concurrency_policy_holds_while_a_run_is_still_going(db_path, concurrency):
    clock, cluster = ManualClock(T0), RecordingCluster()  # jobs keep running until finished
    sched = scheduler(db_path, cluster, clock)
    add(sched.db, T0, concurrency=concurrency)
    sched.run(until=utc(12, 3, 30))
    first, second, third = minute_ids("every-minute", 1, 2, 3)
    statuses = history(sched.db)

    if concurrency == "forbid":
        assert cluster.accepted == [first]
        assert statuses == {first: "running", second: "skipped", third: "skipped"}
        cluster.finish(first)
        sched.run(until=utc(12, 4, 30))
        assert cluster.accepted == [first, run_id_for("every-minute", utc(12, 4))]
        assert history(sched.db)[first] == "succeeded"
    elif concurrency == "replace":
        assert cluster.accepted == [first, second, third]
        assert cluster.stopped == [first, second]
        assert statuses == {first: "replaced", second: "replaced", third: "running"}
        assert [cluster.jobs[j].status for j in (first, second, third)] == ["STOPPED", "STOPPED", "RUNNING"]
    else:
        assert cluster.accepted == [first, second, third] and cluster.stopped == []
        assert statuses == dict.fromkeys([first, second, third], "running")


# --- retries --------------------------------------------------------------------------------


def test_failed_nightly_run_is_retried_with_backoff_then_reported_failed(db_path):
    start = datetime(2026, 1, 5, 0, 59, tzinfo=timezone.utc)  # 01:59 in Berlin
    clock, cluster = ManualClock(start), RecordingCluster(auto_finish="FAILED")
    sched = scheduler(db_path, cluster, clock, poll_s=10)
    retry = RetryPolicy(max_attempts=3, backoff_s=60, backoff_factor=2)
    add(sched.db, start, name="nightly", cron="0 2 * * *", timezone="Europe/Berlin", retry=retry)
    sched.run(until=start + timedelta(hours=1))

    run_id = run_id_for("nightly", datetime(2026, 1, 5, 1, 0, tzinfo=timezone.utc))  # 02:00 Berlin
    assert cluster.accepted == [run_id, f"{run_id}-attempt2", f"{run_id}-attempt3"]
    with sched.db.reading() as tx:
        [run] = tx.runs(schedule="nightly", with_history=True)
    assert run.status == "failed" and run.attempts == 3
    assert run.message.startswith("failed after 3 attempt(s)")
    earlier, later = run.history[:-1], run.history[1:]
    waits = [(b.claimed_at - a.finished_at).total_seconds() for a, b in zip(earlier, later, strict=True)]
    assert waits == [60, 120]  # backoff, then backoff * factor
    assert [a.status for a in run.history] == ["FAILED"] * 3
    assert cluster.jobs[f"{run_id}-attempt2"].spec.run_id == run_id  # every attempt writes the same run


def test_a_retry_that_succeeds_ends_the_run_succeeded(db_path):
    clock, cluster = ManualClock(T0), RecordingCluster()
    sched = scheduler(db_path, cluster, clock)
    add(sched.db, T0, concurrency="allow", retry=RetryPolicy(max_attempts=2, backoff_s=30))
    sched.run(until=utc(12, 1, 5))
    first = run_id_for("every-minute", utc(12, 1))
    cluster.finish(first, "FAILED", "Job entrypoint command failed with exit code 1")
    sched.run(until=utc(12, 1, 50))
    cluster.finish(f"{first}-attempt2")
    sched.run(until=utc(12, 1, 59))
    with sched.db.reading() as tx:
        run = tx.run(first, with_history=True)
    assert run.status == "succeeded" and run.attempts == 2
    assert "exit code 1" in run.history[0].message


def attempts_of(db: ScheduleDB, run_id: str) -> tuple[str, int, list[str], str]:
    with db.reading() as tx:
        run = tx.run(run_id, with_history=True)
    return run.status, run.attempts, [a.status for a in run.history], run.message or ""


def test_an_unreachable_cluster_is_a_failed_attempt_retried_after_its_backoff(db_path):
    clock, cluster = ManualClock(T0), RecordingCluster(auto_finish="SUCCEEDED", unreachable=True)
    sched = scheduler(db_path, cluster, clock)
    add(sched.db, T0, retry=RetryPolicy(max_attempts=3, backoff_s=60))
    first = run_id_for("every-minute", utc(12, 1))
    sched.run(until=utc(12, 1, 30))  # 12:01 fires; nothing gets through
    status, attempts, history_, message = attempts_of(sched.db, first)
    assert (status, attempts, history_) == ("retrying", 1, ["UNCONFIRMED"])
    assert message == "submission not confirmed: connection refused"

    cluster.unreachable = False
    sched.run(until=utc(12, 2, 30))  # attempt 2 at 12:02, after asking whether attempt 1 got through
    assert cluster.accepted == [f"{first}-attempt2"]
    assert attempts_of(sched.db, first)[:3] == ("succeeded", 2, ["NOT_SUBMITTED", "SUCCEEDED"])
    assert history(sched.db)[run_id_for("every-minute", utc(12, 2))] == "skipped"  # forbid: 12:01 was active


def test_a_submission_whose_answer_was_lost_is_followed_not_submitted_again(db_path):
    """The Jobs API took the job but the answer never came back: the retry finds the job on the
    cluster and follows it; the run never has a second job."""
    clock, cluster = ManualClock(T0), RecordingCluster(auto_finish="SUCCEEDED")
    first = run_id_for("every-minute", utc(12, 1))

    def lose_the_answer(job_id: str) -> None:
        if job_id == first:
            raise JobsAPIError("read timed out")

    cluster.after_accept = lose_the_answer
    sched = scheduler(db_path, cluster, clock)
    add(sched.db, T0, retry=RetryPolicy(max_attempts=3, backoff_s=30))
    sched.run(until=utc(12, 1, 10))
    assert attempts_of(sched.db, first)[:3] == ("retrying", 1, ["UNCONFIRMED"])

    cluster.after_accept = None
    cluster.unreachable = True  # when attempt 2 is due the cluster cannot say: it is not sent
    sched.run(until=utc(12, 1, 40))
    status, attempts, history_, message = attempts_of(sched.db, first)
    assert (status, attempts, history_) == ("retrying", 2, ["UNCONFIRMED", "UNREACHABLE"])
    assert "whether attempt 1 reached the cluster" in message

    cluster.unreachable = False  # attempt 3 is due at 12:02:30: attempt 1 is found and followed
    sched.run(until=utc(12, 2, 40))
    assert cluster.submit_calls == [first] and cluster.accepted == [first]
    assert attempts_of(sched.db, first)[:3] == ("succeeded", 2, ["SUCCEEDED", "UNREACHABLE"])


# --- the spec template ----------------------------------------------------------------------


def test_latest_checkpoint_is_resolved_when_the_schedule_fires(db_path, tmp_path):
    models = tmp_path / "models"
    clock, cluster = ManualClock(T0), RecordingCluster(auto_finish="SUCCEEDED")
    sched = scheduler(db_path, cluster, clock, claim_grace_s=30)
    spec = {**TEMPLATE, "model": {"arch": "zfnet-small", "checkpoint": f"latest:{models}/"}}
    add(sched.db, T0, spec=spec, retry=RetryPolicy(max_attempts=2, backoff_s=20))

    sched.run(until=utc(12, 1, 5))  # no checkpoint yet: the attempt fails, a retry is planned
    first = run_id_for("every-minute", utc(12, 1))
    with sched.db.reading() as tx:
        run = tx.run(first, with_history=True)
    assert run.status == "retrying" and "no checkpoint" in run.history[0].message

    state = build("zfnet-small").state_dict()
    for i, name in enumerate(["a/old.pt", "b/new.pt", "c/notes.txt"]):
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, models / name)
        os.utime(models / name, (1_700_000_000 + i, 1_700_000_000 + i))
    sched.run(until=utc(12, 1, 30))
    assert cluster.jobs[f"{first}-attempt2"].spec.model.checkpoint == str(models / "b/new.pt")
    (models / "a/old.pt").touch()  # now the newest
    sched.run(until=utc(12, 2, 30))
    assert cluster.jobs[run_id_for("every-minute", utc(12, 2))].spec.model.checkpoint == str(
        models / "a/old.pt"
    )


# --- for real -------------------------------------------------------------------------------


@pytest.mark.ray
def test_a_schedule_fires_once_through_the_ray_jobs_api(ray_cluster, tmp_path, monkeypatch):
    """One real submission: the scheduled atlas runs on the loopback cluster, its manifest and
    its Ray job name each other, and neither a second replica nor a direct duplicate submission
    gets a second job."""
    models, out = tmp_path / "models", tmp_path / "store"
    models.mkdir()
    torch.save(build("zfnet-small").state_dict(), models / "shipped.pt")
    spec = {
        **TEMPLATE,
        "model": {"arch": "zfnet-small", "checkpoint": f"latest:{models}"},
        "output": str(out),
    }
    start = datetime.now(timezone.utc).replace(second=30, microsecond=0)
    clock = ManualClock(start)
    submitter = RayJobsSubmitter(ray_cluster.dashboard_url)
    sched = Scheduler(ScheduleDB(tmp_path / "s.db"), submitter, clock, poll_s=5)
    add(sched.db, start, name="nightly-real", spec=spec)
    fire = start.replace(second=0) + timedelta(minutes=1)
    run_id = run_id_for("nightly-real", fire)

    clock.current = fire + timedelta(seconds=1)
    sched.tick()
    Scheduler(ScheduleDB(tmp_path / "s.db"), submitter, clock).tick()  # a second replica: nothing to do
    with pytest.raises(AlreadySubmittedError):  # Ray itself refuses a second job with the run's id
        submitter.submit(render(spec, run_id), run_id, {})

    deadline = time.monotonic() + 240
    while history(sched.db, "nightly-real")[run_id] in ("pending", "running"):
        assert time.monotonic() < deadline, "the scheduled job did not finish"
        time.sleep(2)
        clock.advance(seconds=5)
        sched.follow(clock.now())
    assert history(sched.db, "nightly-real") == {run_id: "succeeded"}

    client = jobs_client(ray_cluster.dashboard_url)
    job = job_info(client, run_id)
    assert job.status == "SUCCEEDED" and job.run_id == run_id
    assert job.metadata["zfatlas_schedule"] == "nightly-real"
    assert [j.job_id for j in list_jobs(client) if j.job_id.startswith("nightly-real-")] == [run_id]
    manifest = read_manifest(open_store(str(out)), "atlas", run_id)
    assert manifest["ray_job_id"] == run_id
    assert manifest["spec"]["model"]["checkpoint"] == str(models / "shipped.pt")
