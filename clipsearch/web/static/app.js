// The page of `clipsearch serve`: a search box, a justified grid of thumbnails and a lightbox, over the JSON API
// documented in clipsearch/web/app.py. Every search lives in the URL (q, like, upload, box, in, after, before,
// weak, threshold), so a search can be bookmarked, reloaded and gone back to; the page renders whatever the URL
// says. An optional k in the URL sets how many results each request fetches. A text search is cut where its good
// matches end (the API's calibrated "auto" threshold); weak=1 shows the weaker matches too, marked. The tiles ticked
// for "Learn as…" are in the URL too (sel=ID,ID,…): a basket kept across searches, reloads, back and forward.

const PAGE_SIZE = 50;
const STATE_KEYS = ["q", "like", "upload", "box", "in", "after", "before", "k", "weak", "threshold", "sel"];
const SEARCH_KEYS = STATE_KEYS.filter((key) => key !== "sel"); // what the search API takes
const ID = /^[0-9]{1,18}$/; // a stored image's id (clipsearch/web/app.py)
const MIN_BOX = 0.03; // a drag smaller than this (a fraction of the photo's side) is a click, not a box
const BOX_STEP = 0.05; // how far an arrow key moves or resizes the keyboard's box (a fraction of the photo's side)
const CONCEPT_NAME = /^[A-Za-z][A-Za-z0-9_]{0,63}$/; // what can follow @ in a query (retrieval/concepts.py)

const $ = (id) => document.getElementById(id);

const view = {
  hits: [], // the results shown, in order
  next: null, // next_offset of the last page, or null
  cut: false, // whether the search's results are cut at a relevance cutoff (weaker ones left out or marked)
  ranked: 0, // how many images the search ranked (total_hint)
  loading: false,
  generation: 0, // bumped by every new search, so an older search's late answer is dropped
  current: -1, // the hit shown in the lightbox
  opener: null, // the element to give focus back to when the lightbox closes
  keyBox: null, // [x0, y0, x1, y1] of the box being drawn with the keyboard, or null
  images: null, // how many images the store holds (from /api/status)
  selected: new Set(), // ids of the tiles ticked to learn a concept from (the URL's sel, kept across searches)
};

// ---- the URL is the state ----------------------------------------------------------------------

function readState() {
  const params = new URLSearchParams(location.search);
  const state = {};
  for (const key of STATE_KEYS) {
    const value = params.get(key);
    if (value) state[key] = value;
  }
  return state;
}

function stateUrl(state) {
  const params = new URLSearchParams();
  for (const key of STATE_KEYS) if (state[key]) params.set(key, state[key]);
  const query = params.toString();
  return query ? `/?${query}` : "/";
}

function filtersOf(state) {
  // what a new search keeps of the current one: its filters, and the selection
  const filters = {};
  for (const key of ["in", "after", "before", "k", "sel"]) if (state[key]) filters[key] = state[key];
  return filters;
}

function selectionOf(state) {
  return new Set((state.sel || "").split(",").filter((id) => ID.test(id)));
}

function withSelection(state) {
  // the state with the current selection as its sel
  const next = { ...state };
  if (view.selected.size) next.sel = [...view.selected].join(",");
  else delete next.sel;
  return next;
}

function go(state) {
  const url = stateUrl(state);
  if (url !== location.pathname + location.search) history.pushState(null, "", url);
  render();
}

// ---- talking to the API ------------------------------------------------------------------------

async function api(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error : `the server answered ${response.status}`;
    throw new Error(message);
  }
  return body;
}

async function loadStatus() {
  try {
    const status = await api("/api/status");
    view.images = status.images;
    fillFolders(status.roots.map((root) => root.name));
    $("status").textContent =
      `${status.images.toLocaleString()} photo${status.images === 1 ? "" : "s"} · ${status.model} · store “${status.db}”`;
  } catch (error) {
    $("status").textContent = error.message;
  }
}

function fillFolders(names) {
  const select = $("in");
  for (const name of names) select.append(new Option(name, name));
}

// ---- rendering ---------------------------------------------------------------------------------

function render() {
  const state = readState();
  view.selected = selectionOf(state);
  showSelection();
  syncControls(state);
  showQuery(state);
  clearResults();
  if (!state.q && !state.like && !state.upload) {
    showStart();
    return;
  }
  document.title = `${state.q || "Similar photos"} · clipsearch`;
  search(state, 0);
}

