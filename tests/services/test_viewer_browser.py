"""The web atlas viewer in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright):
a layer grid of real atlases renders with its images loaded, a channel opens, the diff view shows
the drift between two atlases; and a layer of thousands of channels loads page by page."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs.atlas.tables import FEATURES_SCHEMA_V1 as FEATURES_SCHEMA
from jobs.store import Store, begin_run, open_store
from services.api.app import create_app
from services.http.settings import Settings
from tests.fixtures.api_server import serve

pytestmark = pytest.mark.ray

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 900}
# True when every <img> under `selector` that lies in the viewport has loaded a real image.
VISIBLE_IMAGES_LOADED = """(selector) => {
  const imgs = [...document.querySelectorAll(selector)].filter((img) => {
    const r = img.getBoundingClientRect();
    return r.bottom > 0 && r.top < window.innerHeight && r.width > 0;
  });
  return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
    try:
        yield page
    finally:
        context.close()


def test_layer_grid_channel_detail_and_diff(real_atlases, page, tmp_path):
    with serve(create_app(Settings(store=real_atlases.store))) as url:
        page.goto(f"{url}/#layer=conv5")
        # The newest atlas is selected; conv5 (64 channels) renders as 64 tiles with images.
        page.wait_for_function("() => document.querySelectorAll('#grid .tile').length === 64", timeout=30_000)
        assert page.input_value("#run") == real_atlases.after
        assert page.input_value("#layer") == "conv5"
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg="#grid img", timeout=30_000)
        first = page.locator("#grid .tile").first
        sizes = first.locator("img").evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.loading])")
        assert [s[1] for s in sizes] == ["lazy", "lazy"] and all(s[0] > 0 for s in sizes)
        grid_shot = tmp_path / "viewer-grid.png"
        page.screenshot(path=str(grid_shot))

        # Switch to conv1 and open channel 5: its 9 activations with source images and the small
        # receptive boxes drawn on them.
        page.select_option("#layer", "conv1")
        page.wait_for_function("() => document.querySelectorAll('#grid .tile').length === 32")
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg="#grid img", timeout=30_000)
        page.click("#grid .tile[data-channel='5']")
        page.wait_for_selector("#detail[open]")
        page.wait_for_function("() => document.querySelectorAll('#detail-table tbody tr').length === 9")
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg="#detail-table img.source", timeout=30_000)
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg=".detail-grids img", timeout=30_000)
        assert "conv1 · channel 5" in page.text_content("#detail-title")
        assert page.text_content("#detail-table tbody tr:first-child td:first-child") == "0"
        box = page.text_content("#detail-table tbody tr:first-child td:last-child")
        assert box.endswith("7×7")  # conv1 of zfnet-small sees 7x7 pixels
        detail_shot = tmp_path / "viewer-detail.png"
        page.screenshot(path=str(detail_shot))
        page.click("#detail-next")
        page.wait_for_function("() => document.querySelector('#detail-title').textContent.endsWith(' 6')")
        page.keyboard.press("Escape")
        page.wait_for_selector("#detail:not([open])", state="attached")

        # Diff view: the baseline is the atlas committed before the selected one.
        page.click("#tab-diff")
        page.wait_for_function(
            "() => document.querySelectorAll('#diff-table tbody tr').length === 32", timeout=30_000
        )
        assert page.input_value("#run-b") == real_atlases.before
        summary = page.text_content("#diff-summary")
        assert summary.startswith(f"{real_atlases.before} → {real_atlases.after}, conv1:")
        assert "view=diff" in page.url and f"b={real_atlases.before}" in page.url
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg="#diff-table img", timeout=30_000)
        ranks = page.locator("#diff-table tbody tr td:first-child").all_text_contents()
        assert ranks[:3] == ["1", "2", "3"]
        diff_shot = tmp_path / "viewer-diff.png"
        page.screenshot(path=str(diff_shot))

        # Filtering by status reloads the table from the API.
        page.select_option("#diff-status", "alive")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#diff-table .badge')].every(b => b.textContent === 'alive')"
        )
    assert page.errors == []
    for shot in (grid_shot, detail_shot, diff_shot):
        assert shot.stat().st_size > 10_000
        print(f"\nviewer screenshot: {shot}")


