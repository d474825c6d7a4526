// icd serve's page: upload a photo, invert it once, then edit it many times (POST /invert, POST /edit).
// No libraries, no requests to anywhere but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, original: null, inversion: null, invertedFor: null, recipe: null, busy: false };

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
  refresh();
}

function invertKey() {
  return state.file ? [state.file.name, state.file.size, state.file.lastModified, $("src").value, $("seed").value].join("|") : null;
}

function inverted() {
  return state.inversion !== null && state.invertedFor === invertKey();
}

function refresh() {
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
