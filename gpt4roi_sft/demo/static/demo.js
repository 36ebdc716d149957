// Region chat page: draw boxes on an image, ask about <regionN>, read streamed answers.
// Talks to the server's JSON API (/api/info, /api/chat, /api/describe with "stream": true); nothing else.
"use strict";

const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0f9d9a", "#f032e6", "#9a6324",
                 "#800000", "#008080", "#000075", "#808000", "#e0a100", "#5d5d5d", "#aa6e28"];
const MIN_BOX_PX = 4;       // smaller drags (on screen) are clicks, not boxes
const CLICK_SLOP_PX = 3;    // a box moved less than this was clicked

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  image: null,      // {dataUrl, width, height}: pixels as the browser shows them
  boxes: [],        // [{x1, y1, x2, y2, caption}] in image pixels; boxes[k] is region k+1
  messages: [],     // [{role: "user"|"assistant", content}]
  scale: 1,         // screen px per image px
  controller: null, // AbortController of the running request
};

// ---------- image ----------

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(dataUrl, boxes = []) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      state.image = {dataUrl, width: img.naturalWidth, height: img.naturalHeight};
      state.boxes = boxes.map(([x1, y1, x2, y2]) => ({x1, y1, x2, y2, caption: ""}));
      const stage = $("stage");
      stage.classList.remove("empty");
      stage.replaceChildren();
      img.id = "picture";
      img.alt = "the image to ask about";
      img.draggable = false;
      stage.appendChild(img);
      resetChat();
      layout();
      setStatus(`${img.naturalWidth}\u00d7${img.naturalHeight} image loaded; drag on it to draw a box.`);
      resolve();
    };
    img.onerror = () => reject(new Error("the browser cannot read this file as an image"));
    img.src = dataUrl;
  });
}

async function openFile(file) {
  if (!file) return;
  try {
    await loadImage(await readFile(file));
  } catch (err) {
    setStatus(`Cannot open ${file.name}: ${err.message}`, true);
  }
}

async function openExample(index) {
  const example = state.info.examples[index];
  const response = await fetch(`/static/${example.file}`);
  await loadImage(await readFile(await response.blob()), example.boxes);
}

function layout() {
  if (!state.image) return;
  const pane = $("image-pane");
  const maxW = Math.max(200, pane.clientWidth - 4);
  const maxH = Math.max(240, window.innerHeight * 0.62);
  state.scale = Math.min(maxW / state.image.width, maxH / state.image.height, 4);
  const img = $("picture");
  img.style.width = `${state.image.width * state.scale}px`;
  img.style.height = `${state.image.height * state.scale}px`;
  renderBoxes();
}

// ---------- boxes ----------

function colour(k) { return COLOURS[k % COLOURS.length]; }

function renderBoxes() {
  const stage = $("stage");
  stage.querySelectorAll(".box").forEach((el) => el.remove());
  state.boxes.forEach((box, k) => stage.appendChild(boxElement(box, k)));
  renderRegionList();
  const some = state.boxes.length > 0;
  $("clear-boxes").disabled = !some;
  $("describe").disabled = !some || busy();
  $("ask").disabled = !state.image || busy();
}

function boxElement(box, k, drawing = false) {
  const el = document.createElement("div");
  el.className = drawing ? "box drawing" : "box";
  el.dataset.region = String(k + 1);
  el.style.setProperty("--c", colour(k));
  placeBox(el, box);
  if (!drawing) {
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `region${k + 1}`;
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.title = `delete region${k + 1}`;
    del.textContent = "\u00d7";
    const handle = document.createElement("span");
    handle.className = "resize";
    el.append(label, del, handle);
  }
  return el;
}

function placeBox(el, box) {
  const s = state.scale;
  el.style.left = `${box.x1 * s}px`;
  el.style.top = `${box.y1 * s}px`;
  el.style.width = `${(box.x2 - box.x1) * s}px`;
  el.style.height = `${(box.y2 - box.y1) * s}px`;
}