def _wide_atlas(store: Store, run_id: str, channels: int) -> None:
    """A schema-valid atlas with one layer of ``channels`` channels whose tiles share two PNGs."""
    run = begin_run(store, "atlas", run_id)
    tile = np.full((20, 20, 3), 90, np.uint8)
    tile[5:15, 5:15] = (30, 160, 220)
    proj_key = run.put_png("images/shared/projection-grid.png", tile)
    patch_key = run.put_png("images/shared/patch-grid.png", 255 - tile)
    rows = [
        {
            "layer": "fc6",
            "channel": c,
            "rank": r,
            "activation": float(10 - r + c % 7),
            "image_id": f"proc-{r:08d}",
            "image_index": r,
            "label": 0,
            "y": 0,
            "x": 0,
            "box_top": 0,
            "box_left": 0,
            "box_height": 64,
            "box_width": 64,
            "patch_key": patch_key,
            "projection_key": proj_key,
            "patch_grid_key": patch_key,
            "projection_grid_key": proj_key,
        }
        for c in range(channels)
        for r in range(9)
    ]
    run.write_table(
        "features.parquet",
        pa.Table.from_pylist(rows, schema=FEATURES_SCHEMA),
        FEATURES_SCHEMA,
        row_group_size=9 * 256,
    )
    run.commit(
        {
            "name": "wide",
            "layers": ["fc6"],
            "k": 9,
            "spec": {"model": {"variant": "zfnet-small"}, "dataset": {"format": "procedural"}},
        }
    )


def test_a_resnet_atlas_opens_with_its_model_line(resnet_runs, page, tmp_path):
    with serve(create_app(Settings(store=resnet_runs.store))) as url:
        page.goto(f"{url}/#run={resnet_runs.final}&layer=layer4")
        page.wait_for_function("() => document.querySelectorAll('#grid .tile').length >= 120", timeout=60_000)
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg="#grid img", timeout=30_000)
        assert "of 512 channels" in page.text_content("#status")
        model = page.text_content("#model")
        assert model.startswith("torchvision:resnet18 · weights ") and "final.pt" in model
        options = page.locator("#layer option").all_text_contents()
        assert options == ["layer1 (64)", "layer4 (512)"]
        page.click("#grid .tile[data-channel='3']")
        page.wait_for_function("() => document.querySelectorAll('#detail-table tbody tr').length === 4")
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg="#detail-table img.source", timeout=30_000)
        assert "layer4 · channel 3" in page.text_content("#detail-title")
        page.screenshot(path=str(tmp_path / "viewer-resnet.png"))
        assert not page.errors, page.errors


def test_thousands_of_tiles_load_page_by_page(page, tmp_path):
    channels = 3000
    store = open_store(str(tmp_path / "store"))
    _wide_atlas(store, "wide", channels)
    with serve(create_app(Settings(store=str(tmp_path / "store")))) as url:
        page.goto(url)
        page.wait_for_function("() => document.querySelectorAll('#grid .tile').length > 0", timeout=30_000)
        # One page of tiles, not 3000: the rest waits until the user scrolls near it.
        assert page.locator("#grid .tile").count() == 120
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg="#grid img", timeout=30_000)
        start = time.perf_counter()
        while page.locator("#grid .tile").count() < channels:
            status = page.text_content("#status")
            assert time.perf_counter() - start < 60, f"tiles stopped loading while scrolling: {status}"
            page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
            page.wait_for_timeout(50)
        scrolled = time.perf_counter() - start
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg="#grid img", timeout=30_000)
        assert page.text_content("#status") == f"fc6: {channels} of {channels} channels"
        channel_ids = page.locator("#grid .tile").evaluate_all("ts => ts.map(t => +t.dataset.channel)")
        assert channel_ids == list(range(channels))
    print(f"\n{channels} tiles loaded in {channels // 120 + 1} pages while scrolling, {scrolled:.1f} s")
    assert page.errors == []
