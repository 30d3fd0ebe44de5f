"""The artifact store, run against both backends: a local folder and a moto S3 server over HTTP."""

from __future__ import annotations

import io
import json
import pickle
from datetime import datetime, timedelta, timezone

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from PIL import Image

from jobs.store import (
    MANIFEST,
    BucketNotFoundError,
    LocalStore,
    MissingKeyError,
    Store,
    StoreError,
    begin_run,
    committed_runs,
    open_store,
    read_manifest,
    read_uri_bytes,
)
from jobs.store.provenance import fingerprint_bytes
from tests.fixtures.crash import killed_writer

SCHEMA = pa.schema(
    [
        pa.field("layer", pa.string(), nullable=False),
        pa.field("channel", pa.int32(), nullable=False),
        pa.field("activation", pa.float32()),
    ]
)
SMALL_THRESHOLD = 5 * 1024 * 1024  # the smallest multipart part size S3 allows


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_uri(request: pytest.FixtureRequest, tmp_path) -> tuple[str, str | None]:
    if request.param == "local":
        return str(tmp_path / "store"), None
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/artifacts", endpoint


@pytest.fixture
def store(store_uri) -> Store:
    uri, endpoint = store_uri
    return open_store(uri, endpoint, **({"multipart_threshold": SMALL_THRESHOLD} if endpoint else {}))


def test_round_trip(store: Store) -> None:
    store.put_bytes("a/b/c.bin", b"hello")
    store.put_bytes("a/d.bin", b"")
    assert store.get_bytes("a/b/c.bin") == b"hello"
    assert store.get_bytes("a/d.bin") == b""
    assert store.exists("a/b/c.bin") and not store.exists("a/b/missing")
    assert store.list_keys() == ["a/b/c.bin", "a/d.bin"]
    assert store.list_keys("a/b/") == ["a/b/c.bin"]
    assert store.list_keys("a/d") == ["a/d.bin"]
    assert [(o.key, o.size) for o in store.list_objects("a/")] == [("a/b/c.bin", 5), ("a/d.bin", 0)]
    assert store.list_dirs("") == ["a"] and store.list_dirs("a/") == ["b"]
    with pytest.raises(MissingKeyError):
        store.get_bytes("nope")
    store.delete_prefix("a/b/")
    assert store.list_keys() == ["a/d.bin"]
    # A store survives pickling (Ray ships it to workers) and reconnects on its own.
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get_bytes("a/d.bin") == b""
    uri = store.uri_of("a/d.bin")
    assert uri.endswith("artifacts/a/d.bin") or uri.endswith("store/a/d.bin")


