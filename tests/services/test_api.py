"""The HTTP API under uvicorn on 127.0.0.1, through a real HTTP client, on both store backends:
reads, streamed images, diffs, and the bad inputs it must refuse."""

from __future__ import annotations

import asyncio
import http.client
import io
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import boto3
import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi import APIRouter, Depends
from PIL import Image
from pydantic import ValidationError

from jobs.results.diff import DIFF_SCHEMA
from jobs.store import Store, begin_run, open_store
from services.api.app import create_app
from services.http.security import require_token
from services.http.settings import Settings
from tests.fixtures.api_server import serve
from tests.fixtures.synthetic_atlas import synthetic_rows, write_atlas
from zfcore.data import CLASS_NAMES

TOKEN = "test-token-0123456789abcdef"
MAX_PAGE = 50
MAX_BODY = 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Api:
    client: httpx.Client
    store: Store
    url: str
    backend: str
    other_bucket: str | None = None
    rows: dict[str, list[dict]] | None = None  # the rows of each atlas, by run id

    def raw_get(self, path: str) -> tuple[int, bytes]:
        """GET with the path sent exactly as written (httpx would normalize '..' away)."""
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def _store(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str | None, str | None]:
    if backend == "local":
        return str(tmp_path_factory.mktemp("api-store")), None, None
    endpoint = request.getfixturevalue("s3_endpoint")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket, other = f"api-{uuid.uuid4().hex[:10]}", f"other-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    s3.create_bucket(Bucket=other)
    # Something worth stealing in another bucket, at a key that looks like ours.
    s3.put_object(Bucket=other, Key="store/atlas/a/images/secret.png", Body=PNG_SIGNATURE + b"secret")
    return f"s3://{bucket}/store", endpoint, other


@pytest.fixture(scope="module", params=["local", "s3"])
def api(request, tmp_path_factory) -> Iterator[Api]:
    uri, endpoint, other = _store(request.param, request, tmp_path_factory)
    store = open_store(uri, endpoint)
    rows_a = _with_known_selectivities(synthetic_rows("a"))
    rows_b = synthetic_rows("b", seed=1)
    write_atlas(store, "a", rows_a)
    write_atlas(store, "b", rows_b, class_names=None)  # as atlases before class names were recorded
    begin_run(store, "train", "t1").commit({"name": "t1"})
    uncommitted = begin_run(store, "atlas", "half")
    uncommitted.put_png("images/conv1/0000/patch-grid.png", np.zeros((4, 4, 3), np.uint8))
    settings = Settings(store=uri, endpoint_url=endpoint, token=TOKEN, max_page_size=MAX_PAGE,
                        default_page_size=20, max_request_bytes=MAX_BODY)
    try:
        with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
            yield Api(client, store, url, request.param, other, {"a": rows_a, "b": rows_b})
    finally:
        # The half-written run stays uncommitted; its lease (and the thread renewing it) ends here,
        # not at exit, when the store it renews in is gone.
        if uncommitted.lease is not None:
            uncommitted.lease.release()


# Atlas "a", conv5: channel 1's labels are known exactly (two unknown), channel 3 never fired,
# channel 4's labels are all unknown.
CHANNEL_1_LABELS = [2, 2, -1, 5, 2, -1, 7, 2, 5]  # 4 of its 7 known labels are class 2
DEAD_CHANNEL, UNLABELLED_CHANNEL = 3, 4


def _with_known_selectivities(rows: list[dict]) -> list[dict]:
    for r in rows:
        if r["layer"] != "conv5":
            continue
        if r["channel"] == 1:
            r["label"] = CHANNEL_1_LABELS[r["rank"]]
        elif r["channel"] == DEAD_CHANNEL:
            r["activation"] = 0.0
        elif r["channel"] == UNLABELLED_CHANNEL:
            r["label"] = -1
    return rows


def _expected_selectivity(rows: list[dict], layer: str, channel: int) -> tuple[int | None, float | None]:
    """Computed here from the rows as written, independently of the API's code."""
    mine = [r for r in rows if (r["layer"], r["channel"]) == (layer, channel)]
    if not max(r["activation"] for r in mine) > 0:
        return None, None
    counts = Counter(r["label"] for r in mine if r["label"] >= 0)
    if not counts:
        return None, None
    best = max(counts.values())
    top = min(label for label, n in counts.items() if n == best)
    return top, best / sum(counts.values())


