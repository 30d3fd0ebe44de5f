"""The prefetcher: batches decoded in a pool and read one ahead are exactly the plain reads, for
every format; the pool really decodes in several threads; the device JPEG path (run on the CPU
here) matches the geometry and falls back to the CPU decoder for everything else."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.datasets import ImageSource, Prefetcher, open_dataset, prefetch
from jobs.specs.base import DatasetSpec

SIZE = 24
COMPUTE = 0.3  # seconds the "model" takes per batch in the overlap test


def _photo(i: int) -> np.ndarray:
    """A smooth, photo-like picture (gradients and a disc) so JPEG and resampling behave normally."""
    h, w = 30 + 7 * (i % 4), 40 + 5 * (i % 3)
    yy, xx = np.mgrid[0:h, 0:w]
    r = (xx * 255 // w + 40 * i) % 256
    g = (yy * 255 // h) % 256
    b = np.where((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2, 220, 30)
    return np.stack([r, g, b], -1).astype(np.uint8)


def _encoded(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo(i)).save(buf, format="PNG" if i % 5 == 4 else "JPEG", quality=90)
    data = buf.getvalue()
    return data[:180] if i == 6 else data  # image 6 is truncated: skipped by every reader


N = 14
NAMES = [f"{'cat' if i % 2 else 'dog'}/{i:02d}.{'png' if i % 5 == 4 else 'jpg'}" for i in range(N)]
BATCHES = [list(range(0, 4)), list(range(4, 9)), [13, 2, 7], [6], list(range(9, 13))]


def _sources(root: Path) -> dict[str, ImageSource]:
    folder = root / "folder"
    for i, name in enumerate(NAMES):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_encoded(i))
    table = pa.table({"image": [_encoded(i) for i in range(N)], "label": [i % 3 for i in range(N)]})
    pq.write_table(table, root / "t.parquet", row_group_size=5)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(N):
            for name, data in [(f"{i:03d}.{'png' if i % 5 == 4 else 'jpg'}", _encoded(i)),
                               (f"{i:03d}.cls", str(i % 3).encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "wds").mkdir()
    (root / "wds" / "a.tar").write_bytes(buf.getvalue())
    return {
        "procedural": open_dataset(DatasetSpec(num_images=N), SIZE),
        "imagefolder": open_dataset(DatasetSpec(format="imagefolder", uri=str(folder)), SIZE),
        "parquet": open_dataset(DatasetSpec(format="parquet", uri=str(root / "t.parquet")), SIZE),
        "webdataset": open_dataset(DatasetSpec(format="webdataset", uri=str(root / "wds")), SIZE),
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ImageSource]:
    return _sources(tmp_path_factory.mktemp("prefetch"))


def _same(a, b) -> None:
    assert np.array_equal(a.images, b.images) and a.images.dtype == b.images.dtype
    assert a.labels.tolist() == b.labels.tolist() and a.indices.tolist() == b.indices.tolist()
    assert a.skipped == b.skipped


@pytest.mark.parametrize("fmt", ["procedural", "imagefolder", "parquet", "webdataset"])
@pytest.mark.parametrize("threads", [1, 3])
def test_prefetched_batches_equal_plain_reads(
    sources: dict[str, ImageSource], fmt: str, threads: int
) -> None:
    source = sources[fmt]
    plain = [source.read(b) for b in BATCHES]
    got = list(prefetch(source, BATCHES, threads))
    assert len(got) == len(plain)
    for a, b in zip(got, plain, strict=True):
        _same(a, b)
    if fmt != "procedural":
        # The truncated image, and only it (its index depends on the format's order).
        assert len({i for b in got for i, _ in b.skipped}) == 1
    # A prefetcher is reusable, and gives the same again.
    with Prefetcher(source, threads, lookahead=2) as p:
        for a, b in zip(p.batches(BATCHES), plain, strict=True):
            _same(a, b)
        for a, b in zip(p.batches(BATCHES[:2]), plain[:2], strict=True):
            _same(a, b)


def test_decode_runs_in_several_threads_and_reads_one_batch_ahead(sources: dict[str, ImageSource]) -> None:
    source = sources["webdataset"]
    plain = [source.read(b) for b in BATCHES]
    decoders: set[str] = set()
    fetched: list[tuple[float, list[int]]] = []
    lock = threading.Lock()
    real_decode, real_fetch = source.decode, source.fetch

    def decode(item):
        with lock:
            decoders.add(threading.current_thread().name)
        time.sleep(0.01)  # long enough that every pool thread gets items
        return real_decode(item)

    def fetch(indices):
        with lock:
            fetched.append((time.perf_counter(), list(indices)))
        return real_fetch(indices)

    source.decode, source.fetch = decode, fetch  # instance attributes: seen by the pool's map
    try:
        received = []
        with Prefetcher(source, 4) as p:
            for batch in p.batches(BATCHES):
                received.append((time.perf_counter(), batch))
                time.sleep(COMPUTE)  # the model computing on this batch
    finally:
        del source.decode, source.fetch
    # Never in the caller's thread; in several pool threads (a one-image batch stays in the reader).
    assert len({n for n in decoders if n.startswith("zfatlas-decode")}) >= 2
    assert decoders <= {f"zfatlas-decode_{k}" for k in range(4)} | {"zfatlas-read_0"}
    assert [f[1] for f in fetched] == BATCHES  # read in order, each once
    for k in range(1, len(BATCHES)):
        # Batch k is read while the caller computes on batch k-1 (overlap) ...
        assert fetched[k][0] < received[k - 1][0] + COMPUTE
        # ... and not before the caller is done with batch k-2 (one batch ahead, no more).
        if k >= 2:
            assert fetched[k][0] >= received[k - 2][0] + COMPUTE
    for (_, a), b in zip(received, plain, strict=True):
        _same(a, b)


def test_abandoned_iteration_leaves_nothing_reading(sources: dict[str, ImageSource]) -> None:
    source = sources["parquet"]
    with Prefetcher(source, 2) as p:
        for batch in p.batches(BATCHES):
            assert len(batch.indices) == 4
            break
        # The generator is closed: its read-ahead finished, the source is free for a plain read.
        _same(p.read(BATCHES[1]), source.read(BATCHES[1]))
    with pytest.raises(ValueError):
        Prefetcher(source, 0)


def test_device_decode_matches_the_cpu_geometry(sources: dict[str, ImageSource]) -> None:
    source = sources["imagefolder"]
    for indices in BATCHES:
        cpu = source.read(indices)
        with Prefetcher(source, 2, decode_device="cpu") as p:
            [dev] = list(p.batches([indices]))
        assert isinstance(dev.images, torch.Tensor) and dev.images.dtype == torch.uint8
        assert dev.indices.tolist() == cpu.indices.tolist() and dev.labels.tolist() == cpu.labels.tolist()
        assert dev.skipped == cpu.skipped  # the corrupt JPEG: the CPU decoder's reason
        diff = np.abs(dev.images.numpy().astype(int) - cpu.images.astype(int))
        assert diff.mean() < 4  # another decoder and resampler: close, not equal
        for n, i in enumerate(cpu.indices.tolist()):
            if NAMES[i].endswith(".png"):
                assert np.array_equal(dev.images[n].numpy(), cpu.images[n])  # PNGs stay on the CPU path
    # Sources without encoded bytes ignore the device path.
    procedural = sources["procedural"]
    with Prefetcher(procedural, 2, decode_device="cpu") as p:
        assert p.decode_device is None
        _same(next(iter(p.batches([[1, 2]]))), procedural.read([1, 2]))


@pytest.mark.s3
def test_s3_imagefolder_prefetched_equals_plain(s3_endpoint: str, s3_bucket: str) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for i, name in enumerate(NAMES):
        client.put_object(Bucket=s3_bucket, Key=f"f/{name}", Body=_encoded(i))
    source = open_dataset(DatasetSpec(format="imagefolder", uri=f"s3://{s3_bucket}/f"), SIZE, s3_endpoint)
    plain = [source.read(b) for b in BATCHES]
    for a, b in zip(prefetch(source, BATCHES, 3), plain, strict=True):
        _same(a, b)


def test_the_scanner_decodes_jpegs_on_the_device_and_projects_from_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scanner's GPU decode path, run on the CPU: batches come as tensors from the device
    decoder, the scan and the projections take them as they are, and the winners match the CPU
    decoder's closely (another decoder and resampler: close, not equal)."""
    from jobs.atlas.scanner import AtlasScanner, projection_groups
    from jobs.datasets import device_decode
    from jobs.kinds import parse_spec
    from jobs.store import begin_run, open_store
    from zfcore.topk import TopKTracker

    _sources(tmp_path)
    spec = parse_spec({
        "kind": "atlas", "name": "dev", "run_id": "dev", "model": {"arch": "zfnet-small"},
        "dataset": {"format": "imagefolder", "uri": str(tmp_path / "folder")}, "layers": ["conv1", "conv2"],
        "k": 2, "output": str(tmp_path / "store"), "resources": {"workers": 1, "batch_size": 4},
    })
    calls = []
    real = device_decode.read_on_device
    monkeypatch.setattr(device_decode, "read_on_device", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    results = {}
    for device in ("cpu", None):
        run = begin_run(open_store(str(tmp_path / f"store-{device}")), "atlas", "dev")
        with run:
            scanner = AtlasScanner(spec, run, 1, decode_device=device)
            assert (scanner.prefetcher.decode_device is not None) == (device is not None)
            assert (scanner.winners is None) == (device is not None)  # device images are read again
            out = scanner.scan(range(N))
            top = TopKTracker.from_state_dict(out["state"]).results()
            groups = projection_groups(top, spec.layers, 2)
            made = [scanner.project(g) for g in groups]
            results[device] = (out["images"], top, made)
            scanner.prefetcher.close()
    assert calls  # the device path decoded the scan's and the projections' batches
    (n_dev, top_dev, made_dev), (n_cpu, top_cpu, made_cpu) = results["cpu"], results[None]
    assert n_dev == n_cpu == N - 1  # the truncated image skipped on both paths
    for layer in spec.layers:
        assert torch.allclose(top_dev[layer].values, top_cpu[layer].values, rtol=0.1, atol=0.1)
    rows = [r for m in made_dev for r in m["tables"]["images"]["patch"].to_pylist()]
    assert rows and all(isinstance(p, bytes) and p for p in rows)
    assert len(rows) == sum(m["tables"]["images"].num_rows for m in made_cpu)