function syncControls(state) {
  $("q").value = state.q || "";
  const folder = $("in");
  if (state.in && ![...folder.options].some((option) => option.value === state.in)) {
    folder.append(new Option(state.in, state.in)); // a sub-folder picked in the lightbox
  }
  folder.value = state.in || "";
  $("after").value = state.after || "";
  $("before").value = state.before || "";
  const filtered = Boolean(state.in || state.after || state.before);
  $("clear-filters").hidden = !filtered;
  for (const id of ["in", "after", "before"]) $(id).closest(".chip").classList.toggle("active", Boolean(state[id]));
  for (const chip of document.querySelectorAll("#concepts .concept")) {
    chip.setAttribute("aria-pressed", String(chip.textContent === state.q));
    chip.classList.toggle("active", chip.textContent === state.q);
  }
}

function showQuery(state) {
  const id = encodeURIComponent(state.like || state.upload || ""); // from the URL: one path segment, whatever it holds
  const image = state.like ? `/thumb/${id}` : state.upload ? `/upload-thumb/${id}` : null;
  $("query").hidden = !image;
  if (!image) return;
  $("query-img").src = image;
  const box = parseBox(state.box);
  const mark = $("query-box");
  mark.hidden = !box;
  if (box) placeBox(mark, box);
  const what = state.like ? "this photo" : "your image";
  $("query-text").textContent = `${box ? "Similar to the boxed part of" : "Similar to"} ${what}${state.q ? ` and “${state.q}”` : ""}`;
}

function clearResults() {
  view.generation += 1;
  view.hits = [];
  view.next = null;
  view.cut = false;
  view.loading = false;
  $("results").replaceChildren();
  $("more").hidden = true;
  $("weaker").hidden = true;
  showMessage(null);
}

function showStart() {
  document.title = "clipsearch";
  if (view.images === 0) {
    showMessage("empty", "No photos indexed yet", "Run `clipsearch index DIR` on a folder of photos, then reload this page.");
  } else {
    showMessage("start", "Search your photos", "Describe what you are looking for (“a red circle on grey”), or drop or paste an image to find photos like it.");
  }
}

function showMessage(kind, title, text, action) {
  // `action`, optional: { label, run }, a button under the message
  const box = $("message");
  box.hidden = !kind;
  box.dataset.state = kind || "";
  $("message-title").textContent = title || "";
  $("message-text").replaceChildren(...codeSpans(text || ""));
  const button = $("message-action");
  button.hidden = !action;
  button.textContent = action ? action.label : "";
  button.onclick = action ? action.run : null;
}

function codeSpans(text) {
  // `text` between backquotes becomes <code>: the commands a message tells the user to run
  return text.split("`").map((part, i) => {
    if (i % 2 === 0) return document.createTextNode(part);
    const code = document.createElement("code");
    code.textContent = part;
    return code;
  });
}

async function search(state, offset) {
  const generation = view.generation;
  const params = new URLSearchParams({ k: String(PAGE_SIZE), offset: String(offset) });
  for (const key of SEARCH_KEYS) if (state[key]) params.set(key, state[key]);
  view.loading = true;
  $("results").setAttribute("aria-busy", "true");
  // hidden while loading: when it shows again still within reach, the observer sees it appear and loads the next page
  $("more").hidden = true;
  try {
    const page = await api(`/api/search?${params}`);
    if (generation !== view.generation) return;
    view.next = page.next_offset;
    view.cut = page.cutoff !== null || page.no_good_match;
    view.ranked = page.total_hint;
    addTiles(page.results);
    if (view.hits.length === 0) {
      if (page.no_good_match) showNoGoodMatch(state);
      else showNoResults(state);
    }
  } catch (error) {
    if (generation !== view.generation) return;
    if (view.images === 0 && offset === 0) {
      showMessage("empty", "No photos indexed yet", "Run `clipsearch index DIR` on a folder of photos, then reload this page.");
    } else {
      showMessage("error", "That search did not work", error.message);
    }
  } finally {
    if (generation === view.generation) {
      view.loading = false;
      $("results").removeAttribute("aria-busy");
      $("more").hidden = view.next === null;
      showWeakerToggle(state);
    }
  }
}

function showNoGoodMatch(state) {
  showMessage(
    "no-match",
    "No good match",
    `None of your photos matches “${state.q}” well enough to be sure.`,
    { label: "Show the weaker matches", run: () => go({ ...readState(), weak: "1" }) },
  );
}

