// zfatlas atlas viewer: plain DOM, no framework. Data comes from the JSON API in pages; images
// load lazily (loading="lazy") and new pages are fetched when a sentinel below the last tile comes
// near the viewport (IntersectionObserver), so a layer with thousands of channels stays fast.

const PAGE = 120;
const $ = (id) => document.getElementById(id);

const state = {
  run: null, layer: null, view: "layer", runB: null, status: "",
  atlases: [], layers: [], channels: 0,
  gridOffset: 0, gridDone: true, gridToken: 0,
  diffOffset: 0, diffDone: true, diffToken: 0,
  detail: null, // {run, layer, channel}
};

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response.json();
}

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function lazyImg(src, alt, cls, side) {
  if (!src) return el("span", { class: `${cls} missing`, text: "no image" });
  return el("img", { src, alt, class: cls, loading: "lazy", decoding: "async", width: side, height: side });
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toPrecision(digits);
}

// --- URL state (#run=..&layer=..&view=diff&b=..) so a view can be shared ---

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  return { run: params.get("run"), layer: params.get("layer"), view: params.get("view"), b: params.get("b") };
}

function writeHash() {
  const params = new URLSearchParams();
  if (state.run) params.set("run", state.run);
  if (state.layer) params.set("layer", state.layer);
  if (state.view === "diff") params.set("view", "diff");
  if (state.view === "diff" && state.runB) params.set("b", state.runB);
  history.replaceState(null, "", `#${params}`);
}

// --- runs and layers ---

async function loadRuns() {
  const runs = [];
  for (let offset = 0; offset !== null;) {
    const page = await getJSON(`/api/runs?kind=atlas&offset=${offset}&limit=500`);
    runs.push(...page.items);
    offset = page.next_offset;
  }
  state.atlases = runs.reverse(); // newest first
  const select = $("run");
  select.replaceChildren(...state.atlases.map((r) =>
    el("option", { value: r.run_id, text: `${r.run_id} (${r.committed_at.slice(0, 16).replace("T", " ")})` })));
  if (!state.atlases.length) {
    setStatus("no atlas in this store yet: run `zfatlas run` with an atlas spec");
  }
}

// What the atlas is of, so an atlas of random weights cannot pass for a trained one.
function modelLine(s) {
  const weights = s.model_checkpoint
    ? `weights ${s.model_checkpoint.split("/").slice(-3).join("/")}`
    : "random init weights (no checkpoint)";
  const images = s.images != null ? `${s.images} images` : "";
  return `${s.model_arch || "?"} · ${weights} · ${s.dataset_format || "?"} dataset ${images}`.trim();
}

async function selectRun(runId, wantedLayer) {
  state.run = runId;
  $("run").value = runId;
  const atlas = await getJSON(`/api/atlases/${encodeURIComponent(runId)}`);
  $("model").textContent = modelLine(atlas.summary);
  state.layers = atlas.layers;
  $("layer").replaceChildren(...atlas.layers.map((l) =>
    el("option", { value: l.name, text: `${l.name} (${l.channels})` })));
  const layer = atlas.layers.find((l) => l.name === wantedLayer) || atlas.layers[0];
  fillRunB();
  if (layer) await selectLayer(layer.name);
}

// The diff compares a baseline (default: the atlas committed just before the selected one, e.g.
// the previous night's) with the selected atlas.
function fillRunB() {
  const current = $("run-b").value || state.runB;
  const others = state.atlases.filter((r) => r.run_id !== state.run);
  $("run-b").replaceChildren(...others.map((r) => el("option", { value: r.run_id, text: r.run_id })));
  const index = state.atlases.findIndex((r) => r.run_id === state.run);
  const previous = state.atlases.slice(index + 1)[0];
  const keep = others.find((r) => r.run_id === current) || previous || others[0];
  state.runB = keep ? keep.run_id : null;
  if (keep) $("run-b").value = keep.run_id;
}

async function selectLayer(name) {
  state.layer = name;
  $("layer").value = name;
  const info = state.layers.find((l) => l.name === name);
  state.channels = info ? info.channels : 0;
  writeHash();
  if (state.view === "diff") await resetDiff();
  else resetGrid();
}

// --- layer grid ---

function tile(t) {
  const caption = el("figcaption", {}, [
    el("strong", { text: `#${t.channel}` }),
    el("span", { text: t.dead ? " dead" : ` ${fmt(t.top_activation)}`, class: t.dead ? "dead" : "" }),
  ]);
  return el("figure", {
    class: `tile${t.dead ? " is-dead" : ""}`, tabindex: "0", "data-channel": t.channel,
    title: `channel ${t.channel}: top activation ${fmt(t.top_activation, 4)} on ${t.image_id}`,
    onclick: () => openDetail(state.run, state.layer, t.channel),
    onkeydown: (e) => { if (e.key === "Enter") openDetail(state.run, state.layer, t.channel); },
  }, [
    el("div", { class: "pair" }, [
      lazyImg(t.projection_grid_url, `channel ${t.channel} projections`, "proj", 112),
      lazyImg(t.patch_grid_url, `channel ${t.channel} patches`, "patch", 112),
    ]),
    caption,
  ]);
}

