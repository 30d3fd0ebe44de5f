// zfatlas atlas viewer: plain DOM, no framework. Data comes from the JSON API in pages; images
// load lazily (loading="lazy") and new pages are fetched when a sentinel below the last tile comes
// near the viewport (IntersectionObserver), so a layer with thousands of channels stays fast.
//
// The URL hash is the view: run, layer, tab, baseline, sort, filters and the open channel. Every
// control writes the hash (a new history entry) and render() makes the page match whatever the
// hash says, so a link opened cold, an edited hash and back/forward all show the same view.

const PAGE = 120;
const $ = (id) => document.getElementById(id);

// The hash's keys in the order they are written, and the values left out when they hold them.
const ROUTE_KEYS = ["run", "layer", "view", "b", "status", "dsort", "sort", "alive", "minsel", "cls", "ch", "of"];
const DEFAULTS = { view: "layer", sort: "channel", dsort: "rank" };
const CHOICES = {
  view: ["layer", "diff"],
  sort: ["channel", "activation", "selectivity", "dead"],
  dsort: ["rank", "channel"],
  status: ["", "died", "born", "alive", "dead"],
  alive: ["", "1"],
};

const state = {
  atlases: [], // run summaries, newest first
  atlasCache: new Map(), // run id -> /api/atlases/{run} answer
  run: null, atlas: null, layers: [],
  route: null, // the route on screen (after render made it valid)
  gridKey: null, gridOffset: 0, gridDone: true, gridToken: 0,
  diffKey: null, diffOffset: 0, diffDone: true, diffToken: 0,
  detailKey: null,
};