function showWeakerToggle(state) {
  // at the end of a cut ranking: show the weaker matches too (marked), or hide them again
  const button = $("weaker");
  const hidden = view.cut && !state.weak && view.hits.length > 0 && view.hits.length < view.ranked;
  button.hidden = view.next !== null || !(hidden || (state.weak && view.hits.length > 0));
  button.textContent = state.weak ? "Hide the weaker matches" : "Show the weaker matches";
}

function toggleWeaker() {
  const state = readState();
  if (state.weak) delete state.weak;
  else state.weak = "1";
  go(state);
}

function showNoResults(state) {
  const filtered = state.in || state.after || state.before;
  showMessage(
    "none",
    "No photos found",
    filtered ? "No photo passes these filters: widen the dates or pick another folder." : "Try other words, or another image.",
  );
}

function loadMore() {
  if (view.loading || view.next === null) return;
  search(readState(), view.next);
}

// ---- the grid ----------------------------------------------------------------------------------

function addTiles(hits) {
  const grid = $("results");
  const tiles = hits.map((hit, i) => tile(hit, view.hits.length + i));
  view.hits.push(...hits);
  grid.append(...tiles);
}

function tile(hit, index) {
  const natural = (hit.width || 1) / (hit.height || 1);
  const ratio = Math.min(2.5, Math.max(0.5, natural));
  const figure = document.createElement("figure");
  figure.className = "tile";
  figure.dataset.id = hit.id;
  figure.style.setProperty("--ratio", ratio.toFixed(4));
  figure.style.flexGrow = String(Math.round(ratio * 100));

  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.setAttribute("aria-label", `Open ${name(hit)}`);
  const img = document.createElement("img");
  img.loading = "lazy";
  img.decoding = "async";
  img.src = hit.thumb;
  img.alt = name(hit);
  open.append(img);
  if (hit.view) open.append(viewOutline(coverBox(hit.view, natural, ratio)));
  open.addEventListener("click", () => openLightbox(index, open));

  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  score.title = "Similarity to the query";

  const like = document.createElement("button");
  like.type = "button";
  like.className = "like";
  like.textContent = "More like this";
  like.setAttribute("aria-label", `More like ${name(hit)}`);
  like.addEventListener("click", () => moreLike(hit.id));

  const pick = document.createElement("input");
  pick.type = "checkbox";
  pick.className = "pick";
  pick.checked = view.selected.has(hit.id);
  pick.setAttribute("aria-label", `Select ${name(hit)}`);
  pick.addEventListener("change", () => select(hit.id, pick.checked));

  figure.classList.toggle("selected", pick.checked);
  figure.append(open, score, like, pick);
  if (hit.weak) {
    figure.classList.add("weak");
    const mark = document.createElement("span");
    mark.className = "weak-mark";
    mark.textContent = "weak";
    mark.title = "A weak match: below where this search's good matches end";
    img.alt = `${name(hit)} (weak match)`;
    figure.append(mark);
  }
  return figure;
}

function viewOutline(box) {
  // the part of the photo (one of its sub-views) that matched better than the whole photo
  const outline = document.createElement("span");
  outline.className = "view-box";
  outline.title = "The part of the photo that matched";
  placeBox(outline, box);
  return outline;
}

function coverBox([x0, y0, x1, y1], natural, shown) {
  // a box of the photo in the tile's coordinates, where the photo covers a tile of another aspect ratio (cropped)
  const keepX = natural > shown ? shown / natural : 1; // the share of the photo's width the tile shows
  const keepY = natural < shown ? natural / shown : 1;
  const x = (v) => Math.min(1, Math.max(0, (v - (1 - keepX) / 2) / keepX));
  const y = (v) => Math.min(1, Math.max(0, (v - (1 - keepY) / 2) / keepY));
  return [x(x0), y(y0), x(x1), y(y1)];
}

function name(hit) {
  return hit.root ? `${hit.root}/${hit.path}` : hit.path;
}

function moreLike(id, box) {
  const state = { ...filtersOf(readState()), like: id };
  if (box) state.box = box;
  go(state);
  window.scrollTo({ top: 0 });
}

// ---- personal concepts: select tiles, learn, search with @name ------------------------------------

function select(id, on) {
  if (on) view.selected.add(id);
  else view.selected.delete(id);
  markSelected(id, on);
  // the same search with another selection: the address changes, the history does not grow
  history.replaceState(null, "", stateUrl(withSelection(readState())));
  showSelection();
}

