// faceflow's page: one photo or video through the HTTP API the page is served by (the
// deployed API or `faceflow serve`), the result beside the original, and a review step that
// corrects the detector's faces and renders them again without detecting again.
// Plain browser JavaScript, no framework, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
// Job polling: quick at first, then at most every few seconds (a long video takes minutes).
const POLL_FIRST_MS = 700;
const POLL_MAX_MS = 4000;
// A seek of the thumbnail video that never settles is given up after this long.
const SEEK_TIMEOUT_MS = 5000;
// Smallest box a drag adds (image pixels): a click without a drag adds nothing.
const MIN_BOX_PX = 4;

const state = {
  file: null,            // the File chosen
  kind: null,            // "image" | "video"
  originalUrl: null,     // object URL of the file
  operation: "anonymize",
  report: null,          // the last report from the API (analysis or anonymisation)
  faces: [],             // photo: the faces shown, each {face, review: "mask"|"exempt"|"removed", added}
  tracks: [],            // video: per track {track, first, last, frames, thumb: {frame, time, box}, review}
  added: [],             // video: boxes added on frames {frame, time, box}
  resultUrl: null,       // object URL or presigned URL of the result
  size: null,            // [width, height] of the photo or video, in its own pixels
  drawing: false,        // "Add a missed face" is on
  capabilities: null,    // what the API's OpenAPI document says it accepts
};

// -- the API ----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function apiUrl(path) {
  // relative to the page, so a page served under a path prefix calls its own API
  return new URL(path.replace(/^\//, ""), document.baseURI).toString();
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function errorFrom(response) {
  // The API's Error shape is {"message", "status"}; API Gateway's own 401/403/429 carry only message.
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && typeof body.message === "string") message = body.message;
  } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 401) message += ": enter a bearer token under \u201cAccess token\u201d";
  if (response.status === 403) message += ": this token may not do that";
  return new ApiError(message, response.status);
}