function renderRegionList() {
  const list = $("regions");
  list.replaceChildren();
  state.boxes.forEach((box, k) => {
    const li = document.createElement("li");
    li.dataset.region = String(k + 1);
    li.style.setProperty("--c", colour(k));
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = `region${k + 1}`;
    tag.title = `insert <region${k + 1}> into the question`;
    tag.addEventListener("click", () => insertReference(k + 1));
    const caption = document.createElement("span");
    caption.className = box.caption ? "caption" : "caption pending";
    caption.textContent = box.caption || `[${box.x1}, ${box.y1}, ${box.x2}, ${box.y2}]`;
    li.append(tag, caption);
    list.appendChild(li);
  });
}

function deleteBox(k) {
  state.boxes.splice(k, 1);
  if (state.messages.length) {
    resetChat();
    note("The regions were renumbered, so the conversation was reset.");
  }
  renderBoxes();
}

function clamp(v, lo, hi) { return Math.min(hi, Math.max(lo, v)); }

// Screen point -> image pixel (clamped to the image, rounded to 0.1 px).
function toImage(event) {
  const rect = $("picture").getBoundingClientRect();
  const x = clamp((event.clientX - rect.left) / state.scale, 0, state.image.width);
  const y = clamp((event.clientY - rect.top) / state.scale, 0, state.image.height);
  return {x: Math.round(x * 10) / 10, y: Math.round(y * 10) / 10};
}

function normalised(a, b) {
  return {x1: Math.min(a.x, b.x), y1: Math.min(a.y, b.y), x2: Math.max(a.x, b.x), y2: Math.max(a.y, b.y)};
}

let drag = null; // {mode: "draw"|"move"|"resize", k, start, orig, el, moved}

function onPointerDown(event) {
  if (!state.image || event.button !== 0) return;
  const target = event.target;
  const boxEl = target.closest(".box");
  const start = toImage(event);
  if (boxEl && target.classList.contains("delete")) {
    deleteBox(Number(boxEl.dataset.region) - 1);
    event.preventDefault();
    return;
  }
  if (boxEl) {
    const k = Number(boxEl.dataset.region) - 1;
    const mode = target.classList.contains("resize") ? "resize" : "move";
    drag = {mode, k, start, orig: {...state.boxes[k]}, el: boxEl, moved: 0, sx: event.clientX, sy: event.clientY};
  } else {
    const el = boxElement({x1: start.x, y1: start.y, x2: start.x, y2: start.y}, state.boxes.length, true);
    $("stage").appendChild(el);
    drag = {mode: "draw", start, el, sx: event.clientX, sy: event.clientY};
  }
  $("stage").setPointerCapture(event.pointerId);
  event.preventDefault();
}

function onPointerMove(event) {
  if (!drag) return;
  const p = toImage(event);
  drag.moved = Math.max(drag.moved || 0, Math.hypot(event.clientX - drag.sx, event.clientY - drag.sy));
  if (drag.mode === "draw") {
    placeBox(drag.el, normalised(drag.start, p));
    return;
  }
  const box = state.boxes[drag.k];
  const o = drag.orig;
  if (drag.mode === "move") {
    const w = o.x2 - o.x1, h = o.y2 - o.y1;
    const x1 = clamp(o.x1 + p.x - drag.start.x, 0, state.image.width - w);
    const y1 = clamp(o.y1 + p.y - drag.start.y, 0, state.image.height - h);
    Object.assign(box, {x1: round1(x1), y1: round1(y1), x2: round1(x1 + w), y2: round1(y1 + h)});
  } else {
    Object.assign(box, normalised({x: o.x1, y: o.y1}, p));
  }
  placeBox(drag.el, box);
}

function round1(v) { return Math.round(v * 10) / 10; }

