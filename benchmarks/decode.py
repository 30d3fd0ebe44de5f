"""Reading ImageNet-sized JPEGs at the decode floor, measured side by side in one run (issue 16):

(a) decode only: images/s of ``decode_image`` (PIL, JPEG draft mode, short side ``--resize``,
    center crop ``--image-size``) over bytes already in memory, 1 thread and ``--cpus`` threads;
(b) one atlas worker with ``--cpus`` CPUs (``AtlasScanner`` built directly, no Ray) scanning the
    same images as an ImageFolder and as WebDataset shards: with sequential reads (the scanner
    before the prefetcher) and as it is (decode in ``--cpus`` threads, next batch read during the
    forward); each as a ratio to (a) at the same cores (target >= 0.9), beside the plain forward
    rate and the ceiling the two imply when they share the same cores;
(c) the same images on S3 (moto on loopback, requests counted at its HTTP layer): ImageFolder vs
    WebDataset, opening (list, index) and reading everything: requests and seconds;
(d) Ray Data as the decode stage (``read_binary_files`` + ``map_batches`` decode on a local Ray of
    ``--cpus`` CPUs) vs the prefetcher reading and decoding the same ImageFolder;
(e) the atlas job's scan on a real two-node Ray cluster on loopback (half the CPUs per node, one
    worker each) over the WebDataset shards, vs the decode-only rate at the same cores.

    .venv/bin/python benchmarks/decode.py [--images 5000] [--cpus 2] [--variant zfnet-small]
        [--image-size 224] [--resize 256] [--batch 64] [--skip c,d]

The images are made once from the photos scikit-image ships (random crops resized to ImageNet-like
sizes, 500x375 to 1024x768, JPEG quality 90) and cached in the temp folder. The load average is
printed first; above 1 every figure is marked NOT QUOTABLE. Runs unchanged on a GPU machine (the
scan's forward then runs on CUDA). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from jobs.atlas.scanner import AtlasScanner  # noqa: E402
from jobs.datasets import ImageSource, open_dataset, prefetch  # noqa: E402
from jobs.datasets.decode import decode_image  # noqa: E402
from jobs.datasets.pack import pack  # noqa: E402
from jobs.kinds import parse_spec  # noqa: E402
from jobs.runtime.device import to_device  # noqa: E402
from jobs.specs.base import DatasetSpec  # noqa: E402
from jobs.store.s3 import trust_endpoint  # noqa: E402
from zfcore.scan import scan_batches  # noqa: E402

SIZES = [(500, 375), (500, 333), (640, 480), (800, 600), (1024, 768), (375, 500), (333, 500), (500, 500),
         (768, 1024)]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "cat", "motorcycle_left", "motorcycle_right", "colorwheel"]
CACHE_VERSION = 1


class Load:
    """The load average when the run started; every figure carries the verdict."""

    def __init__(self) -> None:
        self.start = os.getloadavg()
        self.quiet = self.start[0] <= 1

    def __str__(self) -> str:
        a, b, c = self.start
        verdict = "quiet" if self.quiet else "NOT QUOTABLE: load above 1, no figure below is quotable"
        return f"load average {a:.2f}, {b:.2f}, {c:.2f} ({verdict})"

    def mark(self) -> str:
        return "" if self.quiet else "  NOT QUOTABLE"


# --- the images ---------------------------------------------------------------------------------


def photos() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # a photo this scikit-image version lacks or would download
            continue
        if isinstance(image, tuple):
            image = image[0]
        if image.ndim == 3 and image.shape[2] >= 3:
            out.append(np.ascontiguousarray(image[..., :3]))
    if not out:
        raise SystemExit("scikit-image ships no colour photos here (pip install scikit-image)")
    return out


def make_jpegs(n: int, root: Path) -> Path:
    """``n`` JPEGs of ImageNet sizes in an ImageFolder tree (10 classes), made once and cached."""
    folder = root / f"jpegs-{n}"
    if (folder / ".done").exists():
        return folder
    rng = np.random.default_rng(0)
    sources = photos()
    for i in range(n):
        src = sources[int(rng.integers(len(sources)))]
        w, h = SIZES[int(rng.integers(len(SIZES)))]
        sh, sw = src.shape[:2]
        scale = rng.uniform(0.6, 1.0) * min(sw / w, sh / h)
        cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
        x, y = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        crop = Image.fromarray(src[y : y + ch, x : x + cw]).resize((w, h), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"c{i % 10}" / f"img{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, format="JPEG", quality=90)
    (folder / ".done").write_text("")
    return folder


def webdataset_of(folder: Path, shard: int) -> Path:
    out = folder.with_name(f"{folder.name}-wds{shard}")
    if not (out / ".done").exists():
        source = open_dataset(DatasetSpec(format="imagefolder", uri=str(folder)), 16)
        pack(source, str(out), "webdataset", shard_size=shard, overwrite=True)
        (out / ".done").write_text("")
    return out


# --- (a) decode only ----------------------------------------------------------------------------


def decode_rate(datas: list[bytes], threads: int, size: int, resize: int | None) -> float:
    start = time.perf_counter()
    if threads == 1:
        for d in datas:
            decode_image(d, size, resize)
    else:
        with ThreadPoolExecutor(threads) as pool:
            # Drain the results without keeping them (5,000 decoded images would be ~750 MB).
            deque(pool.map(lambda d: decode_image(d, size, resize), datas, chunksize=8), maxlen=0)
    return len(datas) / (time.perf_counter() - start)


# --- (b) one atlas worker -----------------------------------------------------------------------


class SequentialScanner(AtlasScanner):
    """The scanner as it was before the prefetcher: each batch read and decoded in the worker's
    thread, in turn with the forward pass (the "before" of (b))."""

    def _batches(
        self, indices: list[int], stats: dict, tracker: Any = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.spec.resources.batch_size
        for i in range(0, len(indices), bs):
            batch = self.source.read(indices[i : i + bs])
            stats["skipped"].extend(batch.skipped)
            stats["images"] += len(batch.indices)
            if len(batch.indices):
                x = to_device(batch.images, self.device, self.preprocess)
                yield x, torch.from_numpy(batch.indices).to(self.device)


def atlas_spec(args: argparse.Namespace, dataset: dict, out: str) -> Any:
    return parse_spec({
        "kind": "atlas", "name": "decode-bench", "run_id": "decode-bench",
        "model": {"arch": args.variant, "preprocess": {"image_size": args.image_size, "resize": args.resize}},
        "dataset": dataset, "output": out, "project": False, "shard_size": args.shard,
        "resources": {"workers": 1, "cpus_per_worker": args.cpus, "batch_size": args.batch},
    })


def scan_rate(scanner: AtlasScanner) -> tuple[float, int]:
    shards = getattr(scanner.source, "natural_shards", None)
    shards = shards(scanner.spec.shard_size) if shards else []
    scanner.scan(range(0, min(scanner.spec.resources.batch_size, len(scanner.source))))  # warm-up
    start, images = time.perf_counter(), 0
    for shard in shards:
        images += scanner.scan(shard)["images"]
    return images / (time.perf_counter() - start), len(shards)


def forward_rate(scanner: AtlasScanner, batches: int = 6) -> float:
    """The scan's compute alone (forward + top-k) on batches already decoded, same cores."""
    bs, size = scanner.spec.resources.batch_size, scanner.image_size
    xs = [torch.randn(bs, 3, size, size, device=scanner.device) for _ in range(batches)]
    idx = [torch.arange(i * bs, (i + 1) * bs, device=scanner.device) for i in range(batches)]
    scan_batches(scanner.network, zip(xs[:1], idx[:1], strict=True), scanner.spec.layers, scanner.spec.k)
    start = time.perf_counter()
    scan_batches(scanner.network, zip(xs, idx, strict=True), scanner.spec.layers, scanner.spec.k)
    if scanner.device.type == "cuda":
        torch.cuda.synchronize()
    return bs * batches / (time.perf_counter() - start)