# --- reads -----------------------------------------------------------------------------------


def test_runs_are_listed_and_paged(api):
    body = api.client.get("/api/runs").raise_for_status().json()
    listed = [(r["kind"], r["run_id"]) for r in body["items"]]
    assert listed == [("atlas", "a"), ("atlas", "b"), ("train", "t1")]
    assert body["total"] == 3 and body["next_offset"] is None and body["limit"] == 20
    atlases = api.client.get("/api/runs", params={"kind": "atlas", "limit": 1}).json()
    assert [r["run_id"] for r in atlases["items"]] == ["a"] and atlases["next_offset"] == 1
    second = api.client.get("/api/runs", params={"kind": "atlas", "limit": 1, "offset": 1}).json()
    assert [r["run_id"] for r in second["items"]] == ["b"] and second["next_offset"] is None
    assert api.client.get("/api/runs", params={"since": "2999-01-01"}).json()["total"] == 0
    detail = api.client.get("/api/runs/atlas/a").raise_for_status().json()
    assert detail["summary"]["layers"] == ["conv1", "conv5"]
    assert "files" not in detail["manifest"] and detail["manifest"]["k"] == 9


def test_atlas_layers_tiles_and_channel(api):
    atlas = api.client.get("/api/atlases/a").raise_for_status().json()
    assert [(layer["name"], layer["channels"]) for layer in atlas["layers"]] == [("conv1", 4), ("conv5", 6)]
    assert atlas["layers"][0]["summary_url"] == "/api/images/atlas/a/summary/conv1.png"

    page = api.client.get("/api/atlases/a/layers/conv5/channels", params={"limit": 4}).json()
    assert [t["channel"] for t in page["items"]] == [0, 1, 2, 3]
    assert page["total"] == 6 and page["next_offset"] == 4
    rest = api.client.get("/api/atlases/a/layers/conv5/channels", params={"offset": 4, "limit": 4}).json()
    assert [t["channel"] for t in rest["items"]] == [4, 5] and rest["next_offset"] is None
    tile = page["items"][2]
    assert tile["projection_grid_url"] == "/api/atlases/a/layers/conv5/channels/2/grids/projection.png"

    channel = api.client.get("/api/atlases/a/layers/conv5/channels/2").raise_for_status().json()
    features = channel["features"]
    assert [f["rank"] for f in features] == list(range(9))
    assert features[0]["activation"] == pytest.approx(tile["top_activation"])
    assert features[0]["source_url"] == "/api/atlases/a/layers/conv5/channels/2/sources/0.png"
    assert features[0]["patch_url"] == "/api/atlases/a/layers/conv5/channels/2/images/0/patch.png"


def test_images_stream_from_the_store(api):
    # A format-1 atlas (the synthetic one): its PNG files, served as they are.
    channel = api.client.get("/api/atlases/a/layers/conv1/channels/1").json()
    keys = ["atlas/a/images/conv1/0001/patch-grid.png", "atlas/a/images/conv1/0001/projection-3.png"]
    urls = (channel["patch_grid_url"], channel["features"][3]["projection_url"])
    for url, key in zip(urls, keys, strict=True):
        response = api.client.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert "immutable" in response.headers["cache-control"]
        assert int(response.headers["content-length"]) == len(response.content)
        assert response.content.startswith(PNG_SIGNATURE)
        assert response.content == api.store.get_bytes(key)
    summary = api.client.get("/api/images/atlas/a/summary/conv1.png")
    assert summary.status_code == 200 and summary.content == api.store.get_bytes("atlas/a/summary/conv1.png")


def test_source_image_has_the_receptive_box_drawn(api):
    feature = api.client.get("/api/atlases/a/layers/conv1/channels/0").json()["features"][0]
    response = api.client.get(feature["source_url"], params={"scale": 2})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content)).convert("RGB")
    assert image.size == (128, 128)
    box = feature["box"]
    assert image.getpixel((box["left"] * 2, box["top"] * 2)) == (255, 32, 32)
    right = (box["left"] + box["width"]) * 2 - 1
    assert image.getpixel((right, box["top"] * 2 + 3)) == (255, 32, 32)