function onPointerUp(event) {
  if (!drag) return;
  const d = drag;
  drag = null;
  if (d.mode === "draw") {
    d.el.remove();
    const box = normalised(d.start, toImage(event));
    const big = (box.x2 - box.x1) * state.scale >= MIN_BOX_PX && (box.y2 - box.y1) * state.scale >= MIN_BOX_PX;
    if (!big) return;
    if (state.boxes.length >= state.info.max_regions) {
      setStatus(`This model takes at most ${state.info.max_regions} regions.`, true);
      return;
    }
    state.boxes.push({...box, caption: ""});
    setStatus(`region${state.boxes.length} added; click it to ask about it.`);
  } else if ((d.moved || 0) < CLICK_SLOP_PX) {
    Object.assign(state.boxes[d.k], d.orig);
    insertReference(d.k + 1);
  } else {
    state.boxes[d.k].caption = "";  // the old caption described another area
  }
  renderBoxes();
}

function insertReference(n) {
  const q = $("question");
  const ref = `<region${n}>`;
  const start = q.selectionStart ?? q.value.length;
  const end = q.selectionEnd ?? q.value.length;
  const before = q.value.slice(0, start);
  const pad = before && !/\s$/.test(before) ? " " : "";
  q.value = before + pad + ref + q.value.slice(end);
  const caret = (before + pad + ref).length;
  q.focus();
  q.setSelectionRange(caret, caret);
}

// ---------- server ----------

function busy() { return state.controller !== null; }

function setBusy(controller) {
  state.controller = controller;
  $("stop").disabled = controller === null;
  renderBoxes();
}

function payloadBoxes() { return state.boxes.map((b) => [b.x1, b.y1, b.x2, b.y2]); }

// POST with "stream": true and hand each server-sent event to onEvent; resolves on "done".
async function postStream(url, body, onEvent, signal) {
  const response = await fetch(url, {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({...body, stream: true}), signal,
  });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of chunk.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.error) throw new Error(event.error);
        if (event.queued) setStatus(`Waiting: ${event.queued} request${event.queued > 1 ? "s" : ""} ahead\u2026`);
        if (event.started) setStatus("Generating\u2026");
        onEvent(event);
        if (event.done) return event;
      }
    }
  }
  throw new Error("the server closed the connection before the answer was complete");
}

function maxTokens() {
  const n = parseInt($("max-tokens").value, 10);
  return Number.isFinite(n) && n > 0 ? Math.min(n, state.info.max_new_tokens) : state.info.max_new_tokens;
}

async function describeAll() {
  if (!state.image || !state.boxes.length || busy()) return;
  const controller = new AbortController();
  const targets = state.boxes.slice();
  targets.forEach((b) => { b.caption = ""; });
  setBusy(controller);
  const captionEl = (i) => $("regions").querySelector(`li[data-region="${i + 1}"] .caption`);
  const partial = targets.map(() => "");
  try {
    await postStream("/api/describe", {image: state.image.dataUrl, boxes: payloadBoxes(), max_new_tokens: maxTokens()},
      (event) => {
        if (event.delta !== undefined) {
          partial[event.region] += event.delta;
          const el = captionEl(event.region);
          if (el) { el.textContent = partial[event.region]; el.classList.remove("pending"); }
        }
        if (event.caption !== undefined && targets[event.region]) {
          targets[event.region].caption = event.caption || "(empty answer)";
          const el = captionEl(event.region);
          if (el) { el.textContent = targets[event.region].caption; el.classList.remove("pending"); }
        }
      }, controller.signal);
    setStatus("Described every region.");
  } catch (err) {
    setStatus(err.name === "AbortError" ? "Stopped." : `Describe failed: ${err.message}`, err.name !== "AbortError");
  } finally {
    setBusy(null);
  }
}

// ---------- chat ----------

function logEl() { return $("log"); }

function addMessage(role, text) {
  $("log-hint")?.remove();
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  if (role === "user") appendWithChips(el, text); else el.textContent = text;
  logEl().appendChild(el);
  logEl().scrollTop = logEl().scrollHeight;
  return el;
}

function note(text) { addMessage("note", text); }

