import { api, auth, ApiError, followJob, imageBlob, imageObjectUrl } from "./api.js";
import { pngInfotext, parseInfotext } from "./infotext.js";
import { MaskPainter } from "./mask.js";

const $ = (id) => document.getElementById(id);
const form = $("generate-form");
const jobsList = $("jobs");
const cards = new Map(); // job id -> card element
let lastSeed = null;
let initImage = null; // data URL of the img2img source
let controlImage = null; // data URL of the ControlNet unit's image
let viewerImage = null; // {url, job}

const painter = new MaskPainter($("mask-canvas"), { sizeInput: $("brush-size"), eraserInput: $("eraser") });

// ---------------------------------------------------------------- errors, auth, readiness
function showFormError(message, field = null) {
  const box = $("form-error");
  box.textContent = message;
  box.hidden = !message;
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  if (field && form.elements[field]) {
    form.elements[field].setAttribute("aria-invalid", "true");
    form.elements[field].focus();
  }
}

function explain(err) {
  if (!(err instanceof ApiError)) return { message: String(err) };
  if (err.status === 429) {
    const wait = err.retryAfter ?? 5;
    return { message: `The queue is full. Try again in ${wait} s.` };
  }
  if (err.status === 422 || err.status === 400) {
    const first = (err.body.errors || [])[0];
    return { message: `Check ${first?.field || "the form"}: ${first?.message || err.message}`, field: first?.field };
  }
  if (err.status === 503) return { message: `The server is not ready: ${err.message}` };
  if (err.status === 401) return { message: "This server needs an API key." };
  return { message: err.message || `Error ${err.status}` };
}

// Run an API call; on 401 ask for a key (again, if one was refused) until it goes through.
async function withAuth(fn) {
  for (;;) {
    try {
      return await fn();
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) throw err;
      await askForKey(auth.key ? "That key was not accepted. Try another." : "");
    }
  }
}

function askForKey(error = "") {
  const dialog = $("key-dialog");
  $("key-error").textContent = error;
  $("key-error").hidden = !error;
  $("api-key").value = "";
  $("key-button").hidden = false;
  return new Promise((resolve) => {
    $("key-form").onsubmit = (e) => {
      e.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) return;
      auth.key = key;
      dialog.close();
      resolve();
    };
    if (!dialog.open) dialog.showModal();
  });
}

async function pollReady() {
  const pill = $("server-status");
  try {
    const r = await api.ready();
    pill.textContent = r.ok ? "ready" : `not ready: ${r.reason || "starting"}`;
    pill.className = `pill ${r.ok ? "ready" : "down"}`;
    if (!r.ok) setTimeout(pollReady, 2000);
    return r.ok;
  } catch {
    pill.textContent = "offline";
    pill.className = "pill down";
    setTimeout(pollReady, 3000);
    return false;
  }
}

// ---------------------------------------------------------------- form: pickers and fields
let samplerInfo = [];

async function loadPickers() {
  const [models, samplers, loras, control, limits] = await withAuth(() => Promise.all(
    [api.models(), api.samplers(), api.loras(), api.controlnets(), api.limits()]));
  // The server's bounds (as its operator set them), so the form refuses what the server would.
  for (const id of ["width", "height"]) {
    Object.assign($(id), { min: limits.min_size, max: limits.max_size, step: limits.size_step });
  }
  $("steps").max = limits.max_steps;
  if (!$("steps").value) $("steps").value = limits.default_steps;
  $("n").max = limits.max_images;
  $("control-module").replaceChildren(...control.modules.map((m) => new Option(m, m, false, m === "canny")));
  $("control-model").replaceChildren(...(control.models.length
    ? control.models.map((m) => new Option(m, m))
    : [new Option("none in models/ControlNet", "")]));
  $("lora").replaceChildren(...(loras.length
    ? loras.map((l) => new Option(l.alias !== l.name ? `${l.name} (${l.alias})` : l.name, l.name))
    : [new Option("none in models/Lora", "")]));
  $("lora").disabled = $("lora-add").disabled = !loras.length;
  const modelSelect = $("model");
  modelSelect.replaceChildren(...models.map((m) => {
    const opt = new Option(m.demo ? `${m.name} (coloured shapes, 64×64)` : m.name, m.name);
    opt.selected = m.default;
    return opt;
  }));
  samplerInfo = samplers.samplers;
  $("sampler").replaceChildren(...samplerInfo.map((s) => new Option(s.name, s.name, false, s.name === samplers.default)));
  const labels = Object.fromEntries(samplers.schedules.map((s) => [s.name, s.label]));
  const fillSchedules = () => {
    const current = $("scheduler").value || "automatic";
    const sampler = samplerInfo.find((s) => s.name === $("sampler").value);
    $("scheduler").replaceChildren(...(sampler?.schedules || ["automatic"]).map(
      (name) => new Option(labels[name] || name, name, false, name === current)));
  };
  $("sampler").addEventListener("change", fillSchedules);
  fillSchedules();
}