def test_diff_endpoint(api):
    body = api.client.get("/api/diffs/a/b", params={"limit": 3}).raise_for_status().json()
    assert body["layers"] == ["conv1", "conv5"]
    assert sum(body["counts"].values()) == 10 and body["page"]["total"] == 10
    rows = body["page"]["items"]
    assert [r["rank"] for r in rows] == [1, 2, 3] and body["page"]["next_offset"] == 3
    assert rows[0]["projection_grid_url_b"].startswith("/api/atlases/b/layers/")
    one = api.client.get("/api/diffs/a/b", params={"layer": "conv1", "status": "alive"}).json()
    assert one["layers"] == ["conv1"] and {r["status"] for r in one["page"]["items"]} == {"alive"}


def test_writing_a_diff_needs_the_token(api):
    request = {"run_a": "a", "run_b": "b", "name": f"nightly-{api.backend}"}
    assert api.client.post("/api/diffs", json=request).status_code == 401
    assert api.client.post("/api/diffs", json=request).headers["www-authenticate"] == "Bearer"
    wrong = {"Authorization": "Bearer not-the-token-at-all"}
    assert api.client.post("/api/diffs", json=request, headers=wrong).status_code == 401
    ok = api.client.post("/api/diffs", json=request, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 201, ok.text
    assert ok.json()["key"] == f"diffs/nightly-{api.backend}.parquet" and ok.json()["rows"] == 10
    table = pq.read_table(io.BytesIO(api.store.get_bytes(ok.json()["key"])))
    assert table.schema.remove_metadata().equals(DIFF_SCHEMA)


def test_a_written_diff_is_never_overwritten(api):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    first = {"run_a": "a", "run_b": "b", "name": f"once-{api.backend}"}
    assert api.client.post("/api/diffs", json=first, headers=auth).status_code == 201
    written = api.store.get_bytes(f"diffs/once-{api.backend}.parquet")
    again = api.client.post("/api/diffs", json=first, headers=auth)
    assert again.status_code == 200 and again.json()["rows"] == 10  # the same diff: already there
    other = {**first, "layers": ["conv1"]}  # a different diff under the taken name
    refused = api.client.post("/api/diffs", json=other, headers=auth)
    assert refused.status_code == 409 and "different diff" in refused.json()["detail"]
    assert api.store.get_bytes(f"diffs/once-{api.backend}.parquet") == written


def test_openapi_and_viewer_are_served(api):
    spec = api.client.get("/openapi.json").raise_for_status().json()
    paths = spec["paths"]
    for path in ("/api/runs", "/api/atlases/{run_id}/layers/{layer}/channels",
                 "/api/atlases/{run_id}/layers/{layer}/channels/{channel}", "/api/diffs/{run_a}/{run_b}",
                 "/api/images/{key}"):
        assert path in paths, path
    limit = next(p for p in paths["/api/runs"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] == MAX_PAGE
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert paths["/api/diffs"]["post"]["security"] == [{"HTTPBearer": []}]
    page = api.client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/viewer.js" in page.text
    assert api.client.get("/static/viewer.js").status_code == 200


def _tiles(api: Api, run: str = "a", layer: str = "conv5", **query) -> dict:
    response = api.client.get(f"/api/atlases/{run}/layers/{layer}/channels", params=query)
    assert response.status_code == 200, response.text
    return response.json()


def test_tiles_and_channels_name_classes_and_their_selectivity(api):
    atlas = api.client.get("/api/atlases/a").json()
    assert atlas["class_names"] == list(CLASS_NAMES) and atlas["dataset_uri"] is None
    tiles = {t["channel"]: t for t in _tiles(api)["items"]}
    assert len(tiles) == 6
    for channel, tile in tiles.items():
        top, share = _expected_selectivity(api.rows["a"], "conv5", channel)
        assert (tile["top_label"], tile["selectivity"]) == (top, pytest.approx(share) if share else None)
        assert tile["top_label_name"] == (CLASS_NAMES[top] if top is not None else None)
        assert tile["label_name"] == (CLASS_NAMES[tile["label"]] if tile["label"] >= 0 else None)
    assert tiles[1]["top_label"] == 2 and tiles[1]["selectivity"] == pytest.approx(4 / 7)
    assert tiles[1]["top_label_name"] == CLASS_NAMES[2]
    assert tiles[DEAD_CHANNEL]["dead"] and tiles[DEAD_CHANNEL]["selectivity"] is None
    unlabelled = tiles[UNLABELLED_CHANNEL]
    assert unlabelled["selectivity"] is None and unlabelled["label_name"] is None and not unlabelled["dead"]

    channel = api.client.get("/api/atlases/a/layers/conv5/channels/1").json()
    assert channel["top_label_name"] == CLASS_NAMES[2] and channel["selectivity"] == pytest.approx(4 / 7)
    names = [f["label_name"] for f in channel["features"]]
    assert names == [CLASS_NAMES[n] if n >= 0 else None for n in CHANNEL_1_LABELS]
    dead = api.client.get(f"/api/atlases/a/layers/conv5/channels/{DEAD_CHANNEL}").json()
    assert dead["dead"] and dead["selectivity"] is None and dead["top_label"] is None


def test_an_atlas_without_class_names_keeps_label_numbers(api):
    assert api.client.get("/api/atlases/b").json()["class_names"] is None
    for tile in _tiles(api, "b")["items"]:
        top, share = _expected_selectivity(api.rows["b"], "conv5", tile["channel"])
        assert tile["label_name"] is None and tile["top_label_name"] is None
        assert tile["top_label"] == top and tile["selectivity"] == pytest.approx(share)
    feature = api.client.get("/api/atlases/b/layers/conv1/channels/0").json()["features"][0]
    assert feature["label_name"] is None and feature["label"] == api.rows["b"][0]["label"]


def test_tiles_sort_and_filter_across_the_whole_layer(api):
    def order(**query) -> list[int]:
        return [t["channel"] for t in _tiles(api, **query)["items"]]

    tops = {r["channel"]: r["activation"] for r in api.rows["a"] if r["layer"] == "conv5" and r["rank"] == 0}
    assert order() == list(range(6))
    assert order(sort="activation") == sorted(tops, key=lambda c: (-tops[c], c))
    assert order(sort="dead") == [DEAD_CHANNEL, 0, 1, 2, 4, 5]
    shares = {c: _expected_selectivity(api.rows["a"], "conv5", c)[1] for c in tops}
    known = sorted((c for c in tops if shares[c] is not None), key=lambda c: (-shares[c], -tops[c], c))
    by_selectivity = order(sort="selectivity")
    assert by_selectivity[: len(known)] == known  # the unknown (dead, unlabelled) last
    assert set(by_selectivity[len(known):]) == {DEAD_CHANNEL, UNLABELLED_CHANNEL}
    # Paging walks the sorted order, not the channel order.
    first = _tiles(api, sort="activation", limit=4)
    rest = _tiles(api, sort="activation", limit=4, offset=4)
    assert [t["channel"] for t in first["items"] + rest["items"]] == order(sort="activation")
    assert first["total"] == 6 and first["next_offset"] == 4

    hidden = _tiles(api, hide_dead="true")
    assert DEAD_CHANNEL not in [t["channel"] for t in hidden["items"]] and hidden["total"] == 5
    picky = _tiles(api, min_selectivity=0.5)
    assert {t["channel"] for t in picky["items"]} == {c for c in known if shares[c] >= 0.5}
    assert all(t["selectivity"] >= 0.5 for t in picky["items"])
    of_class_2 = _tiles(api, label=2)
    assert 1 in [t["channel"] for t in of_class_2["items"]]
    assert {t["top_label"] for t in of_class_2["items"]} == {2}
    combined = _tiles(api, label=2, min_selectivity=0.5, sort="selectivity")
    assert combined["total"] == len(combined["items"]) <= of_class_2["total"]
    none = _tiles(api, label=999)  # no channel prefers a class the dataset does not have
    assert none["items"] == [] and none["total"] == 0 and none["next_offset"] is None


def test_diff_sorts_by_channel(api):
    body = api.client.get("/api/diffs/a/b", params={"sort": "channel", "limit": 50}).json()
    keys = [(r["layer"], r["channel"]) for r in body["page"]["items"]]
    assert keys == [("conv1", c) for c in range(4)] + [("conv5", c) for c in range(6)]
    ranked = api.client.get("/api/diffs/a/b", params={"limit": 50}).json()
    assert [r["rank"] for r in ranked["page"]["items"]] == list(range(1, 11))


def test_docs_pages_load_their_assets_from_this_server(api):
    page = api.client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "https://" not in page.text and "http://" not in page.text  # every URL is this server's
    assert "/docs-assets/swagger-ui-bundle.js" in page.text and "/openapi.json" in page.text
    assert api.client.get("/redoc").status_code == 404  # off: it would fetch its logo from a CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"):
        response = api.client.get(f"/docs-assets/{asset}")
        assert response.status_code == 200 and len(response.content) > 1000, asset
    assert api.client.get("/docs/oauth2-redirect").status_code == 200


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/images/../../../../etc/passwd",
        "/api/images/atlas/a/../../../../etc/hostname.png",
        "/api/images/%2e%2e/%2e%2e/etc/passwd.png",
        "/api/images/atlas/a/images/..%2f..%2fmanifest.png",
        "/api/images//etc/passwd",
        "/api/images/%2Fetc%2Fpasswd.png",
        "/api/images/atlas\\a\\summary\\conv1.png",
        "/api/images/s3://other/store/atlas/a/images/secret.png",
        "/api/atlases/../layers/conv1/channels",
    ],
)
def test_traversal_keys_are_refused(api, path):
    code, body = api.raw_get(path)
    assert code == 400, (code, body)
    assert body.startswith(b'{"detail":') and b"root:x:" not in body and PNG_SIGNATURE not in body