def test_files_and_uri_reads(store: Store, store_uri, tmp_path) -> None:
    src = tmp_path / "ckpt.bin"
    src.write_bytes(b"weights" * 100)
    store.put_file("ckpt/model.bin", src)
    dst = tmp_path / "back.bin"
    store.get_file("ckpt/model.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    assert read_uri_bytes(store.uri_of("ckpt/model.bin"), store_uri[1]) == src.read_bytes()


def test_a_moved_file_is_in_the_store_and_gone_from_its_folder(store: Store, tmp_path, monkeypatch) -> None:
    src = tmp_path / "table.parquet"
    src.write_bytes(b"rows" * 1000)
    store.move_file("atlas/r/images/conv1.parquet", src)
    assert store.get_bytes("atlas/r/images/conv1.parquet") == b"rows" * 1000
    assert not src.exists()
    if isinstance(store, LocalStore):  # another file system: copied, then the source removed
        import errno
        import os

        real_replace = os.replace

        def cross_device(a, b):  # only the move itself: the copy's own temp-file rename works
            if os.fspath(a) == os.fspath(src):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real_replace(a, b)

        src.write_bytes(b"other")
        monkeypatch.setattr(os, "replace", cross_device)
        store.move_file("atlas/r/images/conv2.parquet", src)
        assert store.get_bytes("atlas/r/images/conv2.parquet") == b"other" and not src.exists()


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a\\b", "a//b", "./a", "", "a/"])
def test_traversal_keys_rejected(store: Store, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(key)


def test_run_ids_cannot_escape(store: Store) -> None:
    with pytest.raises(ValueError):
        begin_run(store, "atlas", "../train")
    with pytest.raises(ValueError):
        begin_run(store, "atlas/x", "r")
    run = begin_run(store, "atlas", "r1")
    for bad in ["../r2/x", "/abs", MANIFEST]:
        with pytest.raises(ValueError):
            run.put_bytes(bad, b"x")


def test_only_committed_runs_are_listed(store: Store) -> None:
    done = begin_run(store, "atlas", "done")
    done.put_bytes("a.txt", b"a")
    manifest = done.commit({"name": "done", "images_seen": np.int64(7)})
    assert manifest["status"] == "committed" and manifest["images_seen"] == 7
    assert manifest["files"] == [{"key": "a.txt", "bytes": 1}]
    assert "package" in manifest["code_version"]

    pending = begin_run(store, "atlas", "pending")
    pending.put_bytes("a.txt", b"a")  # never committed
    other = begin_run(store, "train", "t1")
    other.commit({"name": "t"})

    assert [(r["kind"], r["run_id"], r["name"]) for r in committed_runs(store)] == [
        ("atlas", "done", "done"),
        ("train", "t1", "t"),
    ]
    assert [r["run_id"] for r in committed_runs(store, "atlas")] == ["done"]
    assert committed_runs(store, "occlusion") == []
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert committed_runs(store, since=future) == []
    assert len(committed_runs(store, since=datetime.now(timezone.utc) - timedelta(hours=1))) == 2
    assert read_manifest(store, "atlas", "done") == manifest
    with pytest.raises(MissingKeyError):
        read_manifest(store, "atlas", "pending")


def _write_run(store: Store, run_id: str, n_files: int, fail_after: int | None = None) -> dict | None:
    with begin_run(store, "atlas", run_id) as run:
        if run.already_committed:
            return None
        for i in range(n_files):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("worker killed")
            run.put_bytes(f"shard-{i:03d}.bin", bytes([i]) * 10)
        return run.commit({"name": "job", "files_written": n_files})


def test_a_failed_attempt_removes_its_files_and_a_rerun_commits_once(store: Store) -> None:
    with pytest.raises(RuntimeError, match="killed"):
        _write_run(store, "r1", 10, fail_after=5)
    assert committed_runs(store) == []
    assert store.list_keys("atlas/r1") == []  # neither its 5 files nor its lease are left

    manifest = _write_run(store, "r1", 10)
    assert manifest is not None
    keys = store.list_keys("atlas/r1/")
    assert keys == sorted([f"atlas/r1/shard-{i:03d}.bin" for i in range(10)] + [f"atlas/r1/{MANIFEST}"])
    assert store.list_keys("atlas/r1") == keys  # the lease went with the commit
    assert len(manifest["files"]) == 10
    assert [r["run_id"] for r in committed_runs(store)] == ["r1"]

    # A re-run of a committed run no-ops: nothing rewritten, same manifest.
    assert _write_run(store, "r1", 10) is None
    again = begin_run(store, "atlas", "r1")
    assert again.already_committed and again.manifest == manifest
    with pytest.raises(RuntimeError):
        again.put_bytes("x", b"x")
    assert store.list_keys("atlas/r1/") == keys
    assert read_manifest(store, "atlas", "r1")["committed_at"] == manifest["committed_at"]


def test_a_killed_writers_leftovers_are_invisible_then_replaced(store: Store) -> None:
    killed_writer(store, "atlas", "r", {"old-only.bin": b"x", "sub/shared.bin": b"old"})
    assert committed_runs(store) == [] and len(store.list_keys("atlas/r/")) == 2
    # The dead process's lease is taken over at once (its pid is gone), its files deleted.
    run = begin_run(store, "atlas", "r")
    run.put_bytes("sub/shared.bin", b"new")
    run.commit({"name": "r"})
    assert store.list_keys("atlas/r/") == ["atlas/r/manifest.json", "atlas/r/sub/shared.bin"]
    assert store.get_bytes("atlas/r/sub/shared.bin") == b"new"
    # Siblings sharing a name prefix are untouched.
    begin_run(store, "atlas", "r2").commit({})
    assert begin_run(store, "atlas", "r").already_committed
    assert store.exists("atlas/r2/manifest.json")


def test_resuming_job_keeps_leftovers_until_it_commits(store: Store) -> None:
    killed_writer(store, "train", "t", {"checkpoints/epoch-0001.pt": b"state"}, keep=True)
    again = begin_run(store, "train", "t", keep_leftovers=True)
    assert not again.already_committed
    assert store.get_bytes("train/t/checkpoints/epoch-0001.pt") == b"state"
    again.commit({"name": "t"})
    # Committed: keep_leftovers changes nothing, the run is returned as it is.
    assert begin_run(store, "train", "t", keep_leftovers=True).already_committed
    assert store.list_keys("train/t/") == ["train/t/checkpoints/epoch-0001.pt", "train/t/manifest.json"]


def test_png_and_parquet_readable_everywhere(store: Store, tmp_path) -> None:
    run = begin_run(store, "atlas", "tables")
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    run.put_png("img/rgb.png", rgb)
    run.put_png("img/grey.png", rgb[..., 0])
    with pytest.raises(ValueError):
        run.put_png("img/bad.png", rgb.astype(np.float32))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(store.get_bytes(run.key("img/rgb.png"))))), rgb)

    # Columns out of order and wider types are conformed to the declared schema.
    table = pa.table(
        {"activation": [0.5, 1.5, None], "channel": pa.array([1, 2, 3], pa.int64()), "layer": ["a", "b", "c"]}
    )
    run.write_table("top.parquet", table, SCHEMA, row_group_size=2)
    with pytest.raises(ValueError, match="missing columns"):
        run.write_table("bad.parquet", table.drop(["layer"]), SCHEMA)
    with pytest.raises(ValueError, match="not nullable"):
        run.write_table("bad.parquet", table.set_column(2, "layer", pa.array(["a", None, "c"])), SCHEMA)
    run.commit({"name": "tables"})

    fs, base = store.arrow_filesystem()
    dataset = ds.dataset(f"{base}/{run.key('top.parquet')}", filesystem=fs, format="parquet")
    assert dataset.schema == SCHEMA
    filtered = dataset.to_table(filter=ds.field("channel") >= 2, columns=["layer"])
    assert filtered.column("layer").to_pylist() == ["b", "c"]

    import pandas as pd

    frame = pd.read_parquet(io.BytesIO(store.get_bytes(run.key("top.parquet"))))
    assert list(frame.columns) == ["layer", "channel", "activation"] and len(frame) == 3
    if isinstance(store, LocalStore):
        import duckdb

        path = store.uri_of(run.key("top.parquet"))
        rows = duckdb.connect().execute(f"select layer, channel from '{path}' where channel >= 2").fetchall()
        assert rows == [("b", 2), ("c", 3)]
        assert pd.read_parquet(path)["channel"].dtype == np.int32