function markSelected(id, on) {
  for (const figure of document.querySelectorAll(`#results .tile[data-id="${CSS.escape(id)}"]`)) {
    figure.classList.toggle("selected", on);
    figure.querySelector(".pick").checked = on;
  }
}

function showSelection() {
  const count = view.selected.size;
  $("selection").hidden = count === 0;
  document.body.classList.toggle("selecting", count > 0);
  $("selected-count").textContent = `${count} photo${count === 1 ? "" : "s"} selected`;
}

function clearSelection() {
  for (const id of [...view.selected]) select(id, false);
  $("concept-message").textContent = "";
}

function conceptMessage(kind, text) {
  const message = $("concept-message");
  message.dataset.state = kind;
  message.textContent = text;
}

async function learnConcept(event) {
  event.preventDefault();
  const input = $("concept-name");
  const name = input.value.trim();
  if (!CONCEPT_NAME.test(name)) {
    input.setAttribute("aria-invalid", "true");
    conceptMessage("error", "A name starts with a letter, then letters, digits or _ (e.g. rex or grandmas_kitchen).");
    input.focus();
    return;
  }
  input.removeAttribute("aria-invalid");
  const method = $("concept-method").value;
  $("learn").disabled = true;
  conceptMessage("busy", `Learning @${name} from ${view.selected.size} photos…`);
  try {
    const body = JSON.stringify({ name, method, positives: [...view.selected] });
    const answer = await api("/api/concepts", { method: "POST", headers: { "Content-Type": "application/json" }, body });
    const concept = answer.concept;
    const accuracy = concept.accuracy === null ? "too few photos to hold any out" : `held-out accuracy ${concept.accuracy.toFixed(2)}`;
    clearSelection();
    input.value = "";
    conceptMessage("done", `Learned @${concept.name} (${concept.method}, ${accuracy}).`);
    await loadConcepts();
  } catch (error) {
    conceptMessage("error", error.message);
  } finally {
    $("learn").disabled = false;
  }
}

async function loadConcepts() {
  try {
    showConcepts((await api("/api/concepts")).concepts);
  } catch {
    showConcepts([]);
  }
}

function showConcepts(concepts) {
  const nav = $("concepts");
  nav.hidden = concepts.length === 0;
  nav.querySelectorAll(".concept-item").forEach((item) => item.remove());
  for (const concept of concepts) nav.append(conceptItem(concept));
  syncControls(readState());
}

function conceptItem(concept) {
  // a chip that searches the concept, and a control that forgets it (after asking)
  const item = document.createElement("span");
  item.className = "concept-item";
  item.dataset.name = concept.name;
  const chip = document.createElement("button");
  chip.type = "button";
  chip.className = "chip concept";
  chip.textContent = concept.query;
  chip.title = `Search for ${concept.query} (${concept.method}, ${concept.examples} example photos)`;
  chip.addEventListener("click", () => go({ ...filtersOf(readState()), q: concept.query }));
  const forget = document.createElement("button");
  forget.type = "button";
  forget.className = "forget";
  forget.textContent = "×";
  forget.setAttribute("aria-label", `Forget ${concept.query}`);
  forget.title = `Forget ${concept.query}`;
  forget.addEventListener("click", () => askToForget(item, concept));
  item.append(chip, forget);
  return item;
}

function askToForget(item, concept) {
  // the confirm step: the chip gives way to a question with Forget and Keep (Esc keeps)
  const question = document.createElement("span");
  question.className = "forget-confirm";
  question.setAttribute("role", "group");
  question.setAttribute("aria-label", `Forget ${concept.query}?`);
  const text = document.createElement("span");
  text.textContent = `Forget ${concept.query}?`;
  const yes = document.createElement("button");
  yes.type = "button";
  yes.className = "button danger";
  yes.textContent = "Forget";
  const no = document.createElement("button");
  no.type = "button";
  no.className = "button";
  no.textContent = "Keep";
  const parts = [...item.children];
  const keep = () => {
    question.replaceWith(...parts);
    item.querySelector(".forget").focus();
  };
  yes.addEventListener("click", () => forgetConcept(concept, yes));
  no.addEventListener("click", keep);
  question.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    event.preventDefault();
    keep();
  });
  question.append(text, yes, no);
  item.replaceChildren(question);
  no.focus();
}