async function call(method, path, { body, headers, query } = {}) {
  const url = new URL(apiUrl(path));
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null) url.searchParams.set(key, value);
  }
  let response;
  try {
    response = await fetch(url, { method, body, headers: { ...authHeaders(), ...(headers || {}) } });
  } catch (err) {
    throw new ApiError(`cannot reach the server (${err.message})`, 0);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

async function callJson(method, path, payload) {
  const response = await call(method, path, {
    body: payload === undefined ? undefined : JSON.stringify(payload),
    headers: payload === undefined ? {} : { "Content-Type": "application/json" },
  });
  return response.json();
}

// What this API accepts, read from its OpenAPI document: which options /v1/anonymize takes,
// whether it renders given faces (review), whether it swaps faces, whether a job takes an edited report.
async function capabilities() {
  if (state.capabilities) return state.capabilities;
  const doc = await callJson("GET", "v1/openapi.json");
  const paths = doc.paths || {};
  const post = (path) => (paths[path] || {}).post || null;
  const params = (op) => new Set(((op && op.parameters) || []).map((p) => p.name));
  const formFields = (op) => {
    const content = ((op && op.requestBody) || {}).content || {};
    const schema = (content["multipart/form-data"] || {}).schema || {};
    return new Set(Object.keys(resolve(doc, schema).properties || {}));
  };
  const jsonFields = (op) => {
    const content = ((op && op.requestBody) || {}).content || {};
    const schema = (content["application/json"] || {}).schema || {};
    return new Set(Object.keys(resolve(doc, schema).properties || {}));
  };
  const anonymize = post("/v1/anonymize");
  const swap = post("/v1/swap");
  const jobs = post("/v1/jobs");
  state.capabilities = {
    anonymizeParams: params(anonymize),
    // rendering a reviewed photo: an edited report (faceflow.review's format) or its faces
    anonymizeReport: formFields(anonymize).has("report"),
    anonymizeFaces: formFields(anonymize).has("faces"),
    swap: Boolean(swap),
    swapFields: formFields(swap),
    jobReport: jsonFields(jobs).has("report"),
    swapJobs: jsonFields(jobs).has("source_filename"),
  };
  offerWhatTheServerDoes(state.capabilities);
  return state.capabilities;
}

function offerWhatTheServerDoes(caps) {
  // Strength and swap are offered only where the API has them.
  $("strength").disabled = !caps.anonymizeParams.has("cells");
  $("strength-hint").textContent = caps.anonymizeParams.has("cells")
    ? "How much detail a blurred or pixelated face keeps (photos)."
    : "This server masks at its default strength.";
  const swap = document.querySelector("input[name=operation][value=swap]");
  swap.disabled = !caps.swap;
  swap.parentElement.title = caps.swap ? "" : "This server does not swap faces";
  $("swap-hint").textContent = caps.swap ? "" : "This server does not swap faces.";
}

function resolve(doc, schema) {
  // one level of $ref, which is all Powertools writes for request bodies
  const ref = schema && schema.$ref;
  if (!ref) return schema || {};
  return ref.replace(/^#\//, "").split("/").reduce((node, key) => (node || {})[key], doc) || {};
}

function form(fields) {
  const data = new FormData();
  for (const [name, value] of Object.entries(fields)) {
    if (value instanceof Blob) data.append(name, value, value.name || name);
    else if (value !== undefined && value !== null) data.append(name, value);
  }
  return data;
}

// -- status and errors ------------------------------------------------------------------------

function say(text) {
  $("status").textContent = text;
}

function fail(err) {
  const box = $("error");
  box.textContent = err instanceof ApiError || err instanceof Error ? err.message : String(err);
  box.hidden = false;
  say("Stopped: see the error below.");
  setBusy(false);
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setBusy(busy) {
  $("run").disabled = busy;
  $("rerender").disabled = busy;
  document.body.setAttribute("aria-busy", busy ? "true" : "false");
}

function showProgress(fraction, text) {
  $("progress-row").hidden = fraction === null;
  if (fraction === null) return;
  $("progress").value = Math.max(0, Math.min(1, fraction));
  $("progress-text").textContent = text;
}

// -- choosing a file --------------------------------------------------------------------------

function kindOf(file) {
  // The browser's media type of the file; a file it cannot name is tried as a photo (the API
  // says so clearly when it is not one).
  return (file.type || "").startsWith("video/") ? "video" : "image";
}

function choose(file) {
  if (!file) return;
  state.file = file;
  state.kind = kindOf(file);
  if (state.originalUrl) URL.revokeObjectURL(state.originalUrl);
  state.originalUrl = URL.createObjectURL(file);
  $("file-info").textContent = `${file.name}: ${state.kind}, ${formatBytes(file.size)}`;
  say(`Ready: ${file.name}. Choose what to do and press Run.`);
  clearError();
}

function formatBytes(n) {
  if (n < 1024) return `${n} bytes`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function uploadName(name) {
  // The API takes plain names (they become part of a storage key): other characters become "_".
  const dot = name.lastIndexOf(".");
  const stem = (dot > 0 ? name.slice(0, dot) : name).replace(/[^A-Za-z0-9._ -]/g, "_").slice(0, 150);
  const ext = dot > 0 ? name.slice(dot + 1).replace(/[^A-Za-z0-9]/g, "") : "";
  return `${/^[A-Za-z0-9]/.test(stem) ? "" : "f"}${stem || "upload"}.${ext}`;
}

// -- running ----------------------------------------------------------------------------------

async function run(event) {
  event.preventDefault();
  clearError();
  if (!state.file) {
    fail(new Error("Choose a photo or a video first."));
    $("file").focus();
    return;
  }
  state.operation = document.querySelector("input[name=operation]:checked").value;
  setBusy(true);
  resetResults();
  try {
    const caps = await capabilities();
    if (state.operation === "swap" && !caps.swap) {
      throw new Error("This server does not swap faces (its API has no /v1/swap).");
    }
    if (state.operation === "swap" && !$("source").files[0]) {
      $("source").focus();
      throw new Error("Choose a photo of the source face for the swap.");
    }
    if (state.kind === "video") await runVideo();
    else await runPhoto();
    setBusy(false);
  } catch (err) {
    fail(err);
  }
}

function maskQuery() {
  const caps = state.capabilities;
  const query = { method: $("method").value, shape: $("shape").value };
  if (caps.anonymizeParams.has("cells")) query.cells = $("strength").value;
  return query;
}

async function runPhoto() {
  const file = state.file;
  say(`Finding faces in ${file.name}\u2026`);
  let analysis;
  try {
    const attributes = state.operation === "analyze" ? undefined : "none";
    const response = await call("POST", "v1/analyze", { body: form({ file }), query: { attributes } });
    analysis = await response.json();
  } catch (err) {
    if (err.status === 413) return runPhotoJob();  // too large for a direct answer: a job
    throw err;
  }
  state.report = analysis;
  state.size = [analysis.width, analysis.height];
  state.faces = analysis.faces.map((face) => ({ face, review: "mask", added: false }));
  showOriginalPhoto();
  if (state.operation === "analyze") {
    showAnalysis();
    say(`Done: ${countText(analysis.faces.length)} found.`);
    return;
  }
  if (state.operation === "swap") {
    await renderSwap();
    return;
  }
  await renderPhoto(false);
}

async function renderPhoto(edited) {
  // The first render is the API's own (detect, mask, check the masks); a reviewed one masks
  // exactly the faces of the edited report, detecting nothing again.
  const caps = state.capabilities;
  const masked = state.faces.filter((f) => f.review === "mask").map((f) => f.face);
  if (edited && !caps.anonymizeReport && !caps.anonymizeFaces) {
    throw new Error("This server cannot render given faces yet (its /v1/anonymize takes no report). "
      + "Download the edited JSON and render it with `faceflow anonymize PHOTO --from-report edited.json`.");
  }
  say(edited ? "Rendering the reviewed faces\u2026" : "Masking the faces\u2026");
  const fields = { file: state.file };
  if (edited && caps.anonymizeReport) fields.report = JSON.stringify(editedPhotoReport());
  else if (edited) fields.faces = JSON.stringify(editedPhotoReport().faces);
  let response;
  try {
    response = await call("POST", "v1/anonymize", { body: form(fields), query: maskQuery() });
  } catch (err) {
    if (err.status !== 413 || !edited || !caps.jobReport) throw err;
    // too large for a direct answer: a job renders the edited report
    const { links } = await runJob("anonymize", editedPhotoReport());
    showResultImage(links.image_url, null);
    showFaces();
    say(`Done: ${countText(masked.length)} masked. Rendered from the reviewed faces.`);
    return;
  }
  const blob = await response.blob();
  const count = response.headers.get("X-Faceflow-Faces");
  showResultImage(URL.createObjectURL(blob), resultName(blob.type));
  showFaces();
  const shown = count === null ? masked.length : Number(count);
  say(`Done: ${countText(shown)} masked.` + (edited ? " Rendered from the reviewed faces." : ""));
}

async function renderSwap() {
  say("Swapping faces\u2026");
  const caps = state.capabilities;
  const targetField = caps.swapFields.has("target") ? "target" : "file";
  const response = await call("POST", "v1/swap", { body: form({ [targetField]: state.file, source: $("source").files[0] }) });
  const blob = await response.blob();
  const count = response.headers.get("X-Faceflow-Faces");
  showResultImage(URL.createObjectURL(blob), resultName(blob.type));
  showFaces();
  say(`Done: ${countText(count === null ? state.faces.length : Number(count))} swapped.`);
}

async function runPhotoJob() {
  // A photo over the direct routes' limit: upload it to storage and let a job do it.
  const operation = state.operation;
  if (operation === "swap" && !state.capabilities.swapJobs) throw new Error("This photo is too large to swap directly.");
  const { links } = await runJob(operation);
  const report = await fetchReport(links.report_url);
  state.report = report;
  state.size = [report.width, report.height];
  state.faces = (report.faces || []).map((face) => ({ face, review: "mask", added: false }));
  showOriginalPhoto();
  if (operation === "analyze") {
    showAnalysis();
  } else {
    showResultImage(links.image_url, null);
    $("review").hidden = operation !== "anonymize";
    showFaces();
  }
  say(`Done: ${countText(state.faces.length)} found.`);
}

async function runVideo() {
  const operation = state.operation;
  if (operation === "swap" && !state.capabilities.swapJobs) throw new Error("This server has no swap jobs for videos.");
  const { links } = await runJob(operation);
  say("Reading the report\u2026");
  const report = await fetchReport(links.report_url);
  state.report = report;
  showOriginalVideo();
  if (links.video_url) showResultVideo(links.video_url);
  else showResultVideo(null);
  $("download-report").href = URL.createObjectURL(new Blob([JSON.stringify(report, null, 2)], { type: "application/json" }));
  $("download-report").download = `${stem(state.file.name)}.json`;
  $("download-report").hidden = false;
  collectTracks(report);
  showTracks();
  drawBoxes();
  const summary = report.summary || {};
  const faces = summary.faces !== undefined ? summary.faces : countFrameFaces(report);
  $("face-count").textContent = `${countText(faces)} in ${summary.frames ?? (report.frames || []).length} frames, `
    + `${state.tracks.length} track${state.tracks.length === 1 ? "" : "s"}`;
  say(`Done: ${state.tracks.length} track${state.tracks.length === 1 ? "" : "s"} found.`);
}

function countFrameFaces(report) {
  return (report.frames || []).reduce((n, f) => n + (f.faces || []).length, 0);
}

async function runJob(operation, report) {
  const file = state.file;
  say(`Creating a job for ${file.name}\u2026`);
  const request = { filename: uploadName(file.name), size: file.size, operation };
  if (report) request.report = report;
  const source = operation === "swap" ? $("source").files[0] : null;
  if (source) request.source_filename = uploadName(source.name);
  const job = await callJson("POST", "v1/jobs", request);
  await upload(job.upload, file);
  if (source && job.source_upload) {
    say("Uploading the source face\u2026");
    await put(job.source_upload.url, source, job.source_upload.headers, () => {});
  }
  // a multipart upload, or a job of two uploads, starts when told
  const complete = job.complete_url || job.upload.complete_url;
  if (complete) {
    say("Starting the job\u2026");
    await callJson("POST", complete);
  }
  const done = await poll(job.job_id);
  const links = await callJson("GET", `v1/jobs/${job.job_id}/result`);
  showProgress(1, "done");
  return { job: done, links };
}

function put(url, body, headers, onProgress) {
  // XMLHttpRequest rather than fetch: it reports upload progress.
  return new Promise((resolvePut, rejectPut) => {
    const request = new XMLHttpRequest();
    request.open("PUT", url);
    for (const [name, value] of Object.entries(headers || {})) request.setRequestHeader(name, value);
    request.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded); };
    request.onload = () => (request.status >= 200 && request.status < 300 ? resolvePut()
      : rejectPut(new ApiError(`the upload was refused (${request.status}): ${storageMessage(request.responseText)}`,
        request.status)));
    request.onerror = () => rejectPut(new ApiError(
      "the upload could not reach the storage (a network error, or the bucket has no CORS rule for this page)", 0));
    request.send(body);
  });
}

function storageMessage(xml) {
  const found = /<Message>([^<]*)<\/Message>/.exec(xml || "");
  return found ? found[1] : "no reason given";
}

async function upload(target, file) {
  const total = file.size;
  const report = (sent) => showProgress(0.5 * sent / total, `uploading ${Math.round(100 * sent / total)}%`);
  report(0);
  if (target.method === "PUT") {
    say("Uploading\u2026");
    await put(target.url, file, target.headers, report);
    return;
  }
  // An S3 multipart upload: each part to its own URL; the server joins them on complete.
  let sent = 0;
  for (const part of target.parts) {
    const start = (part.part_number - 1) * target.part_size;
    const chunk = file.slice(start, Math.min(total, start + target.part_size));
    say(`Uploading part ${part.part_number} of ${target.parts_total}\u2026`);
    await put(part.url, chunk, {}, (loaded) => report(sent + loaded));
    sent += chunk.size;
  }
}

async function poll(jobId) {
  let wait = POLL_FIRST_MS;
  for (;;) {
    const job = await callJson("GET", `v1/jobs/${jobId}`);
    if (job.status === "done") return job;
    if (job.status === "failed") throw new Error(`The job failed: ${job.error || "no reason given"}`);
    const progress = job.progress;
    if (progress && progress.frames_total) {  // one process (faceflow serve) counts frames
      const part = (progress.frames_done || 0) / progress.frames_total;
      showProgress(0.5 + 0.5 * part, `${job.status}: frame ${progress.frames_done || 0} of ${progress.frames_total}`);
    } else if (progress && progress.chunks_total) {
      const part = progress.chunks_done / progress.chunks_total;
      showProgress(0.5 + 0.5 * part, `${job.status}: ${progress.chunks_done} of ${progress.chunks_total} chunks`);
    } else {
      showProgress(0.5, job.stage ? `${job.status} (${job.stage})` : job.status);
    }
    say(`Job ${job.status}${job.stage ? ` (${job.stage})` : ""}\u2026`);
    await new Promise((r) => setTimeout(r, wait));
    wait = Math.min(POLL_MAX_MS, wait * 1.5);
  }
}

async function fetchReport(url) {
  let response;
  try {
    response = await fetch(url);
  } catch (err) {
    throw new ApiError("the report could not be read from storage (a network error, or the bucket has no CORS rule "
      + "for this page)", 0);
  }
  if (!response.ok) throw new ApiError(`the report could not be read (${response.status})`, response.status);
  return response.json();
}

// -- showing results --------------------------------------------------------------------------

function resetResults() {
  state.report = null;
  state.faces = [];
  state.tracks = [];
  state.added = [];
  state.size = null;
  setDrawing(false);
  for (const id of ["original-image", "result-image", "original-video", "result-video", "download-result",
    "download-report", "no-preview", "review", "tracks", "tracks-title", "frame-pick"]) $(id).hidden = true;
  $("faces").replaceChildren();
  $("tracks").replaceChildren();
  $("original-boxes").replaceChildren();
  $("result-boxes").replaceChildren();
  $("face-count").textContent = "";
  $("faces-title").hidden = false;
  showProgress(null);
  for (const el of document.querySelectorAll(".video-only")) el.hidden = true;
}

function stem(name) {
  const dot = name.lastIndexOf(".");
  return dot > 0 ? name.slice(0, dot) : name;
}

function resultName(type) {
  const ext = { "image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif",
    "image/heic": "heic", "image/avif": "avif" }[type];
  const original = state.file.name;
  return `${stem(original)}-${state.operation}.${ext || original.split(".").pop()}`;
}

function showOriginalPhoto() {
  $("results").hidden = false;
  const img = $("original-image");
  img.hidden = false;
  img.onerror = () => { $("no-preview").hidden = false; };
  img.src = state.originalUrl;
  drawBoxes();
}

function showResultImage(url, downloadName) {
  if (state.resultUrl && state.resultUrl.startsWith("blob:")) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = url;
  const img = $("result-image");
  img.hidden = false;
  img.alt = state.operation === "swap" ? "The photo with the faces swapped"
    : "The photo with the faces masked";
  img.onerror = () => { $("no-preview").hidden = false; };
  img.src = url;
  $("result-caption").textContent = state.operation === "swap" ? "Swapped" : "Anonymised";
  const link = $("download-result");
  link.href = url;
  link.download = downloadName || "";
  link.textContent = "Download result";
  link.hidden = false;
  setReportDownload();
  $("review").hidden = state.operation !== "anonymize";
  drawBoxes();
}

function showAnalysis() {
  // The result side is the photo with its boxes and labels; the download is that drawing.
  const img = $("result-image");
  img.hidden = false;
  img.alt = "The photo with each face outlined and labelled";
  img.src = state.originalUrl;
  $("result-caption").textContent = "Analysed";
  $("review").hidden = true;
  showFaces();
  setReportDownload();
  drawBoxes();
  img.decode().then(annotatedDownload).catch(() => { $("no-preview").hidden = false; });
}

function annotatedDownload() {
  const [width, height] = state.size;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage($("result-image"), 0, 0, width, height);
  ctx.lineWidth = Math.max(2, width / 400);
  ctx.font = `${Math.max(12, Math.round(width / 60))}px sans-serif`;
  state.faces.forEach(({ face }, i) => {
    const [x, y, w, h] = face.box;
    ctx.strokeStyle = "#ffd400";
    ctx.strokeRect(x, y, w, h);
    ctx.fillStyle = "#ffd400";
    ctx.fillText(`${i + 1} ${faceLabel(face)}`, x, Math.max(12, y - 4));
  });
  canvas.toBlob((blob) => {
    const link = $("download-result");
    link.href = URL.createObjectURL(blob);
    link.download = `${stem(state.file.name)}-faces.png`;
    link.textContent = "Download annotated image";
    link.hidden = false;
  }, "image/png");
}

function editedPhotoReport() {
  // faceflow.review's format: a removed face is absent, an exempt one has "exempt": true, one
  // drawn by hand "source": "manual"; width and height say which image the boxes are in.
  const faces = state.faces.filter((f) => f.review !== "removed")
    .map((f) => (f.review === "exempt" ? { ...f.face, exempt: true } : f.face));
  return { ...state.report, faces };
}

function setReportDownload() {
  const report = editedPhotoReport();
  const link = $("download-report");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([JSON.stringify(report, null, 2)], { type: "application/json" }));
  link.download = `${stem(state.file.name)}.json`;
  link.hidden = false;
}

function countText(n) {
  return `${n} face${n === 1 ? "" : "s"}`;
}

function faceLabel(face) {
  const parts = [];
  const gender = face.gender && (face.gender.value || face.gender);
  if (typeof gender === "string") parts.push(gender === "female" ? "F" : gender === "male" ? "M" : gender);
  const age = face.age && (face.age.bucket || face.age.value);
  if (age !== undefined && age !== null && typeof age !== "object") parts.push(String(age));
  return parts.join(" ");
}

function describe(face) {
  // Every attribute the API gave, readable: numbers rounded, nested objects flattened.
  const skip = new Set(["box", "landmarks", "mesh", "track", "source", "embedding"]);
  const items = [];
  const [x, y, w, h] = face.box.map((v) => Math.round(v));
  items.push(["box", `${w}\u00d7${h} at ${x}, ${y}`]);
  if (face.score !== undefined) items.push(["score", Number(face.score).toFixed(2)]);
  for (const [key, value] of Object.entries(face)) {
    if (skip.has(key) || key === "score") continue;
    items.push([key.replace(/_/g, " "), plain(value)]);
  }
  return items;
}

function plain(value) {
  // {"value": 27.6, "low": 24, "high": 29} reads "27.6 (low 24, high 29)"; names lose their "_"
  if (value === null || value === undefined) return "\u2014";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : String(Math.round(value * 100) / 100);
  if (Array.isArray(value)) return value.map(plain).join(", ");
  if (typeof value === "object") {
    const rest = Object.entries(value).filter(([k, v]) => k !== "value" && (typeof v !== "object" || v === null))
      .map(([k, v]) => `${k.replace(/_/g, " ")} ${plain(v)}`).join(", ");
    if (!("value" in value)) return rest;
    return rest ? `${plain(value.value)} (${rest})` : plain(value.value);
  }
  return String(value);
}

function showFaces() {
  const list = $("faces");
  list.replaceChildren();
  const shown = state.faces.filter((f) => f.review !== "removed");
  $("face-count").textContent = `${countText(shown.length)}` + (state.operation === "anonymize"
    ? ` (${state.faces.filter((f) => f.review === "mask").length} masked)` : "");
  state.faces.forEach((entry, i) => {
    const item = document.createElement("li");
    item.className = `face ${entry.review}`;
    const title = document.createElement("strong");
    title.textContent = `Face ${i + 1}` + (entry.added ? " (added)" : "")
      + (entry.review === "removed" ? " \u2014 removed" : entry.review === "exempt" ? " \u2014 exempt, not masked" : "");
    item.append(title);
    const details = document.createElement("dl");
    for (const [key, value] of describe(entry.face)) {
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = value;
      details.append(dt, dd);
    }
    item.append(details);
    if (state.operation === "anonymize" && state.kind === "image") item.append(faceControls(entry, i));
    list.append(item);
  });
}

function faceControls(entry, i) {
  const controls = document.createElement("div");
  controls.className = "face-controls";
  const exempt = document.createElement("button");
  exempt.type = "button";
  exempt.textContent = entry.review === "exempt" ? `Mask face ${i + 1}` : `Exempt face ${i + 1}`;
  exempt.setAttribute("aria-pressed", entry.review === "exempt" ? "true" : "false");
  exempt.disabled = entry.review === "removed";
  exempt.addEventListener("click", () => {
    entry.review = entry.review === "exempt" ? "mask" : "exempt";
    edited(`Face ${i + 1} ${entry.review === "exempt" ? "exempt from masking" : "masked again"}.`);
  });
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = entry.review === "removed" ? `Restore face ${i + 1}` : `Not a face: remove ${i + 1}`;
  remove.addEventListener("click", () => {
    entry.review = entry.review === "removed" ? "mask" : "removed";
    edited(`Face ${i + 1} ${entry.review === "removed" ? "removed" : "restored"}.`);
  });
  controls.append(exempt, remove);
  return controls;
}

function edited(message) {
  showFaces();
  drawBoxes();
  setReportDownload();
  say(`${message} Press \u201cRender again\u201d to apply.`);
}

function shownEntries() {
  // A photo's faces; on a video, the faces of the original's current frame (their track's
  // review state) and the boxes added on it.
  if (state.kind !== "video") return state.faces.map((entry, i) => ({ ...entry, label: String(i + 1) }));
  if (!state.report) return [];
  const frames = state.report.frames || [];
  const frame = frameAt($("original-video").currentTime);
  const found = frames[frame] && frames[frame].frame === frame ? frames[frame] : frames.find((f) => f.frame === frame);
  const reviews = new Map(state.tracks.map((t) => [t.track, t.review]));
  return [
    ...((found && found.faces) || []).map((face) => ({
      face, review: reviews.get(face.track) || "mask", added: false, label: `T${face.track ?? ""}` })),
    ...state.added.filter((a) => a.frame === frame).map((a) => ({
      face: { box: a.box }, review: "mask", added: true, label: "+" })),
  ];
}

function drawBoxes() {
  if (!state.size) return;
  const entries = shownEntries();
  // a result video plays on its own clock: boxes only over the original
  for (const id of state.kind === "video" ? ["original-boxes"] : ["original-boxes", "result-boxes"]) {
    const svg = $(id);
    svg.setAttribute("viewBox", `0 0 ${state.size[0]} ${state.size[1]}`);
    svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
    svg.replaceChildren();
    const stroke = Math.max(2, state.size[0] / 300);
    entries.forEach((entry) => {
      if (entry.review === "removed") return;
      const [x, y, w, h] = entry.face.box;
      const rect = document.createElementNS(SVG, "rect");
      for (const [k, v] of Object.entries({ x, y, width: w, height: h, "stroke-width": stroke })) rect.setAttribute(k, v);
      rect.setAttribute("class", `box ${entry.review}${entry.added ? " added" : ""}`);
      svg.append(rect);
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("x", x + stroke);
      label.setAttribute("y", Math.max(y - stroke * 2, state.size[1] / 40));
      label.setAttribute("font-size", Math.max(14, state.size[0] / 40));
      label.setAttribute("class", "label");
      const extra = state.operation === "analyze" && id === "result-boxes" ? ` ${faceLabel(entry.face)}` : "";
      label.textContent = `${entry.label}${extra}`;
      svg.append(label);
    });
  }
}

// -- review: drawing a box over a missed face -------------------------------------------------

function setDrawing(on) {
  state.drawing = on;
  $("add-box").setAttribute("aria-pressed", on ? "true" : "false");
  $("original-stage").classList.toggle("drawing", on);
  if (on) say("Drag over the missed face on the original.");
}

function svgPoint(svg, event) {
  const point = svg.createSVGPoint();
  point.x = event.clientX;
  point.y = event.clientY;
  const local = point.matrixTransform(svg.getScreenCTM().inverse());
  return [Math.max(0, Math.min(state.size[0], local.x)), Math.max(0, Math.min(state.size[1], local.y))];
}

function startDrag(event) {
  if (!state.drawing || !state.size) return;
  const svg = $("original-boxes");
  event.preventDefault();
  svg.setPointerCapture(event.pointerId);
  const start = svgPoint(svg, event);
  const rect = document.createElementNS(SVG, "rect");
  rect.setAttribute("class", "box added drawing");
  rect.setAttribute("stroke-width", Math.max(2, state.size[0] / 300));
  svg.append(rect);
  const move = (e) => {
    const [x, y] = svgPoint(svg, e);
    rect.setAttribute("x", Math.min(x, start[0]));
    rect.setAttribute("y", Math.min(y, start[1]));
    rect.setAttribute("width", Math.abs(x - start[0]));
    rect.setAttribute("height", Math.abs(y - start[1]));
  };
  const end = (e) => {
    svg.removeEventListener("pointermove", move);
    svg.removeEventListener("pointerup", end);
    svg.removeEventListener("pointercancel", end);
    const [x, y] = svgPoint(svg, e);
    rect.remove();
    const box = [Math.min(x, start[0]), Math.min(y, start[1]), Math.abs(x - start[0]), Math.abs(y - start[1])];
    if (box[2] >= MIN_BOX_PX && box[3] >= MIN_BOX_PX) addBox(box.map((v) => Math.round(v * 10) / 10));
  };
  svg.addEventListener("pointermove", move);
  svg.addEventListener("pointerup", end);
  svg.addEventListener("pointercancel", end);
}

function addBox(box) {
  setDrawing(false);
  if (state.kind === "video") {
    const video = $("original-video");
    const frame = frameAt(video.currentTime);
    state.added.push({ frame, time: video.currentTime, box });
    showTracks();
    drawBoxes();
    say(`Box added on frame ${frame}. Press \u201cRender again\u201d to apply.`);
    return;
  }
  state.faces.push({ face: { box, source: "manual" }, review: "mask", added: true });
  edited(`Face ${state.faces.length} added.`);
}

function addBoxByNumbers() {
  const numbers = ["box-x", "box-y", "box-w", "box-h"].map((id) => Number($(id).value));
  if (numbers.some((v) => !Number.isFinite(v)) || numbers[2] < 1 || numbers[3] < 1) {
    fail(new Error("Give x, y, width and height of the box in the image's pixels."));
    return;
  }
  clearError();
  if (state.kind === "video") {
    const frame = Math.max(0, Math.round(Number($("box-frame").value) || 0));
    state.added.push({ frame, time: timeOf(frame), box: numbers });
    showTracks();
    drawBoxes();
    say(`Box added on frame ${frame}. Press \u201cRender again\u201d to apply.`);
    return;
  }
  state.faces.push({ face: { box: numbers, source: "manual" }, review: "mask", added: true });
  edited(`Face ${state.faces.length} added.`);
}

async function rerender() {
  clearError();
  setBusy(true);
  try {
    await capabilities();
    if (state.kind === "video") await rerenderVideo();
    else await renderPhoto(true);
    setBusy(false);
  } catch (err) {
    fail(err);
  }
}

// -- video: tracks ----------------------------------------------------------------------------

function showOriginalVideo() {
  $("results").hidden = false;
  const video = $("original-video");
  video.hidden = false;
  video.src = state.originalUrl;
  video.onloadedmetadata = () => {
    if (!state.size) state.size = [video.videoWidth, video.videoHeight];
    drawBoxes();
  };
  video.onseeked = drawBoxes;
  const summary = state.report.summary || {};
  if (summary.width && summary.height) state.size = [summary.width, summary.height];
  else if (state.report.width) state.size = [state.report.width, state.report.height];
  $("review").hidden = state.operation !== "anonymize";
  for (const el of document.querySelectorAll(".video-only")) el.hidden = false;
  video.ontimeupdate = () => {
    $("frame-number").textContent = String(frameAt(video.currentTime));
    $("box-frame").value = frameAt(video.currentTime);
    drawBoxes();
  };
}

function showResultVideo(url) {
  const video = $("result-video");
  $("result-caption").textContent = !url ? "Analysed (report only)" : state.operation === "swap" ? "Swapped" : "Anonymised";
  if (!url) return;
  state.resultUrl = url;
  video.hidden = false;
  video.src = url;
  const link = $("download-result");
  link.href = url;
  link.download = `${stem(state.file.name)}-${state.operation}.mp4`;
  link.hidden = false;
}

function fpsOf(report) {
  return report.fps || (report.summary || {}).fps || 25;
}

function frameAt(seconds) {
  // The report's frame shown at `seconds` (each frame has its time; a report of joined chunks
  // gives no frame rate)
  const frames = state.report.frames || [];
  if (!frames.length || frames[0].time === undefined) return Math.round(seconds * fpsOf(state.report));
  let lo = 0;
  let hi = frames.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (frames[mid].time <= seconds + 1e-3) lo = mid; else hi = mid - 1;
  }
  return frames[lo].frame;
}