function setStatus(text, isError = false) {
  const node = $("status");
  node.textContent = text;
  node.classList.toggle("error", isError);
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

function percent(share) {
  return `${Math.round(100 * share)}%`;
}

// A label as a person reads it: the class name where the atlas knows it, else its number.
function labelText(name, label) {
  if (name) return name;
  return label === null || label === undefined || label < 0 ? "unknown" : String(label);
}

const runPath = (run) => `/api/atlases/${encodeURIComponent(run)}`;
const layerPath = (run, layer) => `${runPath(run)}/layers/${encodeURIComponent(layer)}`;

// --- the route: the URL hash <-> the view ---

function readRoute() {
  const params = new URLSearchParams(location.hash.slice(1));
  const route = {};
  for (const key of ROUTE_KEYS) route[key] = params.get(key) ?? DEFAULTS[key] ?? "";
  return route;
}

function hashOf(route) {
  const params = new URLSearchParams();
  for (const key of ROUTE_KEYS) {
    const value = route[key] ?? "";
    if (value !== "" && value !== (DEFAULTS[key] ?? "")) params.set(key, value);
  }
  return params.toString();
}

// Change the view: a new history entry (replace: the same entry, for steps that are not worth a
// Back press), then render it.
function go(changes, { replace = false } = {}) {
  const hash = hashOf({ ...readRoute(), ...changes });
  if (hash === location.hash.slice(1)) return Promise.resolve();
  history[replace ? "replaceState" : "pushState"](null, "", `#${hash}`);
  return render();
}

// Renders run one after another: a Back press during a slow load waits for it, then wins.
let rendering = Promise.resolve();
function render() {
  rendering = rendering.then(renderNow).catch((err) => setStatus(`could not load: ${err.message}`, true));
  return rendering;
}

async function renderNow() {
  if (!state.atlases.length) return;
  const wanted = readRoute();
  const run = state.atlases.some((r) => r.run_id === wanted.run) ? wanted.run : state.atlases[0].run_id;
  if (run !== state.run) await showRun(run);
  const route = validRoute(wanted, run);
  // A link with an unknown run, no layer or a bad value still shows a view: the URL says which.
  const hash = hashOf(route);
  if (hash !== location.hash.slice(1)) history.replaceState(null, "", `#${hash}`);
  state.route = route;
  syncControls(route);
  showPanels(route.view);
  if (route.view === "layer") renderGrid(route);
  else await renderDiff(route);
  await renderDetail(route);
}

function validRoute(wanted, run) {
  const route = { ...wanted, run };
  for (const [key, values] of Object.entries(CHOICES)) {
    if (!values.includes(route[key])) route[key] = DEFAULTS[key] ?? "";
  }
  const layer = state.layers.find((l) => l.name === route.layer) || state.layers[0];
  route.layer = layer ? layer.name : "";
  const others = state.atlases.filter((r) => r.run_id !== run).map((r) => r.run_id);
  if (!others.includes(route.b)) route.b = route.view === "diff" ? defaultBaseline(run) : "";
  const names = state.atlas.class_names || [];
  if (!isIndex(route.cls, names.length)) route.cls = "";
  if (!(route.minsel === "" || (Number(route.minsel) >= 0 && Number(route.minsel) <= 100))) route.minsel = "";
  if (!isIndex(route.ch, layer ? layer.channels : 0)) route.ch = "";
  if (!route.ch || !others.includes(route.of)) route.of = "";
  return route;
}

function isIndex(text, count) {
  return /^\d+$/.test(text) && Number(text) < count;
}

// The diff compares a baseline (default: the atlas committed just before the selected one, e.g.
// the previous night's) with the selected atlas.
function defaultBaseline(run) {
  const index = state.atlases.findIndex((r) => r.run_id === run);
  const previous = state.atlases[index + 1] || state.atlases.find((r) => r.run_id !== run);
  return previous ? previous.run_id : "";
}

function syncControls(route) {
  $("run").value = route.run;
  $("layer").value = route.layer;
  $("sort").value = route.sort;
  $("hide-dead").checked = route.alive === "1";
  $("min-sel").value = route.minsel;
  $("class").value = route.cls;
  $("run-b").value = route.b;
  $("diff-status").value = route.status;
  $("diff-sort").value = route.dsort;
}

function showPanels(view) {
  $("tab-layer").classList.toggle("active", view === "layer");
  $("tab-diff").classList.toggle("active", view === "diff");
  $("tab-layer").setAttribute("aria-pressed", String(view === "layer"));
  $("tab-diff").setAttribute("aria-pressed", String(view === "diff"));
  $("layer-view").hidden = view !== "layer";
  $("diff-view").hidden = view !== "diff";
  $("layer-controls").hidden = view !== "layer";
  $("diff-controls").hidden = view !== "diff";
}

// --- runs, layers and the model line ---

async function loadRuns() {
  const runs = [];
  for (let offset = 0; offset !== null;) {
    const page = await getJSON(`/api/runs?kind=atlas&offset=${offset}&limit=500`);
    runs.push(...page.items);
    offset = page.next_offset;
  }
  state.atlases = runs.reverse(); // newest first
  $("run").replaceChildren(...state.atlases.map((r) => el("option", { value: r.run_id, text: runOption(r) })));
  $("run-b").replaceChildren(...state.atlases.map((r) => el("option", { value: r.run_id, text: runOption(r) })));
  if (!state.atlases.length) setStatus("no atlas in this store yet: run `zfatlas run` with an atlas spec");
}

function tail(path, parts = 2) {
  return path.split("/").filter(Boolean).slice(-parts).join("/");
}

// Enough in the picker to tell atlases apart: an atlas of random weights says so.
function runOption(r) {
  const weights = r.model_checkpoint ? tail(r.model_checkpoint, 1) : "random weights";
  const when = (r.committed_at || "").slice(0, 16).replace("T", " ");
  return `${r.run_id} · ${r.model_arch || "?"} · ${weights} · ${when}`;
}

// What the atlas is of: architecture, weights, dataset.
function modelLine(atlas) {
  const s = atlas.summary;
  const weights = s.model_checkpoint
    ? `weights ${tail(s.model_checkpoint, 3)}`
    : "random weights (no checkpoint): not a trained network";
  const where = atlas.dataset_uri ? ` ${tail(atlas.dataset_uri, 3)}` : "";
  const images = s.images != null ? `, ${s.images} images` : "";
  const classes = atlas.class_names ? `, ${atlas.class_names.length} classes` : "";
  return `${s.model_arch || "?"} · ${weights} · ${s.dataset_format || "?"} dataset${where}${images}${classes}`;
}

async function showRun(run) {
  if (!state.atlasCache.has(run)) state.atlasCache.set(run, await getJSON(runPath(run)));
  const atlas = state.atlasCache.get(run);
  state.run = run;
  state.atlas = atlas;
  state.layers = atlas.layers;
  const model = $("model");
  model.textContent = modelLine(atlas);
  model.title = [atlas.summary.model_checkpoint, atlas.dataset_uri].filter(Boolean).join("\n");
  model.classList.toggle("random", !atlas.summary.model_checkpoint);
  $("layer").replaceChildren(...atlas.layers.map((l) =>
    el("option", { value: l.name, text: `${l.name} (${l.channels})` })));
  const names = atlas.class_names || [];
  $("class").replaceChildren(el("option", { value: "", text: "any class" }),
    ...names.map((name, label) => el("option", { value: String(label), text: name })));
  $("class-filter").hidden = !names.length; // an atlas before class names: labels are bare numbers
  for (const option of $("run-b").options) option.disabled = option.value === run;
}

// --- layer grid ---

function gridQuery(route, offset) {
  const params = new URLSearchParams({ offset, limit: PAGE });
  if (route.sort !== "channel") params.set("sort", route.sort);
  if (route.alive) params.set("hide_dead", "true");
  if (route.minsel !== "") params.set("min_selectivity", String(Number(route.minsel) / 100));
  if (route.cls !== "") params.set("label", route.cls);
  return params;
}

const isFiltered = (route) => Boolean(route.alive || route.minsel !== "" || route.cls !== "");

function renderGrid(route) {
  const key = `${route.run}\n${route.layer}\n${gridQuery(route, 0)}`;
  if (key === state.gridKey) return; // the same grid: keep its tiles and scroll position
  state.gridKey = key;
  state.gridToken += 1;
  state.gridOffset = 0;
  state.gridDone = false;
  $("grid").replaceChildren();
  loadMoreTiles();
}

function classLine(t) {
  if (t.dead) return el("span", { class: "class-line", text: "" });
  if (t.selectivity === null) {
    return el("span", { class: "class-line muted", text: "labels unknown", title: "no known label among its top images" });
  }
  const name = labelText(t.top_label_name, t.top_label);
  return el("span", {
    class: "class-line", title: `class selectivity: ${percent(t.selectivity)} of its top images are ${name}`,
  }, [el("span", { class: "class-name", text: name }), el("span", { class: "sel", text: ` ${percent(t.selectivity)}` })]);
}

function tile(t) {
  const open = () => go({ ch: String(t.channel), of: "" });
  const caption = el("figcaption", {}, [
    el("span", { class: "caption-row" }, [
      el("strong", { text: `#${t.channel}` }),
      el("span", { text: t.dead ? " dead" : ` ${fmt(t.top_activation)}`, class: t.dead ? "dead" : "" }),
    ]),
    classLine(t),
  ]);
  return el("figure", {
    class: `tile${t.dead ? " is-dead" : ""}`, tabindex: "0", "data-channel": t.channel,
    title: `channel ${t.channel}: top activation ${fmt(t.top_activation, 4)} on ${t.image_id}`
      + ` (${labelText(t.label_name, t.label)})`,
    onclick: open,
    onkeydown: (e) => { if (e.key === "Enter") open(); },
  }, [
    el("div", { class: "pair" }, [
      lazyImg(t.projection_grid_url, `channel ${t.channel} projections`, "proj", 112),
      lazyImg(t.patch_grid_url, `channel ${t.channel} patches`, "patch", 112),
    ]),
    caption,
  ]);
}

let gridBusy = false;
async function loadMoreTiles() {
  const route = state.route;
  if (gridBusy || state.gridDone || !route || route.view !== "layer" || !route.layer) return;
  gridBusy = true;
  const token = state.gridToken;
  try {
    const page = await getJSON(`${layerPath(route.run, route.layer)}/channels?${gridQuery(route, state.gridOffset)}`);
    if (token !== state.gridToken) return; // another layer, sort or filter was picked meanwhile
    $("grid").append(...page.items.map(tile));
    state.gridOffset = page.next_offset ?? page.total;
    state.gridDone = page.next_offset === null;
    setStatus(gridStatus(route, page.total));
  } catch (err) {
    setStatus(`could not load channels: ${err.message}`, true);
    state.gridDone = true;
  } finally {
    gridBusy = false;
  }
  if (!state.gridDone) rearm($("grid-sentinel"));
}

function gridStatus(route, total) {
  const shown = `${route.layer}: ${Math.min(state.gridOffset, total)} of ${total} channels`;
  if (!isFiltered(route)) return shown;
  const layer = state.layers.find((l) => l.name === route.layer);
  return `${shown} (filtered; the layer has ${layer ? layer.channels : "?"})`;
}

// --- channel detail ---

async function renderDetail(route) {
  const dialog = $("detail");
  if (route.ch === "") {
    state.detailKey = null;
    if (dialog.open) dialog.close();
    return;
  }
  const run = route.of || route.run;
  const key = `${run}\n${route.layer}\n${route.ch}`;
  if (key === state.detailKey && dialog.open) return;
  state.detailKey = key;
  await openDetail(run, route.layer, Number(route.ch), key);
}

async function openDetail(run, layer, channel, key) {
  const dialog = $("detail");
  $("detail-title").textContent = `${run} · ${layer} · channel ${channel}`;
  $("detail-class").textContent = "";
  $("detail-table").tBodies[0].replaceChildren();
  if (!dialog.open) dialog.showModal();
  try {
    const data = await getJSON(`${layerPath(run, layer)}/channels/${channel}`);
    if (state.detailKey !== key) return; // stepped on or closed meanwhile
    $("detail-proj-grid").src = data.projection_grid_url || "";
    $("detail-patch-grid").src = data.patch_grid_url || "";
    $("detail-class").textContent = selectivityText(data);
    $("detail-table").tBodies[0].replaceChildren(...data.features.map(featureRow));
  } catch (err) {
    setStatus(`could not load channel ${channel}: ${err.message}`, true);
  }
}

function selectivityText(c) {
  if (c.dead) return "This channel never fired on the dataset: it has no top images.";
  if (c.selectivity === null) return "Class selectivity: unknown (no known label among its top images).";
  const known = c.features.filter((f) => f.label >= 0).length;
  const hits = Math.round(c.selectivity * known);
  return `Class selectivity ${percent(c.selectivity)}: ${hits} of its ${known} top images with a known label`
    + ` are ${labelText(c.top_label_name, c.top_label)}.`;
}

function featureRow(f) {
  return el("tr", {}, [
    el("td", { text: f.rank }),
    el("td", {}, [sourceImage(f)]),
    el("td", {}, [lazyImg(f.projection_url, `projection ${f.rank}`, "small", 64)]),
    el("td", {}, [lazyImg(f.patch_url, `patch ${f.rank}`, "small", 64)]),
    el("td", { text: fmt(f.activation, 4) }),
    el("td", { text: f.image_id }),
    el("td", { class: "label", text: labelText(f.label_name, f.label), title: `label ${f.label}` }),
    el("td", { text: `${f.y}, ${f.x}` }),
    el("td", { text: `${f.box.top}, ${f.box.left}, ${f.box.height}×${f.box.width}` }),
  ]);
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

// ←/→ walk the layer's channels in number order; each step replaces the history entry, so Back
// returns to the grid rather than through every channel seen.
function stepDetail(delta) {
  const route = state.route;
  if (!route || route.ch === "") return;
  const info = state.layers.find((l) => l.name === route.layer);
  const next = Number(route.ch) + delta;
  if (!info || next < 0 || next >= info.channels) return;
  go({ ch: String(next) }, { replace: true });
}

function jumpTo(text) {
  const info = state.layers.find((l) => l.name === state.route?.layer);
  const count = info ? info.channels : 0;
  if (!isIndex(text.trim(), count)) {
    setStatus(`no channel ${text.trim() || "?"} in ${info ? info.name : "this layer"}: it has 0..${count - 1}`, true);
    return;
  }
  go({ ch: String(Number(text)), of: "" });
}

// --- diff view ---

async function renderDiff(route) {
  const key = `${route.b}\n${route.run}\n${route.layer}\n${route.status}\n${route.dsort}`;
  if (key === state.diffKey) return;
  state.diffKey = key;
  state.diffToken += 1;
  state.diffOffset = 0;
  state.diffDone = false;
  $("diff-table").tBodies[0].replaceChildren();
  $("diff-summary").textContent = "";
  if (!route.b) {
    $("diff-summary").textContent = "There is only one atlas in this store: nothing to compare with yet.";
    state.diffDone = true;
    return;
  }
  await loadMoreDiff();
}

function statusBadge(status) {
  return el("span", { class: `badge ${status}`, text: status });
}

function diffRow(r, route) {
  const shared = el("span", { class: "shared" }, [
    el("meter", { min: 0, max: r.k, value: r.shared_topk }),
    el("span", { text: ` ${r.shared_topk}/${r.k}` }),
  ]);
  const change = r.relative_change === null ? "–"
    : `${r.relative_change >= 0 ? "+" : ""}${(100 * r.relative_change).toFixed(1)}%`;
  const grids = (proj, patch, run) => el("div", {
    class: "pair clickable", title: `open channel ${r.channel} of ${run}`,
    onclick: () => go({ layer: r.layer, ch: String(r.channel), of: run === route.run ? "" : run }),
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
    el("td", {}, [grids(r.projection_grid_url_a, r.patch_grid_url_a, route.b)]),
    el("td", {}, [grids(r.projection_grid_url_b, r.patch_grid_url_b, route.run)]),
  ]);
}

let diffBusy = false;
async function loadMoreDiff() {
  const route = state.route;
  if (diffBusy || state.diffDone || !route || route.view !== "diff" || !route.b) return;
  diffBusy = true;
  const token = state.diffToken;
  try {
    const params = new URLSearchParams({ offset: state.diffOffset, limit: PAGE });
    if (route.layer) params.append("layer", route.layer);
    if (route.status) params.set("status", route.status);
    if (route.dsort !== "rank") params.set("sort", route.dsort);
    // A = the baseline, B = the selected atlas.
    const data = await getJSON(`/api/diffs/${encodeURIComponent(route.b)}/${encodeURIComponent(route.run)}?${params}`);
    if (token !== state.diffToken) return;
    const c = data.counts;
    const order = route.dsort === "rank" ? "Most changed first (deaths, births, then fewest shared top images)."
      : "By channel number.";
    $("diff-summary").textContent = `${data.run_a} → ${data.run_b}, ${data.layers.join(", ")}: `
      + `${c.died} died, ${c.born} born, ${c.alive} alive, ${c.dead} dead. ${order}`
      + (data.warnings.length ? ` Note: ${data.warnings.join("; ")}` : "");
    $("diff-table").tBodies[0].append(...data.page.items.map((r) => diffRow(r, route)));
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

function wireControls() {
  const on = (id, event, handler) => $(id).addEventListener(event, handler);
  on("run", "change", (e) => go({ run: e.target.value, ch: "", of: "" }));
  on("layer", "change", (e) => go({ layer: e.target.value, ch: "", of: "" }));
  on("tab-layer", "click", () => go({ view: "layer" }));
  on("tab-diff", "click", () => go({ view: "diff" }));
  on("sort", "change", (e) => go({ sort: e.target.value }));
  on("hide-dead", "change", (e) => go({ alive: e.target.checked ? "1" : "" }));
  on("min-sel", "change", (e) => go({ minsel: e.target.value.trim() }));
  on("class", "change", (e) => go({ cls: e.target.value }));
  on("run-b", "change", (e) => go({ b: e.target.value }));
  on("diff-status", "change", (e) => go({ status: e.target.value }));
  on("diff-sort", "change", (e) => go({ dsort: e.target.value }));
  on("jump-form", "submit", (e) => { e.preventDefault(); jumpTo($("jump").value); });
  on("detail-prev", "click", () => stepDetail(-1));
  on("detail-next", "click", () => stepDetail(1));
  on("detail", "keydown", (e) => {
    if (e.key === "ArrowLeft") stepDetail(-1);
    if (e.key === "ArrowRight") stepDetail(1);
  });
  // Closing the dialog (Escape, ✕) is a view change like any other; when render() closed it
  // because the hash no longer names a channel, the hash is already right and go() does nothing.
  on("detail", "close", () => go({ ch: "", of: "" }));
  // Back/forward and hand edits of the hash; render() ignores a hash already on screen.
  window.addEventListener("popstate", render);
  window.addEventListener("hashchange", render);
}

async function main() {
  observe($("grid-sentinel"), loadMoreTiles);
  observe($("diff-sentinel"), loadMoreDiff);
  wireControls();
  try {
    setStatus("loading runs…");
    await loadRuns();
    await render();
  } catch (err) {
    setStatus(`could not load: ${err.message}`, true);
  }
}

main();