// User text with each <regionN> shown in its box's colour.
function appendWithChips(el, text) {
  let last = 0;
  for (const m of text.matchAll(/<region(\d+)>/g)) {
    el.append(text.slice(last, m.index));
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.style.setProperty("--c", colour(Number(m[1]) - 1));
    chip.textContent = m[0];
    el.append(chip);
    last = m.index + m[0].length;
  }
  el.append(text.slice(last));
}

function resetChat() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  logEl().querySelectorAll(".msg").forEach((el) => el.remove());
}

async function ask(event) {
  event?.preventDefault();
  const text = $("question").value.trim();
  if (!text || busy()) return;
  if (!state.image) { setStatus("Upload an image first.", true); return; }
  state.messages.push({role: "user", content: text});
  addMessage("user", text);
  $("question").value = "";
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const controller = new AbortController();
  setBusy(controller);
  let answer = "";
  try {
    const done = await postStream("/api/chat",
      {image: state.image.dataUrl, boxes: payloadBoxes(), messages: state.messages, max_new_tokens: maxTokens()},
      (ev) => {
        if (ev.delta !== undefined) {
          answer += ev.delta;
          bubble.textContent = answer;
          logEl().scrollTop = logEl().scrollHeight;
        }
      }, controller.signal);
    answer = done.answer;
    bubble.textContent = answer || "(empty answer)";
    state.messages.push({role: "assistant", content: answer});
    setStatus("");
  } catch (err) {
    const stopped = err.name === "AbortError";
    if (stopped && answer && state.messages.length) {
      state.messages.push({role: "assistant", content: answer});  // keep the partial answer in the history
      setStatus("Stopped.");
    } else {
      if (state.messages.length) state.messages.pop();  // the question was not answered
      bubble.classList.add("error");
      bubble.textContent = stopped ? "(stopped)" : err.message;
      setStatus(stopped ? "Stopped." : "The question was not answered; fix it and ask again.", !stopped);
    }
  } finally {
    bubble.classList.remove("streaming");
    setBusy(null);
  }
}

// ---------- wiring ----------

async function init() {
  try {
    state.info = await (await fetch("/api/info")).json();
  } catch (err) {
    setStatus(`Cannot reach the server: ${err.message}`, true);
    return;
  }
  $("model-name").textContent = state.info.model ? `model: ${state.info.model}` : "";
  $("max-tokens").max = String(state.info.max_new_tokens);
  $("max-tokens").value = String(Math.min(128, state.info.max_new_tokens));
  state.info.examples.forEach((ex, i) => {
    const option = document.createElement("option");
    option.value = String(i);
    option.textContent = ex.name;
    $("examples").appendChild(option);
  });

  $("file").addEventListener("change", (e) => { openFile(e.target.files[0]); e.target.value = ""; });
  $("examples").addEventListener("change", (e) => {
    if (e.target.value !== "") openExample(Number(e.target.value)).catch((err) => setStatus(err.message, true));
    e.target.value = "";
  });
  const stage = $("stage");
  stage.addEventListener("pointerdown", onPointerDown);
  stage.addEventListener("pointermove", onPointerMove);
  stage.addEventListener("pointerup", onPointerUp);
  stage.addEventListener("pointercancel", onPointerUp);
  stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragover"); });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragover"));
  stage.addEventListener("drop", (e) => {
    e.preventDefault();
    stage.classList.remove("dragover");
    openFile(e.dataTransfer.files[0]);
  });
  $("clear-boxes").addEventListener("click", () => {
    state.boxes = [];
    if (state.messages.length) { resetChat(); note("The boxes were cleared, so the conversation was reset."); }
    renderBoxes();
  });
  $("describe").addEventListener("click", describeAll);
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) ask(e);
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("reset").addEventListener("click", () => { resetChat(); setStatus("Conversation reset."); });
  window.addEventListener("resize", layout);
  renderBoxes();
}

document.addEventListener("DOMContentLoaded", init);
