// icd serve's page: upload a photo, invert it once, then edit it many times (POST /invert, POST /edit).
// No libraries, no requests to anywhere but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, original: null, inversion: null, invertedFor: null, recipe: null, busy: false };
// the painted region: `mask` (offscreen, white strokes on black) is what /edit gets; the canvas shows the photo
// with the strokes over it
const region = { photo: null, mask: null, painted: false, last: null };
const REGION_SIDE = 360; // the longer side the photo is painted on, in canvas pixels

function say(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

function seconds(value) {
  return `${Number(value).toFixed(2)} s`;
}

async function call(path, options) {
  const response = await fetch(path, options);
  let body = {};
  try {
    body = await response.json();
  } catch (_) {
    body = { error: `${response.status} ${response.statusText}` };
  }
  if (!response.ok) {
    const error = new Error(body.error || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// --- the model ------------------------------------------------------------------------------------------------

async function describe() {
  try {
    const api = await call("/api");
    if (!api.model) {
      $("model").textContent = "the model is loading; reload in a moment";
      return;
    }
    const m = api.model;
    const r = m.recipe;
    state.recipe = r;
    $("model").textContent =
      `${m.name} on ${m.backend} (${m.device}, ${m.steps} steps) · recipe: ${r.method}, guidance ${r.guidance}, tau ${r.tau}`;
    $("method").options[0].textContent = `recipe (${r.method})`;
    $("guidance").placeholder = r.guidance;
    $("tau").placeholder = r.tau;
    $("cross-replace").placeholder = r.cross_replace;
    $("self-replace").placeholder = r.self_replace;
    $("amplify-new").placeholder = r.amplify;
    $("seed").placeholder = `recipe (${r.seed})`;
    showMethodFields();
  } catch (error) {
    $("model").textContent = `cannot reach the server: ${error.message}`;
  }
}

function chosenMethod() {
  const method = $("method").value;
  return method === "auto" && state.recipe ? state.recipe.method : method;
}

function showMethodFields() {
  const method = chosenMethod();
  $("p2p-fields").hidden = method === "swap";
  $("swap-fields").hidden = method !== "swap";
}

// --- the photo and its inversion ------------------------------------------------------------------------------

function setFile(file) {
  if (!file) return;
  state.file = file;
  state.inversion = null;
  if (state.original) URL.revokeObjectURL(state.original);
  state.original = URL.createObjectURL(file);
  $("preview").src = state.original;
  $("preview").hidden = false;
  $("drop-text").textContent = file.name;
  $("history-original-image").src = state.original;
  $("history-original").hidden = false;
  $("inversion").textContent = "not inverted yet";
  loadRegion(state.original);
  refresh();
}

// --- the region that may change -------------------------------------------------------------------------------

function loadRegion(url) {
  Object.assign(region, { photo: null, mask: null, painted: false, last: null }); // nothing of the last photo's
  $("region").hidden = true;
  $("region-empty").hidden = false;
  $("region-empty").textContent = "loading the photo to paint on…";
  const photo = new Image();
  photo.onerror = () => {
    $("region-empty").textContent = "this browser cannot show the photo: the edit may change all of it";
  };
  photo.onload = () => {
    const scale = REGION_SIDE / Math.max(photo.naturalWidth, photo.naturalHeight);
    const canvas = $("region");
    canvas.width = Math.max(1, Math.round(photo.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(photo.naturalHeight * scale));
    region.photo = photo;
    region.mask = document.createElement("canvas");
    region.mask.width = canvas.width;
    region.mask.height = canvas.height;
    clearRegion();
    canvas.hidden = false;
    $("region-empty").hidden = true;
  };
  photo.src = url;
}

function clearRegion() {
  if (!region.photo) return;
  const mask = region.mask.getContext("2d");
  mask.fillStyle = "#000";
  mask.fillRect(0, 0, region.mask.width, region.mask.height);
  region.painted = false;
  drawRegion();
  refresh();
}

function drawRegion() {
  const canvas = $("region");
  const view = canvas.getContext("2d");
  view.globalCompositeOperation = "source-over";
  view.drawImage(region.photo, 0, 0, canvas.width, canvas.height);
  if (!region.painted) return;
  const tint = document.createElement("canvas"); // the strokes in translucent red over the photo
  tint.width = canvas.width;
  tint.height = canvas.height;
  const context = tint.getContext("2d");
  context.drawImage(region.mask, 0, 0);
  context.globalCompositeOperation = "multiply";
  context.fillStyle = "#ff5050";
  context.fillRect(0, 0, tint.width, tint.height);
  view.globalAlpha = 0.55;
  view.globalCompositeOperation = "screen";
  view.drawImage(tint, 0, 0);
  view.globalAlpha = 1;
  view.globalCompositeOperation = "source-over";
}

function paintAt(event) {
  const canvas = $("region");
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;
  const point = { x: (event.clientX - box.left) * scale, y: (event.clientY - box.top) * scale };
  const mask = region.mask.getContext("2d");
  mask.strokeStyle = mask.fillStyle = "#fff";
  mask.lineWidth = Number($("brush").value) * scale;
  mask.lineCap = "round";
  mask.beginPath();
  mask.moveTo((region.last || point).x, (region.last || point).y);
  mask.lineTo(point.x, point.y);
  mask.stroke();
  region.last = point;
  region.painted = true;
  drawRegion();
}

function regionMask() {
  return region.painted ? region.mask.toDataURL("image/png") : null;
}

function invertKey() {
  return state.file ? [state.file.name, state.file.size, state.file.lastModified, $("src").value, $("seed").value].join("|") : null;
}

function inverted() {
  return state.inversion !== null && state.invertedFor === invertKey();
}

function refresh() {
  $("clear-region").disabled = state.busy || !region.painted;
  $("invert").disabled = state.busy || !state.file || !$("src").value.trim();
  $("edit").disabled = state.busy || !state.file || !$("src").value.trim() || !$("tgt").value.trim();
  $("history-original-src").textContent = $("src").value;
}

async function invert() {
  if (!state.file) throw new Error("choose a photo first");
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  form.append("src", $("src").value);
  if ($("seed").value !== "") form.append("seed", $("seed").value);
  const key = invertKey();
  say("inverting…");
  const result = await call("/invert", { method: "POST", body: form });
  state.inversion = result.inversion;
  state.invertedFor = key;
  $("inversion").textContent = result.cached
    ? `inverted already (${result.width}×${result.height}, seed ${result.seed})`
    : `inverted in ${seconds(result.seconds)} (${result.width}×${result.height}, seed ${result.seed})`;
  $("inversion").dataset.id = result.inversion;
  say(result.cached ? "inversion kept from before: edit away" : "inverted: edit away");
  return result;
}

// --- edits ----------------------------------------------------------------------------------------------------

function editFields() {
  const fields = { inversion: state.inversion, tgt: $("tgt").value };
  const put = (name, id) => {
    const value = $(id).value.trim();
    if (value !== "") fields[name] = value;
  };
  if ($("method").value !== "auto") fields.method = $("method").value;
  put("guidance", "guidance");
  put("tau", "tau");
  if (chosenMethod() === "swap") {
    if ($("unguided-prompt").value !== "source") fields.unguided_prompt = $("unguided-prompt").value;
  } else {
    put("cross_replace", "cross-replace");
    put("self_replace", "self-replace");
    put("amplify_new", "amplify-new");
    put("blend", "blend");
    put("amplify", "amplify");
  }
  const mask = regionMask();
  if (mask) fields.mask = mask;
  return fields;
}

function settingsText(record) {
  const parts = [record.method, `guidance ${record.guidance}`, `tau ${record.tau}`];
  const p2p = record.p2p;
  if (p2p) {
    parts.push(`cross ${p2p.cross_replace}`, `self ${p2p.self_replace}`);
    const blend = [...p2p.blend, ...p2p.blend_source, ...p2p.blend_target];
    if (blend.length) parts.push(`blend ${blend.join(" ")}`);
    const amplified = Object.entries(p2p.amplify).map(([word, factor]) => `${word}=${factor}`);
    if (amplified.length) parts.push(`amplify ${amplified.join(" ")}`);
    if (p2p.amplify_new !== 1) parts.push(`new words ×${p2p.amplify_new}`);
  }
  if (record.unguided_prompt) parts.push(`unguided: ${record.unguided_prompt}`);
  if (record.mask_sha256) parts.push("painted region");
  return parts.join(" · ");
}

function addHistory(result) {
  const entry = document.createElement("figure");
  entry.className = "entry";
  entry.dataset.id = result.id;
  entry.dataset.seconds = result.seconds;
  const image = document.createElement("img");
  image.src = result.image;
  image.alt = result.record.tgt;
  const caption = document.createElement("figcaption");
  const target = document.createElement("strong");
  target.className = "target";
  target.textContent = result.record.tgt;
  const settings = document.createElement("span");
  settings.className = "settings";
  settings.textContent = settingsText(result.record);
  const time = document.createElement("span");
  time.className = "seconds";
  time.textContent = seconds(result.seconds);
  const link = document.createElement("a");
  link.href = result.image;
  link.download = "";
  link.textContent = "Download PNG";
  caption.append(target, settings, time, link);
  entry.append(image, caption);
  $("history").append(entry);
  entry.scrollIntoView({ block: "nearest", inline: "end" });
}

function showResult(result) {
  return new Promise((resolve) => {
    const image = $("result");
    image.onload = () => {
      image.hidden = false;
      image.dataset.shown = result.id;
      resolve();
    };
    image.onerror = () => resolve();
    image.alt = result.record.tgt;
    image.src = result.image;
    $("result-info").textContent = `“${result.record.tgt}” · ${settingsText(result.record)} · ${seconds(result.seconds)}`;
    $("download").href = result.image;
    $("download").hidden = false;
  });
}

async function edit() {
  if (!inverted()) await invert();
  say("editing…");
  let result;
  try {
    result = await call("/edit", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(editFields()) });
  } catch (error) {
    if (error.status !== 404) throw error;
    await invert(); // the server dropped (or restarted without) the inversion: once more
    result = await call("/edit", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(editFields()) });
  }
  await showResult(result);
  addHistory(result);
  say(`edited in ${seconds(result.seconds)}`);
}

async function run(task) {
  state.busy = true;
  refresh();
  try {
    await task();
  } catch (error) {
    say(error.message, true);
  } finally {
    state.busy = false;
    refresh();
  }
}

// --- wiring ---------------------------------------------------------------------------------------------------

$("file").addEventListener("change", (event) => setFile(event.target.files[0]));
for (const name of ["dragenter", "dragover"]) {
  $("drop").addEventListener(name, (event) => {
    event.preventDefault();
    $("drop").classList.add("over");
  });
}
for (const name of ["dragleave", "drop"]) {
  $("drop").addEventListener(name, (event) => {
    event.preventDefault();
    $("drop").classList.remove("over");
  });
}
$("drop").addEventListener("drop", (event) => setFile(event.dataTransfer.files[0]));
for (const id of ["src", "tgt", "seed"]) $(id).addEventListener("input", refresh);
$("method").addEventListener("change", showMethodFields);
$("region").addEventListener("pointerdown", (event) => {
  if (!region.photo) return;
  $("region").setPointerCapture(event.pointerId);
  region.last = null;
  paintAt(event);
});
$("region").addEventListener("pointermove", (event) => {
  if (region.last) paintAt(event);
});
for (const name of ["pointerup", "pointercancel"]) {
  $("region").addEventListener(name, () => {
    region.last = null;
    refresh();
  });
}
$("clear-region").addEventListener("click", clearRegion);
$("invert").addEventListener("click", () => run(invert));
$("edit").addEventListener("click", () => run(edit));
$("src").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !$("invert").disabled) run(invert);
});
$("tgt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !$("edit").disabled) run(edit);
});

describe();
refresh();