def test_keys_outside_committed_runs_are_not_served(api):
    for key in ("atlas/half/images/conv1/0000/patch-grid.png",  # uncommitted run
                "atlas/a/manifest.json",  # not a PNG
                "atlas/a/features.parquet",
                "train/t1/nothing.png",  # committed run, no such file
                "atlas/a/images/secret.png"):  # the other bucket's key, but in this store: absent
        response = api.client.get(f"/api/images/{key}")
        assert response.status_code == 404, key
    if api.other_bucket:
        code, body = api.raw_get(f"/api/images/{api.other_bucket}/store/atlas/a/images/secret.png")
        assert code == 404 and PNG_SIGNATURE not in body


@pytest.mark.parametrize(
    ("path", "code", "needle"),
    [
        ("/api/atlases/nope", 404, "no committed atlas run 'nope'"),
        ("/api/atlases/nope/layers/conv1/channels", 404, "no committed atlas run"),
        ("/api/atlases/a/layers/conv3/channels", 404, "has no layer 'conv3'"),
        ("/api/atlases/a/layers/conv3/channels/0", 404, "has no layer 'conv3'"),
        ("/api/atlases/a/layers/conv1/channels/4", 404, "channels 0..3, not 4"),
        ("/api/atlases/a/layers/conv1/channels/-1", 422, "greater than or equal"),
        ("/api/atlases/a/layers/conv1/channels/0/sources/9.png", 404, "no rank 9"),
        ("/api/runs/atlas/nope", 404, "no committed run"),
        ("/api/runs?kind=a/b", 422, "pattern"),
        ("/api/runs?since=yesterday", 422, "datetime"),
        ("/api/diffs/a/nope", 404, "no committed atlas run 'nope'"),
        ("/api/diffs/a/b?layer=conv2", 400, "not in both"),
        ("/api/diffs/a/b?status=sleeping", 422, "died"),
        ("/api/diffs/a/b?sort=activation", 422, "channel"),
        ("/api/atlases/a/layers/conv5/channels?sort=random", 422, "selectivity"),
        ("/api/atlases/a/layers/conv5/channels?min_selectivity=1.5", 422, "less than or equal to 1"),
        ("/api/atlases/a/layers/conv5/channels?label=-2", 422, "greater than or equal to 0"),
        ("/api/atlases/a/layers/conv3/channels?sort=selectivity", 404, "has no layer 'conv3'"),
    ],
)
def test_unknown_runs_layers_and_channels(api, path, code, needle):
    response = api.client.get(path)
    assert response.status_code == code, response.text
    assert needle in response.text