function timeOf(frame) {
  const found = (state.report.frames || []).find((f) => f.frame === frame);
  return found && found.time !== undefined ? found.time : frame / fpsOf(state.report);
}

function collectTracks(report) {
  // A video report lists its tracks (first and last frame, frames covered and, when anonymised,
  // the frame and box of its best face for a thumbnail; an analysis adds age and gender); the
  // faces per frame fill in what a list lacks.
  const seen = new Map();
  for (const frame of report.frames || []) {
    for (const face of frame.faces || []) {
      if (face.track === undefined || face.track === null) continue;
      let track = seen.get(face.track);
      if (!track) {
        track = { track: face.track, first: frame.frame, last: frame.frame, frames: 0, thumb: null };
        seen.set(face.track, track);
      }
      track.first = Math.min(track.first, frame.frame);
      track.last = Math.max(track.last, frame.frame);
      track.frames += 1;
      const detected = (face.source || "detected") === "detected";
      if (detected && (!track.thumb || face.score > track.thumb.score)) {
        track.thumb = { frame: frame.frame, time: frame.time, box: face.box, score: face.score };
      }
    }
  }
  const times = new Map((report.frames || []).map((f) => [f.frame, f.time]));
  const listed = new Map((Array.isArray(report.tracks) ? report.tracks : []).map((t) => [t.track, t]));
  const ids = [...new Set([...seen.keys(), ...listed.keys()])].sort((a, b) => a - b);
  state.tracks = ids.map((id) => {
    const found = seen.get(id) || { track: id, first: 0, last: 0, frames: 0, thumb: null };
    const entry = listed.get(id) || { track: id, first_frame: found.first, last_frame: found.last, frames: found.frames };
    const thumb = entry.thumbnail
      ? { ...entry.thumbnail, time: times.get(entry.thumbnail.frame) ?? entry.thumbnail.frame / fpsOf(report) }
      : found.thumb;
    return {
      track: id, first: entry.first_frame ?? found.first, last: entry.last_frame ?? found.last,
      frames: entry.frames ?? found.frames, thumb, entry, summary: entry.age || entry.gender ? entry : null,
      review: entry.dropped ? "removed" : entry.exempt ? "exempt" : "mask",
    };
  });
}

