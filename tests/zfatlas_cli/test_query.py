"""``zfatlas runs list`` and ``zfatlas atlas show|export|diff`` on real atlases (local store) and on
S3; bad input gives one line on stderr and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jobs.results.diff import DIFF_SCHEMA
from jobs.results.query import AtlasReader
from jobs.store import open_store
from tests.fixtures.synthetic_atlas import synthetic_rows, write_atlas
from zfatlas_cli.main import main

pytestmark = pytest.mark.ray


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_runs_list_and_atlas_show(real_atlases, capsys):
    store = ["--store", real_atlases.store]
    code, out, _ = run_cli(capsys, "runs", "list", "--kind", "atlas", *store)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["kind", "run_id", "name"]
    assert [line.split()[1] for line in lines[1:]] == ["before", "after"]
    code, out, _ = run_cli(capsys, "runs", "list", "--since", "2999-01-01", "--json", *store)
    assert code == 0 and out == ""

    code, out, _ = run_cli(capsys, "atlas", "show", "after", "--layer", "conv5", "--channel", "37", *store)
    assert code == 0
    rows = out.splitlines()[2:-1]
    assert len(rows) == 9 and [r.split()[0] for r in rows] == [str(i) for i in range(9)]
    images = out.splitlines()[-1]  # a format-3 atlas: its images are rows of a table part
    part = AtlasReader(open_store(real_atlases.store), "after").table_key("images", "conv5", 37)
    assert part.startswith("images/conv5/part-")
    assert images.startswith(f"images: {real_atlases.store}") and f"atlas/after/{part}" in images
    code, out, _ = run_cli(capsys, "atlas", "show", "after", "--layer", "conv5", "--channel", "37", "--json",
                           *store)
    first = json.loads(out.splitlines()[0])
    assert first["rank"] == 0 and first["image_id"].startswith("proc-") and first["dead"] is False
    assert open_store(real_atlases.store).exists(f"atlas/after/{part}")


def test_atlas_export_and_diff(real_atlases, capsys, tmp_path):
    store = ["--store", real_atlases.store]
    export = ["atlas", "export", "before", "--layer", "conv1", "--out", str(tmp_path / "x")]
    code, out, _ = run_cli(capsys, *export, *store)
    assert code == 0 and "288 rows" in out
    table = pq.read_table(tmp_path / "x" / "features.parquet")
    assert (tmp_path / "x" / table.column("patch_grid_key")[0].as_py()).is_file()

    out_file = tmp_path / "reports" / "drift.parquet"
    code, out, _ = run_cli(capsys, "atlas", "diff", "before", "after", "--limit", "5", "--out", str(out_file),
                           *store)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("atlas diff before -> after  (conv1, conv5):")
    assert lines[1].split()[:4] == ["rank", "layer", "channel", "status"]
    assert [line.split()[0] for line in lines[2:7]] == ["1", "2", "3", "4", "5"]
    assert "91 more rows" in lines[7] and str(out_file) in lines[8]
    written = pq.read_table(out_file)
    assert written.schema.remove_metadata().equals(DIFF_SCHEMA) and written.num_rows == 96


def test_s3_store(capsys, s3_endpoint, s3_bucket):
    uri = f"s3://{s3_bucket}/art"
    write_atlas(open_store(uri, s3_endpoint), "s3a", synthetic_rows("s3a"), images=False)
    remote = ["--store", uri, "--endpoint-url", s3_endpoint]
    code, out, _ = run_cli(capsys, "runs", "list", "--json", *remote)
    assert code == 0 and json.loads(out)["run_id"] == "s3a"
    code, out, _ = run_cli(capsys, "atlas", "show", "s3a", "--layer", "conv1", "--channel", "2", *remote)
    # A format-1 atlas (one PNG object per image): the table, then each rank's object URIs.
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 + 9 + 9
    uris = [line.strip() for line in lines[11:]]
    assert all(uri.startswith(f"rank {r}: s3://{s3_bucket}/art") for r, uri in enumerate(uris))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["atlas", "show", "nope", "--layer", "conv1", "--channel", "0"], "no committed atlas run 'nope'"),
        (["atlas", "show", "after", "--layer", "conv9", "--channel", "0"], "has no layer 'conv9'"),
        (["atlas", "show", "after", "--layer", "conv1", "--channel", "32"], "channels 0..31, not 32"),
        (["atlas", "show", "../after", "--layer", "conv1", "--channel", "0"], "bad run id"),
        (["atlas", "export", "after", "--layer", "fc6", "--out", "/tmp/never"], "has no layer 'fc6'"),
        (["atlas", "diff", "after", "nope"], "no committed atlas run 'nope'"),
        (["atlas", "diff", "after", "before", "--layer", "conv2"], "not in both"),
        (["runs", "list", "--since", "last tuesday"], "not an ISO 8601 date"),
        (["runs", "list", "--kind", "a/b"], "bad kind"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(real_atlases, capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv, "--store", real_atlases.store)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_bad_store_uri_exits_2_from_the_console_script(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "zfatlas_cli.main", "runs", "list", "--store", "ftp://host/x"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("zfatlas: unsupported URI scheme 'ftp'")
    assert len(result.stderr.strip().splitlines()) == 1
