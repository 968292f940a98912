// Face attribute editor: a thin client of the REST API (GET /v1/models, POST /v1/edit).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  file: null,
  models: [],
  model: null,
  faces: [],
  face: "all",
  values: {},
  inflight: false,
  pending: false,
  debounce: null,
  requestId: 0,
  photoId: null, // the server's id of the uploaded photo: later edits send it instead of the file
  photoModel: null, // the model photoId was cached for
};

function currentModel() {
  return state.models.find((m) => m.name === state.model);
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function setBusy(busy) {
  $("spinner").hidden = !busy;
  $("viewer").setAttribute("aria-busy", busy ? "true" : "false");
}

function pct(x) {
  return x == null ? "—" : `${Math.round(x * 100)}%`;
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models");
    const body = await resp.json();
    state.models = body.models.filter((m) => m.state === "loaded");
    const select = $("model");
    select.innerHTML = "";
    for (const m of body.models) {
      const opt = document.createElement("option");
      opt.value = m.name;
      opt.textContent = m.state === "loaded" ? `${m.name} (${m.architecture})` : `${m.name} (failed to load)`;
      opt.disabled = m.state !== "loaded";
      select.appendChild(opt);
    }
    if (!state.models.length) {
      showError("No model is loaded yet: train one and export it into weights/.");
      return;
    }
    state.model = body.default || state.models[0].name;
    select.value = state.model;
    renderModelInfo();
    buildSliders();
  } catch (err) {
    showError(`Could not reach the server: ${err}`);
  }
}

function renderModelInfo() {
  const m = currentModel();
  const info = $("model-info");
  if (!m) { info.textContent = ""; return; }
  const rows = [
    ["architecture", m.architecture],
    ["image size", `${m.image_size} px`],
    ["learned mask", m.learned_mask ? "yes" : "no (change map)"],
    ["precision", m.precision],
    ["slider ±1 =", `attribute difference ×${m.edit_gain ?? 1}`],
  ];
  const own = Object.entries(m.attribute_gains || {});
  if (own.length) {
    rows.push(["own gains", own.map(([a, g]) => `${a.replaceAll("_", " ")} ×${g}`).join(", ")]);
  }
  const test = (m.metrics || {}).test || (m.metrics || {}).val;
  if (test) {
    rows.push(["PSNR / SSIM", `${test.psnr?.toFixed(2)} dB / ${test.ssim?.toFixed(3)}`]);
    if (test.mean_edit_success != null) {
      rows.push(["edit success", pct(test.mean_edit_success)], ["preservation", pct(test.mean_preservation)]);
    }
  }
  if (m.training && m.training.steps != null) rows.push(["trained", `${m.training.steps} steps, ${m.training.wall_hours} h`]);
  info.innerHTML = "<table>" + rows.map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join("") + "</table>";
  $("model").title = rows.map(([k, v]) => `${k}: ${v}`).join("\n");
}

function buildSliders() {
  const m = currentModel();
  const box = $("sliders");
  box.innerHTML = "";
  state.values = {};
  for (const attr of m.attributes) {
    state.values[attr] = 0;
    const id = `slider-${attr}`;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = attr.replaceAll("_", " ");
    const implies = (m.implies || {})[attr];
    if (implies) {
      label.title = Object.entries(implies)
        .map(([side, other]) => `${side === "on" ? "Adding" : "Removing"} it: faces in the training data come ${describeValues(other)}`)
        .join("; ");
    }
    const input = document.createElement("input");
    Object.assign(input, { type: "range", id, min: -1, max: 1, step: 0.05, value: 0 });
    input.dataset.attr = attr;
    input.addEventListener("input", () => {
      state.values[attr] = parseFloat(input.value);
      renderSliderValue(attr);
      renderImplied();
      scheduleEdit();
    });
    const out = document.createElement("output");
    out.id = `value-${attr}`;
    out.htmlFor = id;
    box.append(label, input, out);
    renderSliderValue(attr);
  }
  renderImplied();
}