function showTracks() {
  const list = $("tracks");
  list.replaceChildren();
  $("tracks").hidden = $("tracks-title").hidden = false;
  $("faces").replaceChildren();
  $("faces-title").hidden = true;
  for (const track of state.tracks) {
    const item = document.createElement("li");
    item.className = `track ${track.review}`;
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = 72;
    canvas.className = "thumb";
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `Track ${track.track} at frame ${track.thumb ? track.thumb.frame : track.first}`);
    track.canvas = canvas;
    const text = document.createElement("div");
    const title = document.createElement("strong");
    title.textContent = `Track ${track.track}` + (track.review === "removed" ? " \u2014 dropped"
      : track.review === "exempt" ? " \u2014 exempt, not masked" : "");
    const range = document.createElement("p");
    range.textContent = `frames ${track.first}\u2013${track.last} (${track.frames} covered)`
      + (track.summary ? `; ${plain({ age: (track.summary.age || {}).bucket, gender: (track.summary.gender || {}).value })}` : "");
    text.append(title, range);
    item.append(canvas, text);
    if (state.operation === "anonymize") item.append(trackControls(track));
    list.append(item);
  }
  for (const added of state.added) {
    const item = document.createElement("li");
    item.className = "track added";
    const [x, y, w, h] = added.box.map((v) => Math.round(v));
    item.textContent = `Added box on frame ${added.frame}: ${w}\u00d7${h} at ${x}, ${y}`;
    list.append(item);
  }
  drawThumbnails();
}