function currentMode() {
  return form.elements.mode.value;
}

function readForm() {
  const f = form.elements;
  const num = (el) => (el.value === "" ? undefined : Number(el.value));
  const body = {
    prompt: f.prompt.value,
    negative_prompt: f.negative_prompt.value,
    model: f.model.value || undefined,
    sampler: f.sampler.value || undefined,
    scheduler: f.scheduler.value || undefined,
    steps: num(f.steps),
    cfg_scale: num(f.cfg_scale),
    n: num(f.n),
    seed: num(f.seed) ?? -1,
    width: num(f.width),
    height: num(f.height),
  };
  // watch it form: about five previews over the run (each a small JPEG on the job's event stream)
  body.preview_every = Math.max(1, Math.round((body.steps ?? 20) / 5));
  if (controlImage && f["control-model"].value) {
    body.controlnet = [{ image: controlImage, module: f["control-module"].value, model: f["control-model"].value,
                         weight: Number(f["control-weight"].value || 1) }];
  }
  if (currentMode() === "img2img") {
    if (!initImage) throw new ApiError(422, "Choose a source image for image to image.",
      { errors: [{ field: "init-file", message: "choose a source image (or switch to text to image)" }] });
    body.init_image = initImage;
    body.strength = Number(f.strength.value);
    if (painter.hasMask()) body.mask = painter.toDataURL();
  }
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

async function generate() {
  showFormError("");
  const button = $("generate");
  button.disabled = true;
  try {
    const body = readForm();
    const job = await withAuth(() => api.submit(body));
    lastSeed = job.request.seed;
    upsertCard(job, true);
    follow(job.id);
  } catch (err) {
    const { message, field } = explain(err);
    showFormError(message, field);
  } finally {
    button.disabled = false;
  }
}

form.addEventListener("submit", (e) => { e.preventDefault(); generate(); });
document.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); generate(); }
});
for (const radio of form.elements.mode) {
  radio.addEventListener("change", () => { $("img2img-section").hidden = currentMode() !== "img2img"; });
}
$("seed-random").addEventListener("click", () => { form.elements.seed.value = -1; });
$("seed-last").addEventListener("click", () => { if (lastSeed !== null) form.elements.seed.value = lastSeed; });
$("strength").addEventListener("input", (e) => { $("strength-out").textContent = Number(e.target.value).toFixed(2); });
$("brush-size").addEventListener("input", (e) => { $("brush-size-out").textContent = e.target.value; });
$("size-preset").addEventListener("change", (e) => {
  const value = e.target.value;
  if (value === "custom") return form.elements.width.focus();
  const [w, h] = value === "auto" ? ["", ""] : value.split("x");
  form.elements.width.value = w;
  form.elements.height.value = h;
});
for (const name of ["width", "height"]) {
  form.elements[name].addEventListener("input", () => { $("size-preset").value = "custom"; });
}

// ---------------------------------------------------------------- img2img source and mask
function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function setInitImage(dataUrl) {
  initImage = dataUrl;
  const img = $("init-preview");
  await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; img.src = dataUrl; });
  painter.reset(img.naturalWidth, img.naturalHeight);
  $("canvas-wrap").hidden = false;
  $("mask-tools").hidden = false;
  form.elements["init-file"]?.removeAttribute?.("aria-invalid");
}

function clearInitImage() {
  initImage = null;
  $("canvas-wrap").hidden = true;
  $("mask-tools").hidden = true;
  $("init-file").value = "";
}

