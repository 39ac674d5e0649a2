// The web page: a form that posts to /api/jobs, follows the job's server-sent events (read
// with fetch, so an API key header can go along), and a gallery of the results.
"use strict";

const $ = (id) => document.getElementById(id);
const SIZES = [32, 64, 128, 256, 384, 512, 576, 640, 768, 896, 1024];
let apiKey = localStorage.getItem("nanodiffusion-key") || "";
let currentJob = null;

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (apiKey) h.Authorization = "Bearer " + apiKey;
  return h;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  if (r.status === 401) {
    $("key-box").classList.remove("hidden");
    throw new Error("this server needs an API key (top right)");
  }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
  return body;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

// With `auto`, a first option "auto" (value ""): the server then uses the model's default.
function fillSelect(select, values, selected, auto) {
  select.innerHTML = "";
  for (const v of auto ? ["", ...values] : values) {
    const o = document.createElement("option");
    o.value = String(v);
    o.textContent = v === "" ? "auto" : String(v);
    if (String(v) === String(selected)) o.selected = true;
    select.appendChild(o);
  }
}

async function init() {
  $("api-key").value = apiKey;
  if (apiKey) $("key-box").classList.remove("hidden");
  try {
    const info = await api("/api/models");
    fillSelect($("model"), info.models, info.models.includes("shapes") ? "shapes" : "");
    fillSelect($("sampler"), info.samplers, "", true);
    const sizes = SIZES.filter((s) => s <= info.limits.max_side);
    fillSelect($("width"), sizes, "", true);
    fillSelect($("height"), sizes, "", true);
    $("steps").max = info.limits.max_steps;
    if (!info.models.length) setStatus("no model is installed on this server", true);
  } catch (e) {
    setStatus(e.message, true);
  }
}

// A field's number, or null when it is empty ("auto": the model's default).
function numberOf(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function formValues() {
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    model: $("model").value,
    sampler: $("sampler").value || null,
    steps: numberOf("steps"),
    guidance: numberOf("guidance"),
    seed: numberOf("seed"),
    width: numberOf("width"),
    height: numberOf("height"),
    n: Number($("count").value),
  };
}

function toForm(p) {
  $("prompt").value = p.prompt || "";
  $("negative").value = p.negative_prompt || "";
  for (const [id, key] of [["model", "model"], ["sampler", "sampler"], ["width", "width"],
                           ["height", "height"], ["count", "n"], ["steps", "steps"],
                           ["guidance", "guidance"], ["seed", "seed"]]) {
    $(id).value = p[key] === undefined || p[key] === null ? "" : String(p[key]);
  }
}

function busy(on) {
  $("go").disabled = on;
  $("cancel").disabled = !on;
  if (!on) currentJob = null;
}

async function generate(payload) {
  busy(true);
  $("bar").style.width = "0";
  setStatus("queued…");
  try {
    const job = await api("/api/jobs", { method: "POST", body: JSON.stringify(payload) });
    currentJob = job.id;
    await follow(job.id, payload);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    busy(false);
    $("preview").classList.add("hidden");
  }
}

// Server-sent events over fetch: blocks "event: NAME\ndata: JSON" separated by blank lines.
async function follow(id, payload) {
  const r = await fetch(`/api/jobs/${id}/events`, { headers: headers(false) });
  if (!r.ok) throw new Error(`events: ${r.status}`);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const ev = parseEvent(block);
      if (ev && onEvent(ev, payload)) return;
    }
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  return data.length ? { name, data: JSON.parse(data.join("\n")) } : null;
}

// Returns true when the job is over.
function onEvent(ev, payload) {
  if (ev.name === "progress") {
    const d = ev.data;
    $("bar").style.width = `${(100 * d.step) / d.total}%`;
    setStatus(`step ${d.step} / ${d.total}`);
    if (d.preview) {
      $("preview").src = "data:image/png;base64," + d.preview;
      $("preview").classList.remove("hidden");
    }
  } else if (ev.name === "done") {
    $("bar").style.width = "100%";
    setStatus("done");
    addResult(payload, ev.data);
    return true;
  } else if (ev.name === "error") {
    setStatus(ev.data.code === "cancelled" ? "cancelled" : ev.data.message, true);
    return true;
  }
  return false;
}

function addResult(payload, result) {
  $("empty").classList.add("hidden");
  // The settings the server ran with (the model's defaults in place of "auto").
  const params = { ...payload, seed: result.seed, steps: result.steps,
                   guidance: result.guidance, sampler: result.sampler, width: result.width,
                   height: result.height };
  delete params.init_file;
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  const grid = card.querySelector(".grid");
  const n = result.images.length;
  grid.style.setProperty("--cols", n === 1 ? 1 : n <= 4 ? 2 : 3);
  for (const url of result.images) grid.appendChild(tile(url, params));
  card.querySelector(".params").textContent = result.infotexts[0] || "";
  card.querySelector('[data-act="copy"]').onclick = () => copy(result.infotexts.join("\n\n"));
  card.querySelector('[data-act="form"]').onclick = () => toForm(params);
  card.querySelector('[data-act="seed"]').onclick = () => { $("seed").value = result.seed; };
  $("gallery").prepend(card);
}

function tile(url, params) {
  const div = document.createElement("div");
  div.className = "tile";
  const a = document.createElement("a");
  a.href = url;
  a.target = "_blank";
  const img = document.createElement("img");
  img.src = url;
  img.alt = params.prompt;
  a.appendChild(img);
  const vary = document.createElement("button");
  vary.type = "button";
  vary.textContent = "Vary";
  vary.title = "img2img of this image at strength 0.5";
  vary.onclick = () => generate({ ...params, n: 1, seed: null, width: null, height: null,
                                  init_file: url, strength: 0.5 });
  div.append(a, vary);
  return div;
}

async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    setStatus("parameters copied");
  } catch (e) {
    setStatus("could not copy: " + e.message, true);
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!currentJob) generate(formValues());
});
$("cancel").onclick = () => {
  if (currentJob) api(`/api/jobs/${currentJob}/cancel`, { method: "POST", body: "{}" });
};
$("randomise").onclick = () => { $("seed").value = Math.floor(Math.random() * 2 ** 32); };
$("api-key").addEventListener("change", () => {
  apiKey = $("api-key").value.trim();
  localStorage.setItem("nanodiffusion-key", apiKey);
  init();
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
});
init();
