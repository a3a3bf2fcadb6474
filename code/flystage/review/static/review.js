// The review page: pages of thumbnails loaded as the grid scrolls, decisions by key or click.
// Plain JavaScript, no framework and no build step: the package ships this file as it is.
"use strict";

const token = document.body.dataset.token;
const hasOverlay = document.body.dataset.overlay === "yes";
// Grad-CAM is offered (and the default) only where the model has torch weights and torch is here.
const methodSelect = document.getElementById("method");
// "" lets the server choose: Grad-CAM where the model allows, else occlusion.
function overlayMethod() { return methodSelect ? methodSelect.value : ""; }
function overlayUrl(id) { const m = overlayMethod(); return `/overlay/${id}.png${m ? `?method=${m}` : ""}`; }
const grid = document.getElementById("grid");
const labels = JSON.parse(grid.dataset.labels);
const keys = JSON.parse(grid.dataset.keys);                 // stage -> key
const stageOfKey = Object.fromEntries(Object.entries(keys).map(([s, k]) => [k, s]));
const sentinel = document.getElementById("sentinel");
const PAGE = 60;

let view = { sort: "unsure", filter: "all", stage: "" };
// Pages follow the last card shown, never an offset: deciding an image under "unreviewed" takes
// it out of the view, and an offset counted before that would skip the next image.
let more = true, loading = false, focus = 0, generation = 0;
const cards = [];                                              // in grid order
const byId = new Map();                                        // image id -> card

function api(path, options = {}) {
  options.headers = Object.assign({ "X-Review-Token": token }, options.headers || {});
  return fetch(path, options).then(r => r.json().then(body => {
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }));
}

function showCounts(c) {
  document.getElementById("counts").textContent =
    `${c.reviewed} of ${c.images} reviewed, ${c.corrected} corrected`;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function render(card, item) {
  card.item = item;
  card.classList.toggle("confirmed", item.decision === "confirmed");
  card.classList.toggle("corrected", item.decision === "corrected");
  card.querySelector(".decision").textContent =
    item.decision ? `${item.decision === "corrected" ? "corrected to" : "confirmed"} ${item.label}` : "";
  for (const b of card.querySelectorAll(".stages button")) b.classList.toggle("chosen", b.dataset.stage === item.label);
}

function makeCard(item) {
  const card = el("article", "card");
  card.tabIndex = -1;
  card.dataset.id = item.id;
  const img = el("img");
  img.loading = "lazy";
  img.decoding = "async";
  img.alt = item.name;
  img.src = `/thumb/${item.id}.png`;
  card.append(img, el("div", "name", item.name));
  card.title = item.name;
  const top = el("div", "top");
  for (const t of item.top) {
    const bar = el("div", "bar");
    bar.style.width = `${Math.max(2, t.p * 100)}%`;
    const cell = el("div"); cell.append(bar);
    top.append(el("span", "stage", t.stage), cell, el("span", "p", t.p.toFixed(2)));
  }
  card.append(top);
  if (item.error) card.append(el("div", "error", item.error));
  if (item.unsure) card.append(el("div", "unsure-tag", "unsure"));
  card.append(el("div", "decision"));
  const stages = el("div", "stages");
  for (const s of labels) {
    const b = el("button", "", keys[s] ? `${s} (${keys[s]})` : s);
    b.type = "button";
    b.dataset.stage = s;
    b.addEventListener("click", () => { setFocus(cards.indexOf(card)); decide(card, s); });
    stages.append(b);
  }
  card.append(stages);
  const views = el("div", "views");
  const orig = el("button", "", "original"); orig.type = "button";
  orig.addEventListener("click", () => toggleView(card, "original"));
  views.append(orig);
  if (hasOverlay) {
    const map = el("button", "", "what the model looked at"); map.type = "button";
    map.addEventListener("click", () => toggleView(card, "overlay"));
    views.append(map);
  }
  card.append(views);
  card.addEventListener("click", e => { if (e.target === img) setFocus(cards.indexOf(card)); });
  render(card, item);
  return card;
}

function toggleView(card, kind) {
  const img = card.querySelector("img");
  const id = card.item.id;
  const next = card.dataset.view === kind ? "thumb" : kind;
  card.dataset.view = next;
  img.src = next === "overlay" ? overlayUrl(id) : `/${next}/${id}.png`;
}

if (methodSelect) methodSelect.addEventListener("change", () => {
  // Cards showing a map show the newly chosen one.
  for (const card of cards) {
    if (card.dataset.view === "overlay") card.querySelector("img").src = overlayUrl(card.item.id);
  }
});

function loadPage() {
  if (loading || !more) return;
  loading = true;
  const mine = generation;
  const after = cards.length ? cards[cards.length - 1].item.id : "";
  const q = new URLSearchParams({ after, limit: PAGE, sort: view.sort, filter: view.filter, stage: view.stage });
  api(`/api/items?${q}`).then(page => {
    if (mine !== generation) return;
    more = page.more;
    showCounts(page.counts);
    let lastStage = cards.length ? cardStage(cards[cards.length - 1]) : null;
    for (const item of page.items) {
      const stage = item.top.length ? item.top[0].stage : "no prediction";
      if (view.sort === "stage" && stage !== lastStage) {
        grid.append(el("h2", "section", `predicted ${stage}`));
        lastStage = stage;
      }
      const card = makeCard(item);
      cards.push(card);
      byId.set(item.id, card);
      grid.append(card);
    }
    if (cards.length && !grid.querySelector(".card.focus")) setFocus(0, false);
    sentinel.textContent = more ? "loading..." : `${cards.length} images`;
  }).catch(e => { sentinel.textContent = `error: ${e.message}`; })
    .finally(() => {
      loading = false;
      // A short page may leave the sentinel in view: keep loading until it is not.
      if (mine === generation && isVisible(sentinel)) loadPage();
    });
}

function cardStage(card) { return card.item.top.length ? card.item.top[0].stage : "no prediction"; }

function isVisible(e) {
  const r = e.getBoundingClientRect();
  return r.top < window.innerHeight + 600;
}

function reset() {
  generation++;
  grid.replaceChildren();
  cards.length = 0; byId.clear();
  more = true; focus = 0; loading = false;
  loadPage();
}

function setFocus(i, scroll = true) {
  if (!cards.length) return;
  i = Math.max(0, Math.min(cards.length - 1, i));
  if (cards[focus]) cards[focus].classList.remove("focus");
  focus = i;
  cards[i].classList.add("focus");
  if (scroll) cards[i].scrollIntoView({ block: "nearest" });
  if (i > cards.length - 8) loadPage();
}

function decide(card, stage) {
  return api("/api/decide", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ id: card.item.id, label: stage }),
  }).then(r => { render(card, r.item); showCounts(r.counts); })
    .catch(e => { card.querySelector(".decision").textContent = `not saved: ${e.message}`; });
}