function faceAttributes() {
  if (!state.faces.length) return {};
  const face = state.face === "all" ? state.faces[0] : state.faces.find((f) => f.index === state.face);
  return (face && face.attributes) || {};
}

function renderSliderValue(attr) {
  const out = $(`value-${attr}`);
  if (!out) return;
  const v = state.values[attr] || 0;
  out.textContent = `${v > 0 ? "+" : ""}${v.toFixed(2)} · now ${pct(faceAttributes()[attr])}`;
}

function renderAllSliderValues() {
  for (const attr of Object.keys(state.values)) renderSliderValue(attr);
  renderImplied();
}

const pretty = (attr) => attr.replaceAll("_", " ");
// {Male: 1, No_Beard: 0} -> "with Male, without No Beard"
function describeValues(values) {
  const names = (w) => Object.entries(values).filter(([, v]) => v === w).map(([a]) => pretty(a)).join(", ");
  return [names(1) && `with ${names(1)}`, names(0) && `without ${names(0)}`].filter(Boolean).join(", ");
}

// What the moved sliders imply in the training labels (a moustache comes with Male, without No
// Beard) where the face reads otherwise (every implied value when there is no reading): the edit
// may change those too.
function impliedNotes() {
  const implies = currentModel().implies || {};
  const reading = faceAttributes();
  const notes = [];
  for (const [attr, v] of Object.entries(state.values)) {
    if (!v || !implies[attr]) continue;
    const side = v > 0 ? "on" : "off";
    const other = implies[attr][side] || {};
    // the face already is what the slider asks (adding what it has): nothing is implied
    if (attr in reading && (reading[attr] >= 0.5) === (side === "on")) continue;
    const unmet = Object.fromEntries(
      Object.entries(other).filter(([a, w]) =>
        a in reading ? (reading[a] >= 0.5) !== (w === 1) : Object.keys(reading).length === 0),
    );
    if (Object.keys(unmet).length) notes.push({ attr, side, unmet });
  }
  return notes;
}

function renderImplied() {
  const box = $("implied");
  if (!box) return;
  const notes = impliedNotes();
  box.hidden = notes.length === 0;
  box.textContent = notes
    .map(({ attr, side, unmet }) =>
      `${side === "on" ? "Adding" : "Removing"} ${pretty(attr)}: faces in the training data (CelebA-HQ) come ` +
      `${describeValues(unmet)}, so the edit may change ${Object.keys(unmet).length > 1 ? "those" : "that"} too.`)
    .join(" ");
}

function resetSliders() {
  for (const input of $("sliders").querySelectorAll("input")) {
    input.value = 0;
    state.values[input.dataset.attr] = 0;
  }
  renderAllSliderValues();
  scheduleEdit(0);
}

function scheduleEdit(delay = 150) {
  if (!state.file) return;
  clearTimeout(state.debounce);
  state.debounce = setTimeout(requestEdit, delay);
}

async function requestEdit() {
  if (!state.file) return;
  if (state.inflight) { state.pending = true; return; }  // only the latest values are sent next
  state.inflight = true;
  setBusy(true);
  const id = ++state.requestId;
  try {
    // previews: JPEG is smaller and faster to encode; the overlay only while it is shown
    const body = await postEdit("jpeg", $("show-mask").checked);
    showError("");
    applyResult(body, id);
  } catch (err) {
    showError(String(err.message || err));
  } finally {
    state.inflight = false;
    setBusy(false);
    if (state.pending) { state.pending = false; requestEdit(); }
  }
}