$("init-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (file) await setInitImage(await readFile(file));
});
const zone = $("drop-zone");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
zone.addEventListener("drop", async (e) => {
  e.preventDefault();
  zone.classList.remove("dragging");
  const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
  if (file) await setInitImage(await readFile(file));
});
$("clear-mask").addEventListener("click", () => painter.clear());

// One ControlNet unit: its image steers the picture through the chosen model (canny: edges drawn from it).
$("control-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  controlImage = file ? await readFile(file) : null;
  $("control-preview").hidden = !controlImage;
  if (controlImage) $("control-preview").src = controlImage;
});
$("remove-image").addEventListener("click", clearInitImage);

async function sendToImg2img(url) {
  const blob = await imageBlob(url);
  form.elements.mode.value = "img2img";
  $("img2img-section").hidden = false;
  await setInitImage(await readFile(blob));
  form.scrollIntoView({ behavior: "smooth" });
}

// ---------------------------------------------------------------- job cards and live progress
function describe(job) {
  const size = job.request.width ? `${job.request.width}×${job.request.height}` : "native size";
  return `${job.request.steps} steps · ${size} · ${job.request.sampler}`;
}

function upsertCard(job, prepend = false) {
  let card = cards.get(job.id);
  if (!card) {
    card = $("job-template").content.firstElementChild.cloneNode(true);
    card.dataset.jobId = job.id;
    card.querySelector(".prompt-line").textContent = job.request.prompt || "(no prompt)";
    card.querySelector(".prompt-line").title = job.request.prompt;
    card.querySelector(".meta").textContent = describe(job);
    card.querySelector(".cancel").addEventListener("click", async () => {
      try { await withAuth(() => api.cancel(job.id)); } catch (err) { if (err.status !== 409) alert(explain(err).message); }
    });
    cards.set(job.id, card);
    prepend ? jobsList.prepend(card) : jobsList.append(card);
  }
  $("empty").hidden = true;
  render(card, job);
  return card;
}

function render(card, state) {
  const status = state.status;
  card.dataset.status = status;
  const badge = card.querySelector(".status");
  badge.textContent = status;
  badge.className = `status ${status}`;
  const bar = card.querySelector("progress");
  const text = card.querySelector(".progress-text");
  const progress = state.progress ?? 0;
  bar.value = progress;
  card.dataset.progress = progress;
  if (status === "queued") {
    text.textContent = `queued · position ${(state.queue_position ?? 0) + 1}` + (state.eta_s != null ? ` · ~${Math.ceil(state.eta_s)} s` : "");
  } else if (status === "running") {
    text.textContent = `${state.step}/${state.steps}` + (state.eta_s != null ? ` · ${Math.ceil(state.eta_s)} s left` : "");
  } else {
    text.textContent = status === "succeeded" ? `${state.steps}/${state.steps}` : "";
  }
  card.querySelector(".cancel").hidden = !["queued", "running"].includes(status);
  if (status !== "running") card.querySelector(".preview").hidden = true;
  const err = card.querySelector(".job-error");
  err.hidden = !state.error || status === "canceled";
  err.textContent = state.error || "";
  if (status === "succeeded" && state.images && !card.dataset.thumbs) {
    card.dataset.thumbs = "1";
    showThumbs(card, state);
  }
}

// The forming picture (a `preview` event): shown on the card while the job runs, replaced by the images.
function showPreview(card, event) {
  const img = card.querySelector(".preview");
  img.src = `data:${event.media_type};base64,${event.image}`;
  img.dataset.step = event.step;
  img.title = `step ${event.step}/${event.steps}`;
  img.hidden = false;
}

async function showThumbs(card, job) {
  const box = card.querySelector(".thumbs");
  for (const ref of job.images) {
    if (ref.blocked) {  // moderation withheld it: there is nothing to show
      const note = document.createElement("span");
      note.className = "blocked";
      note.textContent = `blocked: ${ref.reason || "moderation"}`;
      box.append(note);
      continue;
    }
    const button = document.createElement("button");
    button.type = "button";
    button.title = `Seed ${ref.seed}: click to enlarge`;
    const img = document.createElement("img");
    img.alt = `${job.request.prompt} (seed ${ref.seed})`;
    img.dataset.seed = ref.seed;
    button.append(img);
    button.addEventListener("click", () => openViewer(ref, job));
    box.append(button);
    try { img.src = await imageObjectUrl(ref.url); } catch { img.alt = "image unavailable"; }
  }
}