@pytest.mark.parametrize(
    "query",
    [{"limit": MAX_PAGE + 1}, {"limit": 10**9}, {"limit": 0}, {"offset": -1}, {"limit": "many"}],
)
def test_page_sizes_are_bounded(api, query):
    for path in ("/api/runs", "/api/atlases/a/layers/conv1/channels", "/api/diffs/a/b"):
        response = api.client.get(path, params=query)
        assert response.status_code == 422, (path, query, response.text)
    assert api.client.get("/api/runs", params={"limit": MAX_PAGE}).status_code == 200


def test_request_bodies_are_bounded_and_checked(api):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    big = {"run_a": "a", "run_b": "b", "layers": ["x" * 100] * 60}
    response = api.client.post("/api/diffs", json=big, headers=auth)
    assert response.status_code == 413 and "4096 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"run_a": "a", "run_b": "b", "layers": ['
        for _ in range(100):
            yield b'"' + b"y" * 100 + b'",'
        yield b'"conv1"]}'

    streamed = api.client.post("/api/diffs", content=chunks(),
                               headers={**auth, "Content-Type": "application/json"})
    assert streamed.status_code == 413
    for bad in ({"run_a": "a", "run_b": "b", "extra": 1}, {"run_a": "a", "run_b": "b", "name": "../x"},
                {"run_a": "a"}):
        assert api.client.post("/api/diffs", json=bad, headers=auth).status_code == 422, bad
    unknown = api.client.post("/api/diffs", json={"run_a": "a", "run_b": "nope"}, headers=auth)
    assert unknown.status_code == 404