function editForm(imageFormat, overlay) {
  const edits = Object.fromEntries(Object.entries(state.values).filter(([, v]) => v !== 0));
  const form = new FormData();
  if (state.photoId && state.photoModel === state.model) form.append("photo_id", state.photoId);
  else form.append("image", state.file, state.file.name || "photo");
  form.append("edits", JSON.stringify(edits));
  form.append("model", state.model);
  form.append("faces", state.face === "all" ? "all" : String(state.face));
  form.append("image_format", imageFormat);
  form.append("overlay", overlay ? "true" : "false");
  return form;
}

async function postEdit(imageFormat, overlay = true) {
  const file = state.file;
  let resp = await fetch("/v1/edit", { method: "POST", body: editForm(imageFormat, overlay) });
  if (resp.status === 404 && state.photoId) {
    // the server no longer caches the photo: upload it again
    state.photoId = null;
    resp = await fetch("/v1/edit", { method: "POST", body: editForm(imageFormat, overlay) });
  }
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.detail || `HTTP ${resp.status}`);
  if (state.file === file) {
    // a response for a photo the user has since replaced must not name the new one
    state.photoId = body.photo_id;
    state.photoModel = body.model;
  }
  return body;
}

async function download(which) {
  // full-resolution, lossless: the same edit again as PNG (features are cached on the server)
  setBusy(true);
  try {
    const body = await postEdit("png", which === "overlay");
    const bytes = Uint8Array.from(atob(body[which]), (ch) => ch.charCodeAt(0));
    const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
    const a = document.createElement("a");
    a.href = url;
    a.download = which === "image" ? "edited.png" : "overlay.png";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    showError(String(err.message || err));
  } finally {
    setBusy(false);
  }
}

function applyResult(body, id) {
  const mime = body.image_format === "jpeg" ? "image/jpeg" : "image/png";
  $("after").src = `data:${mime};base64,${body.image}`;
  if (body.overlay) {
    $("overlay").src = `data:${mime};base64,${body.overlay}`;
    $("overlay").dataset.requestId = String(id);
    $("overlay").hidden = !$("show-mask").checked;
  }
  $("after").dataset.requestId = String(id);
  $("download").setAttribute("aria-disabled", "false");
  $("download-overlay").setAttribute("aria-disabled", "false");
  if (state.face === "all" || state.faces.length === 0) {
    // a request for all faces reports every face: keep them for the picker and the outlines
    state.faces = body.faces;
    renderFaces();
  }
  renderAllSliderValues();
  renderCloseups(body.faces);
  const total = Object.values(body.timings_ms).reduce((a, b) => a + b, 0);
  $("status").textContent = `${body.faces.length} face(s) · ${body.model} · ${total.toFixed(0)} ms${body.cache_hit ? " (cached features)" : ""}`;
}