async function forgetConcept(concept, button) {
  button.disabled = true;
  try {
    await api(`/api/concepts/${encodeURIComponent(concept.name)}`, { method: "DELETE" });
    conceptsMessage("done", `Forgot ${concept.query}.`);
    await loadConcepts();
    $("q").focus();
  } catch (error) {
    button.disabled = false;
    conceptsMessage("error", error.message);
  }
}

function conceptsMessage(kind, text) {
  const message = $("concepts-message");
  message.dataset.state = kind;
  message.textContent = text;
}

// ---- the lightbox ------------------------------------------------------------------------------

function openLightbox(index, opener) {
  const dialog = $("lightbox");
  view.opener = opener;
  showInLightbox(index);
  if (!dialog.open) dialog.showModal();
}

function showInLightbox(index) {
  if (index < 0 || index >= view.hits.length) return;
  view.current = index;
  const hit = view.hits[index];
  const img = $("lb-img");
  img.src = hit.file;
  img.alt = name(hit);
  $("lightbox").dataset.id = hit.id;
  $("lb-box").hidden = true;
  $("lb-view").hidden = !hit.view;
  if (hit.view) placeBox($("lb-view"), hit.view);
  view.keyBox = null;
  delete $("lightbox").dataset.drawing;
  $("lb-file").href = hit.file;
  $("lb-prev").disabled = index === 0;
  $("lb-next").disabled = index === view.hits.length - 1 && view.next === null;
  showPath(hit);
  showMeta(hit);
  if (index >= view.hits.length - 3) loadMore();
}

function showPath(hit) {
  // each folder of the path is a button that filters the search to it
  const nav = $("lb-path");
  nav.replaceChildren();
  const parts = [hit.root, ...hit.path.split("/")].filter(Boolean);
  parts.forEach((part, i) => {
    if (i === parts.length - 1 || !hit.root) {
      const file = document.createElement("span");
      file.className = "file";
      file.textContent = part;
      nav.append(file);
      return;
    }
    const folder = parts.slice(0, i + 1).join("/");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "crumb";
    button.textContent = part;
    button.title = `Only photos in ${folder}`;
    button.addEventListener("click", () => {
      closeLightbox();
      go({ ...readState(), in: folder });
    });
    nav.append(button, document.createTextNode("/"));
  });
}

function showMeta(hit) {
  const rows = [
    ["Score", hit.score.toFixed(3)],
    ["Size", hit.width && hit.height ? `${hit.width} × ${hit.height}` : null],
    ["Format", hit.format],
    ["Taken", hit.taken_at ? hit.taken_at.replace("T", " ") : null],
    ["Camera", hit.camera],
    ["Matched", hit.view ? "the outlined part of the photo" : null],
  ];
  const list = $("lb-meta");
  list.replaceChildren();
  for (const [label, value] of rows) {
    if (value === null || value === undefined) continue;
    const term = document.createElement("dt");
    term.textContent = label;
    const detail = document.createElement("dd");
    detail.textContent = value;
    list.append(term, detail);
  }
}

function closeLightbox() {
  const dialog = $("lightbox");
  if (dialog.open) dialog.close();
}

function onLightboxKey(event) {
  if (view.keyBox) {
    onBoxKey(event);
    return;
  }
  if ((event.key === "b" || event.key === "B") && !event.ctrlKey && !event.metaKey && !event.altKey) startKeyBox();
  else if (event.key === "ArrowLeft") showInLightbox(view.current - 1);
  else if (event.key === "ArrowRight") showInLightbox(view.current + 1);
  else return;
  event.preventDefault();
}

function onLightboxCancel(event) {
  // Esc while drawing a box cancels the box, not the lightbox
  if (!view.keyBox) return;
  event.preventDefault();
  cancelKeyBox();
}

function onLightboxClosed() {
  view.keyBox = null;
  delete $("lightbox").dataset.drawing;
  const opener = view.opener;
  view.opener = null;
  $("lb-img").removeAttribute("src");
  if (opener && opener.isConnected) opener.focus();
}

// ---- dragging a box on the photo ---------------------------------------------------------------

function fractionAt(event, rect) {
  const clamp = (v) => Math.min(1, Math.max(0, v));
  return [clamp((event.clientX - rect.left) / rect.width), clamp((event.clientY - rect.top) / rect.height)];
}