function resetGrid() {
  state.gridToken += 1;
  state.gridOffset = 0;
  state.gridDone = false;
  $("grid").replaceChildren();
  loadMoreTiles();
}

let gridBusy = false;
async function loadMoreTiles() {
  if (gridBusy || state.gridDone || !state.run || !state.layer) return;
  gridBusy = true;
  const token = state.gridToken;
  try {
    const url = `/api/atlases/${encodeURIComponent(state.run)}/layers/${encodeURIComponent(state.layer)}`
      + `/channels?offset=${state.gridOffset}&limit=${PAGE}`;
    const page = await getJSON(url);
    if (token !== state.gridToken) return; // the user picked another layer meanwhile
    $("grid").append(...page.items.map(tile));
    state.gridOffset = page.next_offset ?? page.total;
    state.gridDone = page.next_offset === null;
    setStatus(`${state.layer}: ${Math.min(state.gridOffset, page.total)} of ${page.total} channels`);
  } catch (err) {
    setStatus(`could not load channels: ${err.message}`, true);
    state.gridDone = true;
  } finally {
    gridBusy = false;
  }
  if (!state.gridDone) rearm($("grid-sentinel"));
}

// --- channel detail ---

async function openDetail(run, layer, channel) {
  state.detail = { run, layer, channel };
  const dialog = $("detail");
  $("detail-title").textContent = `${run} · ${layer} · channel ${channel}`;
  $("detail-table").tBodies[0].replaceChildren();
  if (!dialog.open) dialog.showModal();
  try {
    const data = await getJSON(`/api/atlases/${encodeURIComponent(run)}/layers/${encodeURIComponent(layer)}`
      + `/channels/${channel}`);
    if (state.detail.channel !== channel || state.detail.run !== run) return;
    $("detail-proj-grid").src = data.projection_grid_url || "";
    $("detail-patch-grid").src = data.patch_grid_url || "";
    const rows = data.features.map((f) => el("tr", {}, [
      el("td", { text: f.rank }),
      el("td", {}, [sourceImage(f)]),
      el("td", {}, [lazyImg(f.projection_url, `projection ${f.rank}`, "small", 64)]),
      el("td", {}, [lazyImg(f.patch_url, `patch ${f.rank}`, "small", 64)]),
      el("td", { text: fmt(f.activation, 4) }),
      el("td", { text: f.image_id }),
      el("td", { text: f.label }),
      el("td", { text: `${f.y}, ${f.x}` }),
      el("td", { text: `${f.box.top}, ${f.box.left}, ${f.box.height}×${f.box.width}` }),
    ]));
    $("detail-table").tBodies[0].replaceChildren(...rows);
  } catch (err) {
    setStatus(`could not load channel ${channel}: ${err.message}`, true);
  }
}

function sourceImage(f) {
  const img = el("img", {
    src: f.source_url, alt: `${f.image_id} with receptive box`, class: "source", loading: "lazy",
    decoding: "async", width: 128, height: 128,
  });
  img.addEventListener("error", () => {
    img.replaceWith(el("span", { class: "missing", text: "dataset not readable by this server" }));
  }, { once: true });
  return img;
}

function stepDetail(delta) {
  if (!state.detail) return;
  const { run, layer, channel } = state.detail;
  const info = state.layers.find((l) => l.name === layer);
  const next = channel + delta;
  if (!info || next < 0 || next >= info.channels) return;
  openDetail(run, layer, next);
}

// --- diff view ---

async function resetDiff() {
  state.diffToken += 1;
  state.diffOffset = 0;
  state.diffDone = false;
  $("diff-table").tBodies[0].replaceChildren();
  $("diff-summary").textContent = "";
  writeHash();
  if (!state.runB) {
    $("diff-summary").textContent = "There is only one atlas in this store: nothing to compare with yet.";
    state.diffDone = true;
    return;
  }
  await loadMoreDiff();
}

function statusBadge(status) {
  return el("span", { class: `badge ${status}`, text: status });
}