def test_columns_built_from_one_buffer_hold_each_arrays_values() -> None:
    from jobs.store.encoding import binary_column, list_column

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((3, 4), (1, 1), (5, 2))]
    images.append(images[0].transpose(1, 0, 2))  # a strided view: its C-order bytes, as tobytes()
    column = binary_column(images)
    assert column.type == pa.binary() and column.to_pylist() == [a.tobytes() for a in images]
    values = [rng.standard_normal((3, h, w)) for h, w in ((2, 2), (0, 3), (4, 1))]  # float64 in
    lists = list_column(values, pa.float32())
    assert lists.type == pa.list_(pa.float32())
    assert [np.array(v, np.float32).tolist() for v in lists.to_pylist()] == [
        v.astype(np.float32).ravel().tolist() for v in values]
    assert binary_column([]).to_pylist() == [] and list_column([], pa.float32()).to_pylist() == []


def test_manifest_is_plain_json(store: Store) -> None:
    run = begin_run(store, "probe", "p")
    run.commit({"name": "p", "when": datetime(2024, 1, 1), "counts": np.array([1, 2])})
    manifest = json.loads(store.get_bytes(f"probe/p/{MANIFEST}"))
    assert manifest["when"] == "2024-01-01T00:00:00Z" and manifest["counts"] == [1, 2]
    assert manifest["committed_at"].endswith("Z")