function startBox(event) {
  if (event.button !== 0) return;
  const img = $("lb-img");
  const rect = img.getBoundingClientRect();
  if (!rect.width || !rect.height) return;
  event.preventDefault();
  const frame = $("lb-frame");
  frame.setPointerCapture(event.pointerId);
  const start = fractionAt(event, rect);
  const mark = $("lb-box");
  let box = null;

  const move = (e) => {
    const [x, y] = fractionAt(e, rect);
    box = [Math.min(start[0], x), Math.min(start[1], y), Math.max(start[0], x), Math.max(start[1], y)];
    placeBox(mark, box);
    mark.hidden = false;
  };
  const end = () => {
    frame.removeEventListener("pointermove", move);
    frame.removeEventListener("pointerup", end);
    frame.removeEventListener("pointercancel", end);
    if (!box || box[2] - box[0] < MIN_BOX || box[3] - box[1] < MIN_BOX) {
      mark.hidden = true;
      return;
    }
    const id = view.hits[view.current].id;
    closeLightbox();
    moreLike(id, box.map((v) => v.toFixed(4)).join(","));
  };
  frame.addEventListener("pointermove", move);
  frame.addEventListener("pointerup", end);
  frame.addEventListener("pointercancel", end);
}

// ---- drawing a box with the keyboard: B starts one, arrows move, Shift+arrows resize, Enter, Esc ----

function startKeyBox() {
  view.keyBox = [0.35, 0.35, 0.65, 0.65];
  placeBox($("lb-box"), view.keyBox);
  $("lb-box").hidden = false;
  $("lightbox").dataset.drawing = "true";
  announce(`Drawing a box. Arrow keys move it, Shift and arrow keys resize it, Enter searches for what is inside, Escape cancels. ${whereBox(view.keyBox)}`);
}

function onBoxKey(event) {
  const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  if (event.key in moves) {
    const [dx, dy] = moves[event.key].map((v) => v * BOX_STEP);
    view.keyBox = event.shiftKey ? resizedBox(view.keyBox, dx, dy) : movedBox(view.keyBox, dx, dy);
    placeBox($("lb-box"), view.keyBox);
    announce(whereBox(view.keyBox));
  } else if (event.key === "Enter") {
    const box = view.keyBox;
    const id = view.hits[view.current].id;
    view.keyBox = null;
    closeLightbox();
    moreLike(id, box.map((v) => v.toFixed(4)).join(","));
  } else {
    return; // Esc goes on to the dialog, whose cancel event then cancels the box (onLightboxCancel)
  }
  event.preventDefault();
}

function movedBox([x0, y0, x1, y1], dx, dy) {
  // the whole box moves, stopping at the photo's edges
  const mx = Math.min(Math.max(dx, -x0), 1 - x1);
  const my = Math.min(Math.max(dy, -y0), 1 - y1);
  return [x0 + mx, y0 + my, x1 + mx, y1 + my];
}

function resizedBox([x0, y0, x1, y1], dx, dy) {
  // the right and bottom edges move: right/down grow the box, left/up shrink it, never below two steps
  const right = Math.min(1, Math.max(x0 + 2 * BOX_STEP, x1 + dx));
  const bottom = Math.min(1, Math.max(y0 + 2 * BOX_STEP, y1 + dy));
  return [x0, y0, right, bottom];
}

function whereBox([x0, y0, x1, y1]) {
  const pct = (v) => Math.round(v * 100);
  return `Box from ${pct(x0)} to ${pct(x1)} percent across, ${pct(y0)} to ${pct(y1)} percent down.`;
}

function cancelKeyBox() {
  view.keyBox = null;
  $("lb-box").hidden = true;
  delete $("lightbox").dataset.drawing;
  announce("Box cancelled.");
}

function announce(text) {
  $("lb-announce").textContent = text;
}

function parseBox(text) {
  if (!text) return null;
  const box = text.split(",").map(Number);
  return box.length === 4 && box.every((v) => Number.isFinite(v)) ? box : null;
}

function placeBox(element, [x0, y0, x1, y1]) {
  element.style.left = `${x0 * 100}%`;
  element.style.top = `${y0 * 100}%`;
  element.style.width = `${(x1 - x0) * 100}%`;
  element.style.height = `${(y1 - y0) * 100}%`;
}

// ---- searching with an image of one's own ------------------------------------------------------