function undo() {
  return api("/api/undo", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" })
    .then(r => {
      showCounts(r.counts);
      if (!r.item) return;
      const card = byId.get(r.item.id);
      if (card) { render(card, r.item); setFocus(cards.indexOf(card)); }
    });
}

function columns() {
  if (cards.length < 2) return 1;
  const top = cards[0].offsetTop;
  const n = cards.findIndex(c => c.offsetTop !== top);
  return n < 0 ? cards.length : n;
}

document.addEventListener("keydown", e => {
  if (e.target.tagName === "SELECT" || e.ctrlKey || e.metaKey || e.altKey) return;
  const card = cards[focus];
  const k = e.key.toLowerCase();
  if (e.key === "ArrowRight") setFocus(focus + 1);
  else if (e.key === "ArrowLeft") setFocus(focus - 1);
  else if (e.key === "ArrowDown") setFocus(focus + columns());
  else if (e.key === "ArrowUp") setFocus(focus - columns());
  else if (e.key === "Enter" && card && card.item.top.length) {
    decide(card, card.item.top[0].stage).then(() => setFocus(focus + 1));
  } else if (k === "z") undo();
  else if (k === "o" && card) toggleView(card, "original");
  else if (k === "m" && card && hasOverlay) toggleView(card, "overlay");
  else if (stageOfKey[k] !== undefined && card) decide(card, stageOfKey[k]).then(() => setFocus(focus + 1));
  else return;
  e.preventDefault();
});

for (const id of ["sort", "filter", "stage"]) {
  document.getElementById(id).addEventListener("change", e => { view[id] = e.target.value; reset(); });
}
new IntersectionObserver(entries => { if (entries.some(x => x.isIntersecting)) loadPage(); },
  { rootMargin: "600px" }).observe(sentinel);
loadPage();