# --- security and configuration --------------------------------------------------------------


def test_without_a_configured_token_mutations_are_disabled(tmp_path):
    store = open_store(str(tmp_path))
    write_atlas(store, "a", synthetic_rows("a"), images=False)
    app = create_app(Settings(store=str(tmp_path)))
    with serve(app) as url:
        response = httpx.post(f"{url}/api/diffs", json={"run_a": "a", "run_b": "a"},
                              headers={"Authorization": "Bearer anything-at-all-here"})
        assert response.status_code == 403 and "no token configured" in response.text
        assert httpx.get(f"{url}/api/runs").status_code == 200


def test_reads_from_other_machines_need_the_token(tmp_path):
    app = create_app(Settings(store=str(tmp_path), token=TOKEN))

    async def get(headers: dict[str, str]) -> int:
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
        # Host 127.0.0.1: a loopback name, so the Host check lets it in whoever the client is.
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return (await client.get("/api/runs", headers=headers)).status_code

    assert asyncio.run(get({})) == 401
    assert asyncio.run(get({"Authorization": "Bearer wrong-token-wrong-token"})) == 401
    assert asyncio.run(get({"Authorization": f"Bearer {TOKEN}"})) == 200


def test_routers_given_to_the_app_are_mounted_with_its_token_rules(tmp_path):
    router = APIRouter()

    @router.post("/api/schedules", dependencies=[Depends(require_token)], status_code=201)
    def add_schedule() -> dict[str, str]:
        return {"status": "added"}

    app = create_app(Settings(store=str(tmp_path), token=TOKEN), routers=[router])
    with serve(app) as url:
        assert httpx.post(f"{url}/api/schedules").status_code == 401
        ok = httpx.post(f"{url}/api/schedules", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 201 and ok.json() == {"status": "added"}


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"token": "short"}, "at least 16 characters"),
        ({"token": "has a space in it ok"}, "whitespace"),
        ({"store": "ftp://host/x"}, "unsupported URI scheme"),
        ({"endpoint_url": "localhost:9000"}, "not an http(s) URL"),
        ({"host": "0.0.0.0"}, "not loopback"),
        ({"default_page_size": 600}, "larger than max_page_size"),
        ({"max_page_size": 0}, "greater than or equal to 1"),
        ({"max_request_bytes": 10}, "greater than or equal to 1024"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"tokn": "x" * 20}, "Extra inputs are not permitted"),
    ],
)
def test_settings_fail_fast(fields, needle):
    with pytest.raises(ValidationError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Settings(**fields)
    assert Settings(host="0.0.0.0", token=TOKEN).host == "0.0.0.0"