async function uploadImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showMessage("error", "That is not an image", "Drop or paste a JPEG, PNG or WebP picture to search with it.");
    return;
  }
  const form = new FormData();
  form.append("image", file, file.name || "pasted-image");
  clearResults();
  showMessage("busy", "Reading your image…", "");
  try {
    const answer = await api("/api/uploads", { method: "POST", body: form });
    go({ ...filtersOf(readState()), upload: answer.upload });
  } catch (error) {
    showMessage("error", "That image could not be used", error.message);
  }
}

function imageOf(items) {
  for (const item of items || []) {
    const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
    if (file && file.type.startsWith("image/")) return file;
  }
  return null;
}

function hasFiles(event) {
  return Boolean(event.dataTransfer) && [...event.dataTransfer.types].includes("Files");
}

function wireDrop() {
  const overlay = $("drop");
  let depth = 0; // dragenter/dragleave fire for every child crossed; the overlay goes when the count is back to 0
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    overlay.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) overlay.hidden = true;
  });
  window.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault(); // allows the drop
  });
  window.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth = 0;
    overlay.hidden = true;
    uploadImage(imageOf(event.dataTransfer.files) || event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const file = imageOf(event.clipboardData && event.clipboardData.items);
    if (!file) return; // pasted text goes into the search box as usual
    event.preventDefault();
    uploadImage(file);
  });
}

// ---- controls ----------------------------------------------------------------------------------

function isTyping(target) {
  return target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement || target instanceof HTMLSelectElement;
}

function wireControls() {
  const input = $("q");
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    const state = filtersOf(readState());
    if (text) state.q = text;
    go(state);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    event.preventDefault();
    if (input.value) input.value = "";
    else input.blur();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "/" && !isTyping(event.target) && !$("lightbox").open) {
      event.preventDefault();
      input.focus();
      input.select();
    }
  });
  $("pick").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", (event) => {
    uploadImage(event.target.files[0]);
    event.target.value = "";
  });
  for (const id of ["in", "after", "before"]) {
    $(id).addEventListener("change", (event) => setFilter(id, event.target.value));
  }
  $("clear-filters").addEventListener("click", () => {
    const state = readState();
    for (const key of ["in", "after", "before"]) delete state[key];
    go(state);
  });
  $("query-clear").addEventListener("click", () => {
    const state = readState();
    for (const key of ["like", "upload", "box"]) delete state[key];
    go(state);
  });
  const scores = $("scores");
  scores.checked = localStorage.getItem("clipsearch.scores") !== "off";
  document.body.classList.toggle("no-scores", !scores.checked);
  scores.addEventListener("change", () => {
    localStorage.setItem("clipsearch.scores", scores.checked ? "on" : "off");
    document.body.classList.toggle("no-scores", !scores.checked);
  });
  $("more").addEventListener("click", loadMore);
  $("weaker").addEventListener("click", toggleWeaker);
  $("selection").addEventListener("submit", learnConcept);
  $("unselect").addEventListener("click", clearSelection);
  new IntersectionObserver((entries) => {
    if (entries.some((entry) => entry.isIntersecting)) loadMore();
  }, { rootMargin: "800px" }).observe($("more"));
}

function setFilter(key, value) {
  const state = readState();
  if (value) state[key] = value;
  else delete state[key];
  go(state);
}

function wireLightbox() {
  const dialog = $("lightbox");
  dialog.addEventListener("keydown", onLightboxKey);
  dialog.addEventListener("close", onLightboxClosed);
  dialog.addEventListener("cancel", onLightboxCancel);
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) closeLightbox(); // a click on the backdrop
  });
  $("lb-close").addEventListener("click", closeLightbox);
  $("lb-prev").addEventListener("click", () => showInLightbox(view.current - 1));
  $("lb-next").addEventListener("click", () => showInLightbox(view.current + 1));
  $("lb-like").addEventListener("click", () => {
    const id = view.hits[view.current].id;
    closeLightbox();
    moreLike(id);
  });
  $("lb-frame").addEventListener("pointerdown", startBox);
}

async function start() {
  wireControls();
  wireLightbox();
  wireDrop();
  window.addEventListener("popstate", () => {
    closeLightbox();
    // the selection is a basket: back and forward carry it to the search they go to
    history.replaceState(null, "", stateUrl(withSelection(readState())));
    render();
  });
  showMessage("busy", "Opening the store…", "The model and the search index are loading.");
  await Promise.all([loadStatus(), loadConcepts()]);
  render();
  document.body.dataset.ready = "true";
}

start();