# --- (c) S3 -------------------------------------------------------------------------------------


class CountingMoto:
    """moto's S3 server on loopback, counting the requests it answers by method."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.counts: Counter[str] = Counter()
        lock = threading.Lock()

        def counting(environ: dict, start_response: Any) -> Any:
            with lock:
                self.counts[environ["REQUEST_METHOD"]] += 1
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counting, True, request_handler=MotoRequestHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = "http://{}:{}".format(*self.server.server_address[:2])

    def take(self) -> str:
        out = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        self.counts.clear()
        return out or "none"


def s3_figures(args: argparse.Namespace, folder: Path, wds: Path, load: Load) -> None:
    import logging

    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    # moto accepts any credentials: never let real ones (or a profile) near this.
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                       "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    moto = CountingMoto()
    trust_endpoint(moto.url)  # the benchmark's own endpoint: it gets the test credentials
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="bench")
    files = sorted(p for p in folder.rglob("*.jpg"))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.put_object(Bucket="bench", Key=f"folder/{p.relative_to(folder)}",
                                                  Body=p.read_bytes()), files))
        list(pool.map(lambda p: client.put_object(Bucket="bench", Key=f"wds/{p.name}", Body=p.read_bytes()),
                      sorted(wds.iterdir())))
    moto.take()
    print(f"(c) S3 on loopback (moto), {len(files)} images, reading with {args.cpus} decode threads, "
          f"batches of {args.batch}:")
    rows = {}
    for fmt, uri in (("imagefolder", "s3://bench/folder"), ("webdataset", "s3://bench/wds")):
        start = time.perf_counter()
        source = open_dataset(DatasetSpec(format=fmt, uri=uri), args.image_size, moto.url)
        open_s, open_req = time.perf_counter() - start, moto.take()
        start = time.perf_counter()
        read = sum(len(b.indices) for b in prefetch(source, _batches(source, args), args.cpus))
        read_s, read_req = time.perf_counter() - start, moto.take()
        rows[fmt] = read / read_s
        print(f"    {fmt:<12} open {open_s:6.2f}s [{open_req}]   read {read} images in {read_s:6.2f}s "
              f"= {read / read_s:7.1f} img/s [{read_req}]{load.mark()}")
    ratio = rows["webdataset"] / rows["imagefolder"]
    print(f"    webdataset / imagefolder read rate: {ratio:.2f}x{load.mark()}")
    moto.server.shutdown()


def _batches(source: ImageSource, args: argparse.Namespace) -> list[list[int]]:
    out = []
    for shard in source.natural_shards(args.shard):
        starts = range(shard.start, shard.stop, args.batch)
        out += [list(range(i, min(i + args.batch, shard.stop))) for i in starts]
    return out


# --- (d) Ray Data -------------------------------------------------------------------------------


def ray_data_figures(args: argparse.Namespace, folder: Path, load: Load) -> None:
    import ray

    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    source = open_dataset(DatasetSpec(format="imagefolder", uri=str(folder)), args.image_size)
    start = time.perf_counter()
    n = sum(len(b.indices) for b in prefetch(source, _batches(source, args), args.cpus))
    ours = n / (time.perf_counter() - start)
    size, resize = args.image_size, args.resize

    def decode_batch(batch: dict) -> dict:
        return {"image": np.stack([decode_image(bytes(b), size, resize) for b in batch["bytes"]])}

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.read_binary_files(files).map_batches(decode_batch, batch_size=args.batch)
        rates = []
        for _ in range(2):  # the first also starts Ray Data's workers
            start = time.perf_counter()
            count = sum(len(b["image"]) for b in ds.iter_batches(batch_size=args.batch, batch_format="numpy"))
            rates.append(count / (time.perf_counter() - start))
    finally:
        ray.shutdown()
    print(f"(d) read + decode of the ImageFolder on {args.cpus} CPUs: prefetcher {ours:7.1f} img/s | "
          f"Ray Data (read_binary_files + map_batches) {rates[-1]:7.1f} img/s (first pass {rates[0]:.1f}) -> "
          f"Ray Data / prefetcher {rates[-1] / ours:.2f}{load.mark()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--cpus", type=int, default=2, help="decode threads and the worker's cpus_per_worker")
    p.add_argument("--variant", default="zfnet-small", help="the scan's model (zfnet on a GPU)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard", type=int, default=500, help="images per unit of work (the spec's shard_size)")
    p.add_argument("--tar-size", type=int, default=1000, help="images per WebDataset shard")
    p.add_argument("--repeat", type=int, default=1, help="measure each rate this many times (median)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: b, c, d, e")
    cache = Path(tempfile.gettempdir()) / f"zfatlas-bench-decode-v{CACHE_VERSION}"
    p.add_argument("--cache", default=str(cache), help="where the generated images are kept")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    load = Load()
    print(load)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device={device} images={args.images} cpus={args.cpus} crop={args.image_size} "
          f"resize={args.resize} batch={args.batch} variant={args.variant} python={sys.version.split()[0]}")

    folder = make_jpegs(args.images, Path(args.cache))
    wds = webdataset_of(folder, args.tar_size)
    files = sorted(folder.rglob("*.jpg"))
    datas = [f.read_bytes() for f in files]
    sizes = [Image.open(io.BytesIO(d)).size for d in datas[:500]]
    print(f"images: {len(datas)} JPEGs, {sum(map(len, datas)) / len(datas) / 1024:.0f} KiB each on average, "
          f"mean {statistics.mean(w for w, _ in sizes):.0f}x{statistics.mean(h for _, h in sizes):.0f} px")

    def median(f: Any) -> float:
        return statistics.median(f() for _ in range(args.repeat))

    one = median(lambda: decode_rate(datas, 1, args.image_size, args.resize))
    many = median(lambda: decode_rate(datas, args.cpus, args.image_size, args.resize))
    print(f"(a) decode only: 1 thread {one:7.1f} img/s | {args.cpus} threads {many:7.1f} img/s "
          f"({many / one:.2f}x){load.mark()}")

    if "b" not in skip:
        with tempfile.TemporaryDirectory() as out:
            print(f"(b) one atlas worker, {args.cpus} CPUs, scanning {args.variant} at {args.image_size}px:")
            fwd = None
            for fmt, uri in (("imagefolder", folder), ("webdataset", wds)):
                spec = atlas_spec(args, {"format": fmt, "uri": str(uri)}, out)
                kinds = (("sequential reads", SequentialScanner), ("with prefetcher", AtlasScanner))
                for label, cls in kinds:
                    scanner = cls(spec, None, args.cpus)
                    fwd = fwd or forward_rate(scanner)
                    rate = median(lambda s=scanner: scan_rate(s)[0])
                    print(f"    {fmt:<12} {label:<17} {rate:7.1f} img/s -> ratio to decode-only "
                          f"{rate / many:.3f} (target >= 0.9){load.mark()}")
            ceiling = 1 / (1 / many + 1 / fwd) if device == "cpu" else min(many, fwd)
            print(f"    plain forward + top-k on decoded batches: {fwd:7.1f} img/s; with decode and forward "
                  f"on the same {args.cpus} cores the scan cannot pass {ceiling:.1f} img/s "
                  f"(ratio {ceiling / many:.3f}){load.mark()}")

    if "c" not in skip:
        s3_figures(args, folder, wds, load)
    if "d" not in skip:
        ray_data_figures(args, folder, load)
    if "e" not in skip:
        two_node_figures(args, wds, many, load)


def two_node_figures(args: argparse.Namespace, wds: Path, decode_only: float, load: Load) -> None:
    """(e) The atlas job's scan on a real two-node Ray cluster on loopback (``ray.cluster_utils``:
    a head and a second raylet of ``--cpus // 2`` CPUs each), one worker per node, against the
    decode-only rate at the same total cores."""
    import ray
    from ray.cluster_utils import Cluster

    from jobs.runner import run_spec

    per_node = max(1, args.cpus // 2)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": per_node, "include_dashboard": False})
    cluster.add_node(num_cpus=per_node)
    cluster.wait_for_nodes()
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        with tempfile.TemporaryDirectory() as out:
            spec = parse_spec({
                "kind": "atlas", "name": "decode-bench-2n", "run_id": "decode-bench-2n",
                "model": {"arch": args.variant, "preprocess": {"image_size": args.image_size,
                                                              "resize": args.resize}},
                "dataset": {"format": "webdataset", "uri": str(wds)}, "output": out, "project": False,
                "shard_size": args.shard,
                "resources": {"workers": 2, "cpus_per_worker": per_node, "batch_size": args.batch},
            })
            manifest = run_spec(spec, quiet=True)
        t = manifest["timings"]
        rate = manifest["throughput_images_per_s"]
        print(f"(e) two-node loopback cluster ({per_node} CPU each), 2 workers, webdataset: scan "
              f"{rate:7.1f} img/s (start-up {t['startup_s']:.1f}s apart) -> ratio to decode-only at "
              f"{2 * per_node} cores {rate / decode_only:.3f}{load.mark()}")
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved


if __name__ == "__main__":
    main()