function trackControls(track) {
  const controls = document.createElement("div");
  controls.className = "face-controls";
  const exempt = document.createElement("button");
  exempt.type = "button";
  exempt.textContent = track.review === "exempt" ? `Mask track ${track.track}` : `Exempt track ${track.track}`;
  exempt.setAttribute("aria-pressed", track.review === "exempt" ? "true" : "false");
  exempt.addEventListener("click", () => {
    track.review = track.review === "exempt" ? "mask" : "exempt";
    showTracks();
    drawBoxes();
    say(`Track ${track.track} ${track.review === "exempt" ? "exempt" : "masked again"}. Press \u201cRender again\u201d to apply.`);
  });
  const drop = document.createElement("button");
  drop.type = "button";
  drop.textContent = track.review === "removed" ? `Restore track ${track.track}` : `Not a face: drop track ${track.track}`;
  drop.addEventListener("click", () => {
    track.review = track.review === "removed" ? "mask" : "removed";
    showTracks();
    drawBoxes();
    say(`Track ${track.track} ${track.review === "removed" ? "dropped" : "restored"}. Press \u201cRender again\u201d to apply.`);
  });
  controls.append(exempt, drop);
  return controls;
}

let thumbnailRun = 0;

async function drawThumbnails() {
  // One hidden video element seeks to each track's best detected face and draws it.
  const run = ++thumbnailRun;
  const video = document.createElement("video");
  video.muted = true;
  video.preload = "auto";
  video.src = state.originalUrl;
  try {
    await settle(video, "loadeddata");
    for (const track of state.tracks) {
      if (run !== thumbnailRun || !track.thumb) continue;
      video.currentTime = Math.max(0, track.thumb.time ?? 0) + 0.001;
      await settle(video, "seeked");
      const [x, y, w, h] = track.thumb.box;
      const side = Math.max(w, h) * 1.3;
      const ctx = track.canvas.getContext("2d");
      ctx.drawImage(video, x + w / 2 - side / 2, y + h / 2 - side / 2, side, side, 0, 0, 72, 72);
    }
  } catch (_) {
    // a format this browser cannot decode: the tracks are listed without pictures
  } finally {
    video.removeAttribute("src");
    video.load();
  }
}