def test_fingerprint() -> None:
    assert fingerprint_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.s3
def test_multipart_upload(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/big", s3_endpoint, multipart_threshold=SMALL_THRESHOLD)
    payload = np.random.default_rng(0).bytes(SMALL_THRESHOLD + 1024 * 1024)
    store.put_bytes("blob.bin", payload)
    head = boto3.client("s3", endpoint_url=s3_endpoint).head_object(Bucket=s3_bucket, Key="big/blob.bin")
    assert head["ETag"].strip('"').endswith("-2")  # two parts: 5 MiB + 1 MiB
    assert store.get_bytes("blob.bin") == payload


@pytest.mark.s3
def test_missing_bucket_error_names_it(s3_endpoint: str) -> None:
    store = open_store("s3://no-such-bucket-here/x", s3_endpoint, multipart_threshold=SMALL_THRESHOLD)
    for call in (
        store.check,
        lambda: store.put_bytes("a", b"x"),
        lambda: store.put_bytes("a", b"x" * SMALL_THRESHOLD),  # multipart path
        lambda: store.list_keys(""),
        lambda: begin_run(store, "atlas", "r"),
    ):
        with pytest.raises(BucketNotFoundError, match="no-such-bucket-here"):
            call()


@pytest.mark.s3
def test_endpoint_from_environment(s3_endpoint: str, s3_bucket: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    store = open_store(f"s3://{s3_bucket}")
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v" and store.uri_of("k") == f"s3://{s3_bucket}/k"
    fs, base = store.arrow_filesystem()
    assert base == s3_bucket
    assert fs.open_input_file(f"{base}/k").read() == b"v"


def test_local_store_check(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Exception, match="cannot use"):
        LocalStore(blocker / "sub").check()
    open_store(f"file://{tmp_path}/new").check()
    assert (tmp_path / "new").is_dir()


class _FlakyProxy:
    """An HTTP proxy in front of the moto server that answers the first ``failures`` requests with
    an S3 error (503 SlowDown: throttling; 500 InternalError: a server fault), then forwards
    everything: a real server misbehaving."""

    def __init__(self, target: str, failures: int) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.failures, self.seen, self.error = failures, 0, (503, "SlowDown")
        host = urlsplit(target).netloc
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers boto3's "Expect: 100-continue" at once

            def log_message(self, *args: object) -> None:
                """No access log on stderr: the test reads the proxy's counters instead."""

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen += 1
                if proxy.seen <= proxy.failures:
                    status, code = proxy.error
                    error = f"<Error><Code>{code}</Code><Message>try again</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                conn = http.client.HTTPConnection(host, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.s3
def test_s3_retries_throttling_then_gives_up_naming_the_key(
    s3_endpoint: str, s3_bucket: str, monkeypatch
) -> None:
    proxy = _FlakyProxy(s3_endpoint, failures=1)
    monkeypatch.setenv("ZFATLAS_S3_ENDPOINTS", f"{s3_endpoint},{proxy.url}")  # the proxy is ours too
    try:
        store = open_store(f"s3://{s3_bucket}/p", proxy.url)
        store.put_bytes("k", b"v")  # throttled (botocore backs off up to 1 s), then OK
        assert proxy.seen == 2 and store.get_bytes("k") == b"v"
        assert store._client.meta.config.retries == {"total_max_attempts": 5, "mode": "standard"}

        proxy.failures, proxy.seen, proxy.error = 10, 0, (500, "InternalError")
        impatient = open_store(f"s3://{s3_bucket}/p", proxy.url, max_attempts=2)
        with pytest.raises(StoreError, match=f"s3://{s3_bucket}/p/k2"):
            impatient.put_bytes("k2", b"v")
        assert proxy.seen == 2
    finally:
        proxy.close()