function renderCloseups(faces) {
  // each edited face as the model saw it: aligned crop, edited crop, and the mask of where it changed
  const box = $("closeups");
  box.innerHTML = "";
  for (const f of faces.slice(0, 8)) {
    const figure = document.createElement("figure");
    for (const [key, alt] of [["aligned", "before"], ["edited", "after"], ["mask", "mask"]]) {
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${f[key]}`;
      img.alt = `Face ${f.index + 1}, ${alt}`;
      img.className = key;
      figure.appendChild(img);
    }
    const caption = document.createElement("figcaption");
    caption.textContent = `Face ${f.index + 1}: before · after · mask`;
    figure.appendChild(caption);
    box.appendChild(figure);
  }
}

function renderFaces() {
  const svg = $("boxes");
  const img = $("before");
  svg.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
  svg.innerHTML = "";
  for (const f of state.faces) {
    const [x0, y0, x1, y1] = f.box;
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0 }).forEach(([k, v]) => rect.setAttribute(k, v));
    if (state.face === "all" || state.face === f.index) rect.classList.add("selected");
    const text = document.createElementNS("http://www.w3.org/2000/svg", "text");
    text.setAttribute("x", x0 + 4);
    text.setAttribute("y", y0 - 6);
    text.textContent = String(f.index + 1);
    svg.append(rect, text);
  }
  const field = $("faces-field");
  field.hidden = state.faces.length < 2;
  const box = $("faces");
  box.innerHTML = "";
  const options = [["all", "All faces"], ...state.faces.map((f) => [f.index, `Face ${f.index + 1}`])];
  for (const [value, text] of options) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    Object.assign(input, { type: "radio", name: "face", value: String(value) });
    input.checked = String(state.face) === String(value);
    input.addEventListener("change", () => {
      state.face = value === "all" ? "all" : Number(value);
      renderFaces();
      renderAllSliderValues();
      scheduleEdit(0);
    });
    const span = document.createElement("span");
    span.textContent = text;
    label.append(input, span);
    box.appendChild(label);
  }
}

function loadFile(file) {
  if (!file) return;
  const accepted = /^image\/(jpeg|png|webp|heic|heif|avif|tiff)$/.test(file.type) ||
    /\.(jpe?g|png|webp|heic|heif|avif|tiff?)$/i.test(file.name || "");
  if (!accepted) {
    showError(`${file.name || "That file"} is not a JPEG, PNG, WebP, HEIC, AVIF or TIFF image.`);
    return;
  }
  showError("");
  state.file = file;
  state.photoId = null;
  state.faces = [];
  state.face = "all";
  const url = URL.createObjectURL(file);
  $("before").src = url;
  $("after").src = url;
  $("overlay").hidden = true;  // the last photo's overlay must not cover this one
  delete $("overlay").dataset.requestId;
  $("viewer").hidden = false;
  $("download").setAttribute("aria-disabled", "true");
  $("download-overlay").setAttribute("aria-disabled", "true");
  $("before").onload = () => renderFaces();
  // a browser cannot show every upload (HEIC, TIFF): then the server's unedited JPEG stands in
  $("before").onerror = () => previewFromServer(file);
  scheduleEdit(0);
}

async function previewFromServer(file) {
  const form = new FormData();
  form.append("image", file, file.name || "photo");
  form.append("edits", "{}");
  form.append("model", state.model);
  form.append("image_format", "jpeg");
  form.append("overlay", "false");
  const resp = await fetch("/v1/edit", { method: "POST", body: form });
  if (!resp.ok || state.file !== file) return;
  const body = await resp.json();
  $("before").onerror = null;
  $("before").src = `data:image/jpeg;base64,${body.image}`;
}

function setupViewControls() {
  $("split").addEventListener("input", (e) => {
    $("after-clip").style.clipPath = `inset(0 0 0 ${e.target.value}%)`;
  });
  $("show-mask").addEventListener("change", (e) => {
    const shown = $("overlay").dataset.requestId;
    const current = shown !== undefined && shown === $("after").dataset.requestId;
    // an overlay of another edit (or none yet: a broken image) stays hidden until this edit's arrives
    $("overlay").hidden = !(e.target.checked && current);
    $("mask-opacity").disabled = !e.target.checked;
    // previews carry the overlay only while it is shown: fetch it for the current edit
    if (e.target.checked && !current) scheduleEdit(0);
  });
  $("mask-opacity").addEventListener("input", (e) => {
    $("overlay").style.opacity = String(e.target.value / 100);
  });
  $("overlay").style.opacity = String($("mask-opacity").value / 100);
}

function setupUpload() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => loadFile(e.target.files[0]));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("dragging"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, () => drop.classList.remove("dragging"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    loadFile(e.dataTransfer.files[0]);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setupUpload();
  setupViewControls();
  $("reset").addEventListener("click", resetSliders);
  $("download").addEventListener("click", (e) => { e.preventDefault(); download("image"); });
  $("download-overlay").addEventListener("click", (e) => { e.preventDefault(); download("overlay"); });
  $("model").addEventListener("change", (e) => {
    state.model = e.target.value;
    renderModelInfo();
    buildSliders();
    state.faces = [];
    state.face = "all";
    scheduleEdit(0);
  });
  loadModels();
});