function diffRow(r) {
  const shared = el("span", { class: "shared" }, [
    el("meter", { min: 0, max: r.k, value: r.shared_topk }),
    el("span", { text: ` ${r.shared_topk}/${r.k}` }),
  ]);
  const change = r.relative_change === null ? "–"
    : `${r.relative_change >= 0 ? "+" : ""}${(100 * r.relative_change).toFixed(1)}%`;
  const grids = (proj, patch, run) => el("div", {
    class: "pair clickable", title: `open channel ${r.channel} of ${run}`,
    onclick: () => openDetail(run, r.layer, r.channel),
  }, [
    lazyImg(proj, `${run} channel ${r.channel} projections`, "proj", 88),
    lazyImg(patch, `${run} channel ${r.channel} patches`, "patch", 88),
  ]);
  return el("tr", { "data-channel": r.channel }, [
    el("td", { text: r.rank }),
    el("td", { text: `${r.layer} #${r.channel}` }),
    el("td", {}, [statusBadge(r.status)]),
    el("td", {}, [shared]),
    el("td", { text: `${fmt(r.top_activation_a)} → ${fmt(r.top_activation_b)}` }),
    el("td", { text: change, class: r.delta_activation < 0 ? "down" : "up" }),
    el("td", {}, [grids(r.projection_grid_url_a, r.patch_grid_url_a, state.runB)]),
    el("td", {}, [grids(r.projection_grid_url_b, r.patch_grid_url_b, state.run)]),
  ]);
}

let diffBusy = false;
async function loadMoreDiff() {
  if (diffBusy || state.diffDone || !state.run || !state.runB) return;
  diffBusy = true;
  const token = state.diffToken;
  try {
    const params = new URLSearchParams({ offset: state.diffOffset, limit: PAGE });
    if (state.layer) params.append("layer", state.layer);
    if (state.status) params.set("status", state.status);
    // A = the baseline picked in "against", B = the selected atlas.
    const pair = `${encodeURIComponent(state.runB)}/${encodeURIComponent(state.run)}`;
    const data = await getJSON(`/api/diffs/${pair}?${params}`);
    if (token !== state.diffToken) return;
    const c = data.counts;
    $("diff-summary").textContent = `${data.run_a} → ${data.run_b}, ${data.layers.join(", ")}: `
      + `${c.died} died, ${c.born} born, ${c.alive} alive, ${c.dead} dead. `
      + "Most changed first (deaths, births, then fewest shared top images)."
      + (data.warnings.length ? ` Note: ${data.warnings.join("; ")}` : "");
    $("diff-table").tBodies[0].append(...data.page.items.map(diffRow));
    state.diffOffset = data.page.next_offset ?? data.page.total;
    state.diffDone = data.page.next_offset === null;
    setStatus(`diff: ${Math.min(state.diffOffset, data.page.total)} of ${data.page.total} channels`);
  } catch (err) {
    setStatus(`could not diff: ${err.message}`, true);
    state.diffDone = true;
  } finally {
    diffBusy = false;
  }
  if (!state.diffDone) rearm($("diff-sentinel"));
}

async function showView(view) {
  state.view = view;
  $("tab-layer").classList.toggle("active", view === "layer");
  $("tab-diff").classList.toggle("active", view === "diff");
  $("layer-view").hidden = view !== "layer";
  $("diff-view").hidden = view !== "diff";
  $("diff-controls").hidden = view !== "diff";
  writeHash();
  if (view === "diff") await resetDiff();
  else if (!$("grid").children.length) resetGrid();
}

// --- wiring ---

const observers = new Map();

function observe(sentinel, loadMore) {
  const observer = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadMore();
  }, { rootMargin: "800px 0px" });
  observer.observe(sentinel);
  observers.set(sentinel, observer);
}

// An observer reports changes only; a sentinel that stayed near the viewport while a page was
// loading would never be reported again. Observing it anew reports its current state: if it is
// still near (tall screen, fast scrolling), the next page loads at once.
function rearm(sentinel) {
  const observer = observers.get(sentinel);
  if (!observer) return;
  observer.unobserve(sentinel);
  observer.observe(sentinel);
}

async function main() {
  observe($("grid-sentinel"), loadMoreTiles);
  observe($("diff-sentinel"), loadMoreDiff);
  $("run").addEventListener("change", (e) => selectRun(e.target.value, state.layer));
  $("layer").addEventListener("change", (e) => selectLayer(e.target.value));
  $("tab-layer").addEventListener("click", () => showView("layer"));
  $("tab-diff").addEventListener("click", () => showView("diff"));
  $("run-b").addEventListener("change", (e) => { state.runB = e.target.value; resetDiff(); });
  $("diff-status").addEventListener("change", (e) => { state.status = e.target.value; resetDiff(); });
  $("detail-prev").addEventListener("click", () => stepDetail(-1));
  $("detail-next").addEventListener("click", () => stepDetail(1));
  $("detail").addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft") stepDetail(-1);
    if (e.key === "ArrowRight") stepDetail(1);
  });
  try {
    setStatus("loading runs…");
    await loadRuns();
    const wanted = readHash();
    if (wanted.b) state.runB = wanted.b;
    const first = state.atlases.find((r) => r.run_id === wanted.run) || state.atlases[0];
    if (first) {
      await selectRun(first.run_id, wanted.layer);
      if (wanted.view === "diff") await showView("diff");
    }
  } catch (err) {
    setStatus(`could not load: ${err.message}`, true);
  }
}

main();