function settle(element, eventName) {
  return new Promise((resolveEvent, rejectEvent) => {
    const timer = setTimeout(() => rejectEvent(new Error(`${eventName} timed out`)), SEEK_TIMEOUT_MS);
    element.addEventListener(eventName, () => { clearTimeout(timer); resolveEvent(); }, { once: true });
    element.addEventListener("error", () => { clearTimeout(timer); rejectEvent(new Error("cannot decode")); }, { once: true });
  });
}

function editedVideoReport() {
  // faceflow.review's format: the frames as written; per track "dropped": true (not a face)
  // or "exempt": true (left unmasked); each box drawn by hand under `manual` with its frame,
  // followed from there by the renderer.
  const summary = state.report.summary || {};
  const tracks = state.tracks.map((t) => {
    const entry = { ...t.entry };
    delete entry.dropped;
    delete entry.exempt;
    if (t.review === "removed") entry.dropped = true;
    if (t.review === "exempt") entry.exempt = true;
    return entry;
  });
  return {
    ...state.report,
    width: state.report.width ?? summary.width ?? state.size[0],
    height: state.report.height ?? summary.height ?? state.size[1],
    tracks,
    manual: state.added.map((a) => ({ frame: a.frame, box: a.box })),
  };
}

async function rerenderVideo() {
  const report = editedVideoReport();
  const link = $("download-report");
  link.href = URL.createObjectURL(new Blob([JSON.stringify(report, null, 2)], { type: "application/json" }));
  link.download = `${stem(state.file.name)}-reviewed.json`;
  link.hidden = false;
  if (!state.capabilities.jobReport) {
    throw new Error("This server cannot render a video from an edited report yet. The edited JSON is ready to "
      + "download: `faceflow anonymize VIDEO --from-report edited.json -o out.mp4` renders it.");
  }
  say("Uploading the video for rendering\u2026");
  const file = state.file;
  const job = await callJson("POST", "v1/jobs", {
    filename: uploadName(file.name), size: file.size, operation: "anonymize", report,
  });
  await upload(job.upload, file);
  if (job.upload.complete_url) await callJson("POST", job.upload.complete_url);
  await poll(job.job_id);
  const links = await callJson("GET", `v1/jobs/${job.job_id}/result`);
  showProgress(1, "done");
  showResultVideo(links.video_url);
  say("Done: rendered from the reviewed tracks.");
}

// -- wiring -----------------------------------------------------------------------------------

function wire() {
  $("job").addEventListener("submit", run);
  $("file").addEventListener("change", () => choose($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
  });
  const operationChanged = () => {
    const operation = document.querySelector("input[name=operation]:checked").value;
    $("anonymize-options").hidden = operation !== "anonymize";
    $("swap-options").hidden = operation !== "swap";
  };
  for (const radio of document.querySelectorAll("input[name=operation]")) radio.addEventListener("change", operationChanged);
  operationChanged();
  $("token").addEventListener("change", () => {
    state.capabilities = null;
    capabilities().catch(() => { state.capabilities = null; });
  });
  $("add-box").addEventListener("click", () => setDrawing(!state.drawing));
  $("box-add").addEventListener("click", addBoxByNumbers);
  $("rerender").addEventListener("click", rerender);
  $("original-boxes").addEventListener("pointerdown", startDrag);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.drawing) setDrawing(false); });
  // What this server takes; with JWT auth the document needs the token: asked again on Run.
  capabilities().catch(() => { state.capabilities = null; });
}

wire();
