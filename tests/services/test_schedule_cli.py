"""``zfatlas schedule ...`` on a scheduler database: add, list with next fire times, pause, resume,
remove, history; bad input is one ``zfatlas: field: reason`` line per problem and exit 2."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import yaml

from services.scheduler.db import ScheduleDB
from services.scheduler.scheduler import Scheduler
from tests.services.recording import ManualClock, RecordingCluster
from zfatlas_cli.main import main

SPEC = {
    "kind": "atlas",
    "name": "nightly",
    "model": {"arch": "zfnet-small", "checkpoint": "latest:s3://models/zfnet-small/"},
    "dataset": {"format": "procedural", "num_images": 100},
    "layers": ["conv1"],
}


def test_schedule_lifecycle_from_the_command_line(tmp_path, capsys):
    db, spec = str(tmp_path / "s.db"), tmp_path / "nightly.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    add = ["schedule", "add", "nightly", "--cron", "0 2 * * *", "--tz", "Europe/Berlin", "--spec", str(spec)]
    assert main([*add, "--set", "k=4", "--concurrency", "replace", "--max-attempts", "2", "--db", db]) == 0
    out = capsys.readouterr().out
    assert out.startswith("added nightly: 0 2 * * * (Europe/Berlin); next: ") and out.count("02:00 CE") == 3

    assert main([*add, "--db", db]) == 1  # the name is taken
    assert "already exists" in capsys.readouterr().err

    assert main(["schedule", "list", "--db", db, "--json"]) == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["spec"]["k"] == 4 and listed["concurrency"] == "replace"
    assert listed["retry"]["max_attempts"] == 2 and len(listed["next_fire_times"]) == 3
    assert listed["spec"]["model"]["checkpoint"] == "latest:s3://models/zfnet-small/"

    assert main(["schedule", "pause", "nightly", "--db", db]) == 0
    assert capsys.readouterr().out == "nightly: paused\n"
    assert main(["schedule", "list", "--db", db]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "CRON", "TIME"] and " paused " in table[-1]
    assert main(["schedule", "resume", "nightly", "--db", db]) == 0
    assert main(["schedule", "list", "--db", db]) == 0
    assert " active " in capsys.readouterr().out.splitlines()[-1]

    # A few scheduled runs, then the history shows each with its status and Ray job.
    start = datetime(2026, 1, 5, 0, 30, tzinfo=timezone.utc)
    with ScheduleDB(db).transaction() as tx:  # the same schedule, as if added at `start`
        config = tx.schedule("nightly").config
        tx.delete_schedule("nightly")
        tx.insert_schedule(config, start)
    cluster = RecordingCluster(auto_finish="SUCCEEDED")
    resolve = lambda prefix, _: prefix + "m.pt"  # noqa: E731 - the newest checkpoint, without S3
    Scheduler(ScheduleDB(db), cluster, ManualClock(start), idle_s=86400, resolve=resolve).run(
        until=datetime(2026, 1, 6, 1, 0, 30, tzinfo=timezone.utc)
    )
    capsys.readouterr()
    assert main(["schedule", "history", "nightly", "--db", db]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:4] == ["2026-01-06T01:00:00Z", "nightly-20260106T0100Z", "succeeded", "1"]
    assert rows[2].split()[:3] == ["2026-01-05T01:00:00Z", "nightly-20260105T0100Z", "succeeded"]
    assert cluster.jobs["nightly-20260105T0100Z"].spec.model.checkpoint == "s3://models/zfnet-small/m.pt"

    assert main(["schedule", "remove", "nightly", "--db", db]) == 0
    assert main(["schedule", "remove", "nightly", "--db", db]) == 1
    assert capsys.readouterr().out == "nightly: removed\n"
    assert main(["schedule", "history", "nightly", "--db", db, "--json"]) == 0  # history outlives it
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_bad_schedules_are_refused_with_one_line_per_problem(tmp_path, capsys):
    db, spec = str(tmp_path / "s.db"), tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "layers": ["conv9"], "run_id": "fixed"}))
    assert main(["schedule", "add", "n", "--cron", "0 2 * * *", "--spec", str(spec), "--db", db]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("zfatlas: run_id: set by the scheduler")
    assert err[1].startswith("zfatlas: layers.0: unknown layer")

    spec.write_text(yaml.safe_dump(SPEC))
    assert main(["schedule", "add", "n", "--cron", "every night", "--spec", str(spec), "--db", db]) == 2
    assert capsys.readouterr().err.startswith("zfatlas: cron: 'every night' is not a five-field cron")
    # Well-formed, but the 30th of February never comes: refused, naming the field, and not stored.
    assert main(["schedule", "add", "n", "--cron", "0 0 30 2 *", "--spec", str(spec), "--db", db]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zfatlas: cron: '0 0 30 2 *' never fires") and err.count("\n") == 1
    with ScheduleDB(db).reading() as tx:
        assert tx.schedules() == []
    assert (
        main(
            ["schedule", "add", "n", "--cron", "0 2 * * *", "--tz", "Berlin", "--spec", str(spec), "--db", db]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("zfatlas: timezone: unknown time zone 'Berlin'")
    assert main(["schedule", "pause", "nope", "--db", db]) == 1
    assert capsys.readouterr().err.startswith("zfatlas: no schedule 'nope' in ")
