"""The HTTP API on atlases as the job writes them now (format 3: images drawn from the parts of
each layer's tables), on both store backends: every image a viewer asks for is served with its
caching headers and is the reader's bytes, whichever part holds the channel."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import httpx
import pytest

from jobs.kinds import parse_spec
from jobs.results.query import AtlasReader
from jobs.runner import run_spec
from jobs.store import Store, open_store
from services.api.app import create_app
from services.http.settings import Settings
from tests.fixtures.api_server import serve

pytestmark = pytest.mark.ray

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Served:
    client: httpx.Client
    store: Store
    manifest: dict


@pytest.fixture(scope="module", params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def served(request, ray_cluster, tmp_path_factory) -> Iterator[Served]:
    if request.param == "local":
        uri, endpoint = str(tmp_path_factory.mktemp("api-tables")), None
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"tables-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        uri = f"s3://{bucket}/store"
    # Two channels per projection group: conv2's 16+ groups make more than one part.
    spec = parse_spec({
        "kind": "atlas", "name": "api-tables", "run_id": "t", "seed": 0, "model": {"arch": "zfnet-small"},
        "dataset": {"format": "procedural", "num_images": 64, "seed": 2}, "output": uri,
        "layers": ["conv1", "conv2"], "k": 4, "shard_size": 32,
        "resources": {"workers": 2, "batch_size": 8}, **({"endpoint_url": endpoint} if endpoint else {}),
    })
    manifest = run_spec(spec, quiet=True)
    settings = Settings(store=uri, endpoint_url=endpoint, token="t" * 24)
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield Served(client, open_store(uri, endpoint), manifest)


def test_every_image_of_a_channel_in_any_part_is_served_as_the_reader_draws_it(served):
    manifest = served.manifest
    assert manifest["format"] == 3 and len(manifest["parts"]["conv2"]) >= 2
    reader = AtlasReader(served.store, "t")
    checked = 0
    for layer, ranges in manifest["parts"].items():
        for channel in {ranges[0][0], ranges[-1][1]}:  # the first part's first, the last part's last
            detail = served.client.get(f"/api/atlases/t/layers/{layer}/channels/{channel}").raise_for_status()
            body = detail.json()
            if body["features"][0].get("dead"):
                continue
            urls = [(body["patch_grid_url"], reader.png(layer, channel, "patch_grid")),
                    (body["projection_grid_url"], reader.png(layer, channel, "projection_grid"))]
            for f in body["features"]:
                urls.append((f["patch_url"], reader.png(layer, channel, "patch", f["rank"])))
                urls.append((f["projection_url"], reader.png(layer, channel, "projection", f["rank"])))
            for url, expected in urls:
                response = served.client.get(url)
                assert response.status_code == 200 and response.headers["content-type"] == "image/png"
                assert "immutable" in response.headers["cache-control"]
                assert response.content.startswith(PNG_SIGNATURE) and response.content == expected
                checked += 1
    assert checked >= 2 * (2 + 2 * 4)  # at least two live channels, each with grids and 4 ranks
    summary = served.client.get(f"/api/images/{manifest['summaries']['conv2']}")
    assert summary.status_code == 200 and summary.content.startswith(PNG_SIGNATURE)


def test_a_channel_no_part_holds_is_a_404_naming_it(served):
    past = served.manifest["parts"]["conv2"][-1][1] + 1
    response = served.client.get(f"/api/atlases/t/layers/conv2/channels/{past}/grids/patch.png")
    assert response.status_code == 404 and str(past) in response.text
