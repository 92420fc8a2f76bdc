// dalle-flax demo page: streams POST /api/generate/stream (server-sent events over fetch) and shows
// the queue position, a preview grid that sharpens as image tokens arrive, then the images.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("generate-form");
const button = $("generate");
const statusBox = $("status");
const progressBar = $("progress");
const previewBox = $("preview-box");
const preview = $("preview");
const gallery = $("gallery");
const INTEGER_FIELDS = ["num_images", "top_k"];
const NUMBER_FIELDS = ["guidance_scale", "temperature", "top_p"];
let models = [];

function setStatus(text, isError) {
  statusBox.textContent = text;
  statusBox.className = isError ? "error" : "";
}

function slug(text) {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 48) || "image";
}

function requestBody() {
  const body = {prompt: $("prompt").value};
  if ($("model").value) body.model = $("model").value;
  for (const name of INTEGER_FIELDS.concat(NUMBER_FIELDS)) {
    const raw = $(name).value.trim();
    if (raw !== "") body[name] = Number(raw);  // blank: the model's default (the server decides)
  }
  if (!$("random_seed").checked && $("seed").value.trim() !== "") body.seed = Number($("seed").value);
  return body;
}

function useSeed(seed) {
  $("seed").value = String(seed);
  $("random_seed").checked = false;
  $("num_images").value = "1";
  setStatus("seed " + seed + " set: Generate makes that image again", false);
}

function showImages(prompt, data) {
  gallery.textContent = "";
  data.images.forEach((b64, i) => {
    const seed = data.seeds[i];
    const figure = document.createElement("figure");
    figure.dataset.seed = String(seed);
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.alt = prompt + " (seed " + seed + ")";
    const caption = document.createElement("figcaption");
    const seedButton = document.createElement("button");
    seedButton.type = "button";
    seedButton.className = "seed-button";
    seedButton.textContent = "seed " + seed;
    seedButton.title = "click to reuse this seed (makes this image again)";
    seedButton.addEventListener("click", () => useSeed(seed));
    const save = document.createElement("a");
    save.className = "download";
    save.href = img.src;
    save.download = slug(prompt) + "_" + seed + ".png";
    save.textContent = "download";
    caption.append(seedButton, save);
    figure.append(img, caption);
    gallery.append(figure);
  });
  const grid = $("download-grid");
  grid.href = "data:image/png;base64," + data.grid;
  grid.download = slug(prompt) + "_grid.png";
  $("results-info").textContent =
    data.images.length + " image(s) from " + data.model + " in " + data.elapsed_s.toFixed(1) + " s";
  $("results-bar").classList.add("active");
}

function describeError(status, data) {
  if (status === 422 && Array.isArray(data.detail)) {
    return data.detail.map((d) => (d.loc || []).filter((p) => p !== "body").join(".") + ": " + d.msg).join("; ");
  }
  return typeof data.detail === "string" ? data.detail : "HTTP " + status;
}

// Yields {event, data} for each server-sent event of a fetch response body.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield {event, data: JSON.parse(data.join("\n"))};
    }
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = requestBody();
  button.disabled = true;
  const started = Date.now();
  let phase = "Sending…";
  const elapsed = () => ((Date.now() - started) / 1000).toFixed(1) + " s";
  const tick = () => setStatus(phase + " · " + elapsed(), false);
  const timer = setInterval(tick, 250);
  tick();
  progressBar.hidden = false;
  progressBar.value = 0;
  try {
    const response = await fetch("/api/generate/stream", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      let message = describeError(response.status, data);
      if (response.status === 429) message += " (retry in " + (response.headers.get("Retry-After") || "?") + " s)";
      throw new Error(message);
    }
    let finished = false;
    for await (const {event: name, data} of readEvents(response)) {
      if (name === "queued") {
        phase = data.position === 1 && !data.eta_s ? "Waiting for the model" :
          "In the queue: position " + data.position + (data.eta_s != null ? ", about " + Math.round(data.eta_s) + " s" : "");
      } else if (name === "progress") {
        phase = "Generating: token " + data.step + " of " + data.total;
        progressBar.max = data.total;
        progressBar.value = data.step;
        preview.src = "data:image/png;base64," + data.preview;
        previewBox.classList.add("active");
      } else if (name === "done") {
        finished = true;
        progressBar.value = progressBar.max;
        showImages(body.prompt, data);
        previewBox.classList.remove("active");
        clearInterval(timer);
        setStatus("Done: " + data.images.length + " image(s) in " + data.elapsed_s.toFixed(1) + " s", false);
      } else if (name === "error") {
        throw new Error(data.error);
      }
    }
    if (!finished) throw new Error("the server closed the stream before the images were done");
  } catch (error) {
    clearInterval(timer);
    setStatus("Error: " + error.message, true);
  } finally {
    clearInterval(timer);
    button.disabled = false;
  }
});

function applyDefaults(info) {
  $("model-info").textContent = info.name + " · " + info.image_size.join("×") + " images · up to " +
    $("num_images").max + " per request";
  for (const key of ["guidance_scale", "temperature", "top_k", "top_p"]) {
    const value = info.defaults[key];
    $(key).placeholder = value == null ? "model default" : "default " + value;
  }
  $("top_k").max = info.image_vocab_size;
}

$("model").addEventListener("change", () => {
  const info = models.find((m) => m.name === $("model").value);
  if (info) applyDefaults(info);
});
$("seed").addEventListener("input", () => { $("random_seed").checked = $("seed").value.trim() === ""; });

Promise.all([fetch("/api/models").then((r) => r.json()), fetch("/health").then((r) => r.json())])
  .then(([list, health]) => {
    models = list;
    $("num_images").max = health.max_images;
    const select = $("model");
    for (const info of list) {
      const option = document.createElement("option");
      option.value = info.name;
      option.textContent = info.name;
      select.append(option);
    }
    if (list.length) applyDefaults(list[0]);
    document.body.dataset.ready = "true";
  })
  .catch((error) => setStatus("Could not reach the server: " + error.message, true));
