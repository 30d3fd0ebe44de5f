"""The web atlas viewer in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright):
a layer grid of real atlases renders with its images loaded, a channel opens, the diff view shows
the drift between two atlases; class names, selectivity, sorting, filters, jumping to a channel,
permalinks opened cold and back/forward work; the model line tells random weights from trained
ones; /docs renders with the network cut off; and a layer of thousands of channels loads page by
page. Screenshots go to one folder, printed at the end of each test that makes them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pyarrow as pa
import pytest

from jobs.atlas.tables import FEATURES_SCHEMA_V1 as FEATURES_SCHEMA
from jobs.store import Store, begin_run, open_store
from services.api.app import create_app
from services.http.settings import Settings
from tests.fixtures.api_server import serve
from tests.fixtures.synthetic_atlas import synthetic_rows, write_atlas
from zfcore.data import CLASS_NAMES

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

# True when the elements under `selector` are channels 0, 1, 2, ... in that order.
IN_CHANNEL_ORDER = """(selector) => {
  const channels = [...document.querySelectorAll(selector)].map((e) => +e.dataset.channel);
  return channels.length > 0 && channels.every((c, i) => c === i);
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


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every screenshot of this module is saved in (printed by the tests)."""
    return tmp_path_factory.mktemp("viewer-screenshots")


def screenshot(page, shots: Path, name: str) -> Path:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000, path
    return path


def tile_count_is(page, count: int, timeout: int = 30_000) -> None:
    page.wait_for_function("(n) => document.querySelectorAll('#grid .tile').length === n", arg=count,
                           timeout=timeout)


def grid_channels(page) -> list[int]:
    return page.locator("#grid .tile").evaluate_all("ts => ts.map(t => +t.dataset.channel)")


def hash_params(page) -> dict[str, str]:
    fragment = urlsplit(page.url).fragment
    return dict(part.split("=", 1) for part in fragment.split("&") if part)


def detail_shows(page, channel: int, run: str | None = None) -> None:
    """The channel dialog is open on ``channel`` (of ``run``) with its rows loaded."""
    title = f"{run} · " if run else ""
    page.wait_for_function(
        """([title, suffix]) => {
          const d = document.querySelector('#detail');
          const t = document.querySelector('#detail-title').textContent;
          return d.open && t.startsWith(title) && t.endsWith(suffix)
            && document.querySelectorAll('#detail-table tbody tr').length > 0
            && document.querySelector('#detail-class').textContent !== '';
        }""",
        arg=[title, f"channel {channel}"], timeout=30_000,
    )


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


def test_layer_grid_channel_detail_and_diff(real_atlases, page, shots):
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
        grid_shot = screenshot(page, shots, "viewer-grid")

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
        detail_shot = screenshot(page, shots, "viewer-detail")
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
        diff_shot = screenshot(page, shots, "viewer-diff")

        # Filtering by status reloads the table from the API.
        page.select_option("#diff-status", "alive")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#diff-table .badge')].every(b => b.textContent === 'alive')"
        )
    assert page.errors == []
    for shot in (grid_shot, detail_shot, diff_shot):
        print(f"\nviewer screenshot: {shot}")


def test_class_names_sort_filter_jump_permalinks_and_history(real_atlases, page, shots):
    after = real_atlases.after
    with serve(create_app(Settings(store=real_atlases.store))) as url:
        api = httpx.Client(base_url=url, timeout=30)
        # A channel's permalink opened cold: the run, the layer and the open channel come back.
        page.goto(f"{url}/#run={after}&layer=conv1&ch=5")
        detail_shows(page, 5, after)
        tile_count_is(page, 32)
        assert page.input_value("#run") == after and page.input_value("#layer") == "conv1"
        # Class names, not label numbers, in the channel's rows and its selectivity line.
        labels = page.locator("#detail-table tbody td.label").all_text_contents()
        assert len(labels) == 9 and set(labels) <= set(CLASS_NAMES), labels
        channel = api.get(f"/api/atlases/{after}/layers/conv1/channels/5").json()
        expected = f"Class selectivity {round(100 * channel['selectivity'])}%:"
        assert page.text_content("#detail-class").startswith(expected)
        assert page.text_content("#detail-class").endswith(f" are {channel['top_label_name']}.")
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg="#detail-table img.source", timeout=30_000)
        shot_permalink = screenshot(page, shots, "viewer-permalink-cold")

        # The model line and the run picker say what the atlas is of.
        model = page.text_content("#model")
        assert model.startswith("zfnet-small · weights ") and "after.pt" in model, model
        assert "procedural dataset" in model and "200 images" in model and "10 classes" in model
        assert "random" not in page.get_attribute("#model", "class")
        option = page.locator(f"#run option[value='{after}']").text_content()
        assert option.startswith(f"{after} · zfnet-small · after.pt · ")

        page.keyboard.press("Escape")
        page.wait_for_selector("#detail:not([open])", state="attached")
        # The dialog's close event, which takes the channel out of the URL, comes a task later.
        page.wait_for_function("() => !new URLSearchParams(location.hash.slice(1)).has('ch')")
        assert "ch" not in hash_params(page)
        # Tiles name the class each channel prefers, with its share of the top images.
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg="#grid img", timeout=30_000)
        names = page.locator("#grid .tile .class-name").all_text_contents()
        assert names and set(names) <= set(CLASS_NAMES), names

        # Sort by top activation: the grid follows the API's order, and the URL keeps it.
        page.select_option("#sort", "activation")
        by_activation = api.get(f"/api/atlases/{after}/layers/conv1/channels",
                                params={"sort": "activation", "limit": 100}).json()["items"]
        want = [t["channel"] for t in by_activation]
        page.wait_for_function("(want) => JSON.stringify([...document.querySelectorAll('#grid .tile')]"
                               ".map(t => +t.dataset.channel)) === JSON.stringify(want)", arg=want)
        assert want != sorted(want) and hash_params(page)["sort"] == "activation"
        page.wait_for_function(VISIBLE_IMAGES_LOADED, arg="#grid img", timeout=30_000)
        shot_sorted = screenshot(page, shots, "viewer-sorted-by-activation")

        # Filter: at least 50% selectivity.
        page.fill("#min-sel", "50")
        page.press("#min-sel", "Enter")
        picky = api.get(f"/api/atlases/{after}/layers/conv1/channels",
                        params={"sort": "activation", "min_selectivity": 0.5, "limit": 100}).json()
        assert 0 < picky["total"] < 32, picky["total"]
        tile_count_is(page, picky["total"])
        assert grid_channels(page) == [t["channel"] for t in picky["items"]]
        assert hash_params(page)["minsel"] == "50" and "filtered" in page.text_content("#status")

        # Jump to a channel.
        page.fill("#jump", "7")
        page.press("#jump", "Enter")
        detail_shows(page, 7, after)
        assert hash_params(page)["ch"] == "7"

        # Back and forward walk the views in order.
        page.go_back()  # the filtered grid, no channel open
        page.wait_for_selector("#detail:not([open])", state="attached")
        assert hash_params(page).get("minsel") == "50"
        page.go_back()  # no filter: every channel again, still sorted by activation
        tile_count_is(page, 32)
        assert grid_channels(page) == want and page.input_value("#min-sel") == ""
        page.go_back()  # sorted by channel number
        page.wait_for_function(IN_CHANNEL_ORDER, arg="#grid .tile")
        assert page.input_value("#sort") == "channel"
        page.go_back()  # the permalink: channel 5 open again
        detail_shows(page, 5, after)
        page.go_forward()
        page.wait_for_selector("#detail:not([open])", state="attached")

        # Editing the hash by hand renders that view: another run, layer and channel.
        page.evaluate(f"() => {{ location.hash = 'run={real_atlases.before}&layer=conv5&ch=2'; }}")
        detail_shows(page, 2, real_atlases.before)
        assert page.input_value("#run") == real_atlases.before and page.input_value("#layer") == "conv5"
        page.keyboard.press("Escape")
        tile_count_is(page, 64)

        # The diff view sorts by channel too; most changed is its default.
        page.click("#tab-diff")
        page.wait_for_function("() => document.querySelectorAll('#diff-table tbody tr').length === 64",
                               timeout=30_000)
        page.select_option("#diff-sort", "channel")
        page.wait_for_function(IN_CHANNEL_ORDER, arg="#diff-table tbody tr")
        assert hash_params(page)["dsort"] == "channel" and hash_params(page)["view"] == "diff"
        page.go_back()
        page.wait_for_function("() => document.querySelector('#diff-table tbody tr td')?.textContent === '1'")
        api.close()
    assert page.errors == []
    print(f"\nviewer screenshots in {shots}: {shot_permalink.name}, {shot_sorted.name}")


def _block_the_network(page) -> list[str]:
    """Abort every request that is not to this machine's test server; returns what was blocked."""
    blocked: list[str] = []

    def handle(route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.context.route("**/*", handle)
    return blocked


def test_offline_docs_and_a_random_weights_atlas(page, shots, tmp_path):
    store = open_store(str(tmp_path / "store"))
    write_atlas(store, "untrained", synthetic_rows("untrained"))  # no checkpoint: random weights
    blocked = _block_the_network(page)
    with serve(create_app(Settings(store=str(tmp_path / "store")))) as url:
        page.goto(url)
        tile_count_is(page, 4)
        model = page.text_content("#model")
        assert model.startswith("zfnet-small · random weights (no checkpoint): not a trained network"), model
        assert "random" in page.get_attribute("#model", "class")
        assert "· random weights ·" in page.locator("#run option").first.text_content()
        random_shot = screenshot(page, shots, "viewer-random-weights")

        page.goto(f"{url}/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
        assert "zfatlas" in page.text_content(".swagger-ui .info .title")
        assert page.locator(".swagger-ui .opblock").count() >= 8
        page.click(".swagger-ui .opblock-summary-path[data-path='/api/runs']")  # the UI works, not just shows
        page.wait_for_selector(".swagger-ui .opblock.is-open .parameters", timeout=10_000)
        docs_shot = screenshot(page, shots, "docs-offline")
    assert blocked == [], blocked
    assert page.errors == []
    print(f"\nscreenshots in {shots}: {random_shot.name}, {docs_shot.name}")


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


def test_a_resnet_atlas_opens_with_its_model_line(resnet_runs, page, shots):
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
        print(f"\nviewer screenshot: {screenshot(page, shots, 'viewer-resnet')}")
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
