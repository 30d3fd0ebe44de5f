"""Writing an atlas to S3 when every request pays a round trip (issue 14).

A moto S3 server on loopback, behind a loopback proxy that holds each HTTP request for
``--latency-ms`` (20 ms: a nearby region) and counts them; the same atlas (zfnet-small, every conv
layer, projections) is built into it by this tree and, with ``--before TREE``, by an older zfatlas
checkout (``git worktree add /tmp/zfatlas-before 53492b0``: format 1, a PNG object per image),
side by side in one run. Prints requests and seconds for each.

    .venv/bin/python benchmarks/s3_write.py [--images 500] [--latency-ms 20] [--before TREE]

The time is dominated by the round trips, not the CPU, but the load average is printed all the
same. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import atlas as atlas_bench  # noqa: E402  (benchmarks/atlas.py: the atlas child runs)

from zfcore.zfnet import build  # noqa: E402

_REQUEST = re.compile(rb"^(GET|PUT|POST|HEAD|DELETE) ")


class LatencyProxy:
    """TCP proxy 127.0.0.1:port -> target, delaying the first bytes of every HTTP request."""

    def __init__(self, target_port: int, latency_s: float) -> None:
        self.target_port = target_port
        self.latency_s = latency_s
        self.requests = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        answered = {"yes": True}  # a request starts after the previous one was answered

        async def up() -> None:
            while data := await reader.read(1 << 16):
                if answered["yes"] and _REQUEST.match(data):
                    answered["yes"] = False
                    self.requests += 1
                    await asyncio.sleep(self.latency_s)
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def down() -> None:
            while data := await up_reader.read(1 << 16):
                answered["yes"] = True
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(up(), down())
        except (ConnectionError, OSError):
            writer.close()
            up_writer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--latency-ms", type=float, default=20)
    p.add_argument("--before", type=Path, default=None)
    p.add_argument("--variant", default="zfnet-small")
    args = p.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    os.environ.update({  # testing values: moto accepts any credentials
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true",
    })
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = LatencyProxy(server.get_host_and_port()[1], args.latency_ms / 1000)
    endpoint = f"http://127.0.0.1:{proxy.port}"
    os.environ["ZFATLAS_S3_ENDPOINTS"] = endpoint  # this tree sends credentials to listed endpoints
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")

    bench = atlas_bench.parser().parse_args([
        "--variant", args.variant, "--images", str(args.images), "--endpoint-url", endpoint])
    tmp = tempfile.mkdtemp(prefix="zfatlas-s3-bench-")
    bench.checkpoint = str(Path(tmp, "model.pt"))
    torch.manual_seed(0)
    torch.save(build(args.variant).state_dict(), bench.checkpoint)
    a, b, c = os.getloadavg()
    print(f"load average at start {a:.2f}, {b:.2f}, {c:.2f}; {args.images} images, "
          f"{args.latency_ms:.0f} ms per request")

    trees = [("after", atlas_bench.HERE)] + ([("before", args.before)] if args.before else [])
    for name, tree in trees:
        before = proxy.requests
        t = time.perf_counter()
        out = atlas_bench.run_child(bench, args.images, True, tree=tree, output=f"s3://bench/{name}")
        wall = time.perf_counter() - t
        listed = sum(page.get("KeyCount", 0) for page in boto3.client("s3", endpoint_url=endpoint)
                     .get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=f"{name}/"))
        tm = out["timings"]
        print(f"{name:6s} (format {out['format']}, {tree}): {listed} objects, {proxy.requests - before} "
              f"requests; project {tm['project_s']:.1f}s + write {tm['write_s']:.1f}s; atlas "
              f"{tm['total_s']:.1f}s; whole job {wall:.1f}s")
    print(f"load average at end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    server.stop()


if __name__ == "__main__":
    main()