async function follow(id) {
  const card = cards.get(id);
  try {
    await followJob(id, (name, data) => {
      if (name === "preview") showPreview(card, data);
      else if (name === "progress") render(card, { ...data, status: "running" });
      else render(card, data);
      if (name === "succeeded" && data.images?.length) lastSeed = data.images[0].seed;
    });
  } catch (err) {
    // The stream broke (server restart, network): fall back to polling until the job ends.
    for (;;) {
      await new Promise((r) => setTimeout(r, 1000));
      try {
        const job = await api.job(id);
        render(card, job);
        if (!["queued", "running"].includes(job.status)) return;
      } catch { /* keep trying */ }
    }
  }
}

const PAGE = 40;
let historyOffset = 0;

// The history, a page at a time (older pages on demand); jobs past the retention period are gone.
async function loadHistory() {
  const jobs = await withAuth(() => api.jobs(PAGE, historyOffset));
  historyOffset += jobs.length;
  for (const job of jobs) {
    upsertCard(job);
    if (["queued", "running"].includes(job.status)) follow(job.id);
  }
  $("older").hidden = jobs.length < PAGE;
}

// ---------------------------------------------------------------- viewer, reuse parameters
async function openViewer(ref, job) {
  viewerImage = { ref, job };
  const url = await imageObjectUrl(ref.url);
  $("viewer-image").src = url;
  $("viewer-image").alt = job.request.prompt;
  $("viewer-download").href = url;
  $("viewer-download").download = `sdserve-${ref.seed}.png`;
  const text = await pngInfotext(await imageBlob(ref.url));
  $("viewer-info").textContent = text || "";
  $("viewer").showModal();
}

async function reuseParameters() {
  const text = await pngInfotext(await imageBlob(viewerImage.ref.url));
  if (!text) return;
  const p = parseInfotext(text);
  const f = form.elements;
  f.prompt.value = p.Prompt;
  f.negative_prompt.value = p["Negative prompt"];
  if (p.Steps) f.steps.value = p.Steps;
  if (p["CFG scale"]) f.cfg_scale.value = p["CFG scale"];
  if (p.Seed) f.seed.value = p.Seed;
  if (p.Size) {
    const [w, h] = p.Size.split("x");
    f.width.value = w;
    f.height.value = h;
    $("size-preset").value = [...$("size-preset").options].some((o) => o.value === p.Size) ? p.Size : "custom";
  }
  if (p.Model && [...f.model.options].some((o) => o.value === p.Model)) f.model.value = p.Model;
  if (p.Sampler && [...f.sampler.options].some((o) => o.value === p.Sampler)) {
    f.sampler.value = p.Sampler;
    f.sampler.dispatchEvent(new Event("change"));
  }
  const schedule = [...f.scheduler.options].find((o) => o.textContent === p["Schedule type"]);
  if (schedule) f.scheduler.value = schedule.value;
  $("viewer").close();
  f.prompt.focus();
}

// A1111's way: a LoRA is a tag in the prompt, which the server takes out and applies.
$("lora-add").addEventListener("click", () => {
  const name = $("lora").value;
  if (!name) return;
  const weight = Number($("lora-weight").value || 1);
  const prompt = form.elements.prompt;
  prompt.value = `${prompt.value.trimEnd()}${prompt.value.trim() ? " " : ""}<lora:${name}:${weight}>`;
  prompt.focus();
});

$("viewer-reuse").addEventListener("click", reuseParameters);
$("viewer-img2img").addEventListener("click", async () => {
  $("viewer").close();
  await sendToImg2img(viewerImage.ref.url);
});
$("key-button").addEventListener("click", () => askForKey());
$("older").addEventListener("click", async () => {
  try { await loadHistory(); } catch (err) { showFormError(explain(err).message); }
});

// ---------------------------------------------------------------- start
async function start() {
  if (auth.key) $("key-button").hidden = false;
  pollReady();
  try {
    await loadPickers();
    await loadHistory();
  } catch (err) {
    showFormError(explain(err).message);
  }
  document.body.dataset.ready = "1";
}

start();
