// Squeeze web client: plain ES module, no build step, no dependencies.
//
// Talks to /v1 with the signed-in key (sessionStorage only). Job forms are generated from the
// API's own OpenAPI document (/openapi.json): the stage variants are the oneOf of
// JobSpec.stages.items, and each variant's properties give the fields, defaults, limits and
// descriptions. The API stays the authority on validation: its messages are shown next to the
// field that error.param names (e.g. "stages.0.sparsity").

const API = "/v1";
const KEY_STORAGE = "squeeze.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  key: globalThis.sessionStorage?.getItem(KEY_STORAGE) ?? null,
  schema: null,          // the OpenAPI document
  models: [],            // every model of the tenant (for selects and names)
  datasets: [],
  stages: [],            // the job form's stages: {uid, li, select, fieldsBox, widgets, tag}
  sections: {},          // calibration / evaluation / output: {widgets, enabled()}
  formExtras: {},        // spec keys the form has no inputs for (webhook), kept from pasted JSON
  stream: null,          // AbortController of the job view's event stream
  jobsTimer: null,
  afterSignIn: null,     // the address to return to after signing in again
};

// ------------------------------------------------------------------------------------------
// Small DOM helpers

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

/** h("button", {class: "x", onclick: fn}, "text", child) */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) el.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Text with ``code`` spans (the schema's descriptions are reStructuredText-ish). */
function richText(text) {
  const parts = String(text || "").replace(/::(\s)/g, ":$1").replace(/::$/, ":").split(/``([^`]+)``/);
  return parts.map((part, i) => (i % 2 ? h("code", {}, part) : part));
}

function announce(message) {
  const region = $("#announcer");
  region.textContent = "";
  requestAnimationFrame(() => { region.textContent = message; });
}

function flash(message, kind = "error") {
  const box = $("#flash");
  box.className = `flash ${kind}`;
  $(".flash-text", box).textContent = message;
  box.hidden = false;
}

function clearFlash() {
  $("#flash").hidden = true;
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
});

// ------------------------------------------------------------------------------------------
// Formatting

export function fmtBytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n);
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return unit === 0 ? `${value} B` : `${value.toPrecision(3)} ${units[unit]}`;
}

function fmtCount(n) {
  if (n === null || n === undefined) return "–";
  const steps = [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "k"]];
  for (const [size, suffix] of steps) if (Math.abs(n) >= size) return `${(n / size).toPrecision(3)} ${suffix}`;
  return String(n);
}

function fmtNumber(n, digits = 4) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  if (!Number.isFinite(n)) return String(n);
  if (Number.isInteger(n) && Math.abs(n) < 1e6) return String(n);
  return Number(n).toPrecision(digits).replace(/\.?0+$/, (m) => (m.includes(".") ? "" : m));
}

function fmtPercent(x, digits = 1) {
  return x === null || x === undefined ? "–" : `${(x * 100).toFixed(digits)}%`;
}

function fmtDate(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

function stagesSummary(spec) {
  return (spec?.stages || []).map((s) => `${s.type}.${s.method}`).join(" → ") || "–";
}

function shortId(id) {
  return id && id.length > 16 ? `${id.slice(0, 12)}…` : id;
}

function modelName(id) {
  const model = state.models.find((m) => m.id === id);
  return model ? model.name : id;
}

// ------------------------------------------------------------------------------------------
// The API

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.type = error?.type || "http_error";
    this.param = error?.param ?? null;
    this.errors = Array.isArray(error?.errors) ? error.errors : null;
  }
}

function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${state.key}`, ...extra };
}

async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  return new ApiError(response.status, body?.error || { message: `HTTP ${response.status} ${response.statusText}` });
}

async function api(path, { method = "GET", json, signal } = {}) {
  const headers = authHeaders();
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(API + path, { method, headers, body, signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { type: "network_error", message: `Could not reach the API (${err.message})` });
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401) keyRefused();
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

/** All pages of a list (newest first), at most `max` items. */
async function listAll(path, max = 1000) {
  const items = [];
  let after = null;
  const sep = path.includes("?") ? "&" : "?";
  for (;;) {
    const page = await api(`${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    items.push(...page.data);
    if (!page.has_more || !page.data.length || items.length >= max) return items;
    after = page.data[page.data.length - 1].id;
  }
}

/** POST multipart with upload progress (fetch cannot report it; XMLHttpRequest can). */
function uploadWithProgress(path, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", API + path);
    xhr.setRequestHeader("Authorization", `Bearer ${state.key}`);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total, e.loaded, e.total);
    });
    xhr.upload.addEventListener("load", () => onProgress(1, null, null, true));
    xhr.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else {
        if (xhr.status === 401) keyRefused();
        reject(new ApiError(xhr.status, body?.error || { message: `HTTP ${xhr.status} ${xhr.statusText}` }));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, { type: "network_error", message: "The upload failed: network error" })));
    xhr.addEventListener("abort", () => reject(new ApiError(0, { type: "aborted", message: "The upload was cancelled" })));
    xhr.send(formData);
  });
}

// ------------------------------------------------------------------------------------------
// Signing in

function keyRefused() {
  if (!state.key) return;
  state.key = null;
  sessionStorage.removeItem(KEY_STORAGE);
  state.afterSignIn = location.hash;
  stopStream();
  showSignIn("The API refused this key (revoked, or mistyped). Sign in again.");
}

function showSignIn(message = "") {
  $("#nav").hidden = true;
  $("#session").hidden = true;
  showView("signin");
  $("#signin-error").textContent = message;
}

async function signIn(event) {
  event.preventDefault();
  const input = $("#api-key");
  const key = input.value.trim();
  const error = $("#signin-error");
  error.textContent = "";
  if (!key) {
    error.textContent = "Enter an API key.";
    input.setAttribute("aria-invalid", "true");
    input.focus();
    return;
  }
  const button = $("button[type=submit]", event.target);
  button.disabled = true;
  try {
    const response = await fetch(`${API}/models?limit=1`, { headers: { Authorization: `Bearer ${key}` } });
    if (!response.ok) throw await errorFrom(response);
    state.key = key;
    sessionStorage.setItem(KEY_STORAGE, key);
    input.value = "";
    input.removeAttribute("aria-invalid");
    onSignedIn();
    announce("Signed in");
    const target = state.afterSignIn && state.afterSignIn !== "#/signin" ? state.afterSignIn : "#/models";
    state.afterSignIn = null;
    if (location.hash === target) route(); else location.hash = target;
  } catch (err) {
    error.textContent = err.status === 401 ? "This key was refused." : err.message;
    input.setAttribute("aria-invalid", "true");
    input.focus();
  } finally {
    button.disabled = false;
  }
}

function onSignedIn() {
  $("#nav").hidden = false;
  $("#session").hidden = false;
  $("#session-key").textContent = `Signed in with ${state.key.slice(0, 8)}…`;
}

function signOut() {
  stopStream();
  state.key = null;
  sessionStorage.removeItem(KEY_STORAGE);
  state.models = [];
  state.datasets = [];
  clearFlash();
  showSignIn("Signed out.");
  history.replaceState(null, "", "#/signin");
  $("#api-key").focus();
}

// ------------------------------------------------------------------------------------------
// Views and routing

const TITLES = { signin: "Sign in", models: "Models & data", new: "New job", jobs: "Jobs", job: "Job", notfound: "Not found" };

function showView(name, { focus = true } = {}) {
  for (const view of $$(".view")) view.hidden = view.id !== `view-${name}`;
  for (const link of $$("#nav a")) {
    if (link.dataset.nav === name || (name === "job" && link.dataset.nav === "jobs")) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${TITLES[name] || name} · Squeeze`;
  // After a navigation, focus goes to the new view's heading (screen readers read it); on the
  // first load it stays at the top of the page, where the skip link is.
  if (focus && !firstShow) $(`#view-${name} h2`)?.focus({ preventScroll: false });
  firstShow = false;
}

let firstShow = true;

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query) };
}

async function route() {
  clearTimeout(state.jobsTimer);
  if (!state.key) {
    if (location.hash && location.hash !== "#/signin") state.afterSignIn = location.hash;
    showSignIn();
    return;
  }
  onSignedIn();
  const { parts, params } = parseHash();
  const [section, id] = parts;
  if (!(section === "jobs" && id)) stopStream();
  try {
    if (!section || section === "models" || section === "signin") {
      if (section !== "models") history.replaceState(null, "", "#/models");
      showView("models");
      await Promise.all([renderModels(), renderDatasets()]);
    } else if (section === "new") {
      showView("new");
      await openJobForm(params.get("model"));
    } else if (section === "jobs" && id) {
      showView("job");
      await openJob(id);
    } else if (section === "jobs") {
      showView("jobs");
      await renderJobs();
    } else {
      showView("notfound");
    }
  } catch (err) {
    if (err.name === "AbortError" || err.status === 401) return;
    flash(err.message);
  }
}

// ------------------------------------------------------------------------------------------
// Models and datasets

async function refreshModels() {
  state.models = await listAll("/models", 500);
  return state.models;
}

async function refreshDatasets() {
  state.datasets = await listAll("/datasets", 500);
  return state.datasets;
}

function pagedTable(tableId, path, rowFor) {
  const table = $(tableId);
  const card = table.closest(".card");
  const body = $("tbody", table);
  const more = $(".more", card);
  const empty = $(".empty", card);
  let after = null;
  async function load(reset) {
    const cursor = reset ? null : after;
    const page = await api(`${path}?limit=20${cursor ? `&after=${encodeURIComponent(cursor)}` : ""}`);
    // Rows are replaced only once the page is here: two quick reloads never duplicate rows.
    if (reset) body.replaceChildren(...page.data.map(rowFor));
    else body.append(...page.data.map(rowFor));
    after = page.data.length ? page.data[page.data.length - 1].id : cursor;
    more.hidden = !page.has_more;
    empty.hidden = body.children.length > 0;
    return page.data;
  }
  more.onclick = () => load(false).catch((err) => flash(err.message));
  return load;
}

let loadModelsTable;
let loadDatasetsTable;

async function renderModels() {
  loadModelsTable ||= pagedTable("#models-table", "/models", (m) => h("tr", { "data-model-id": m.id },
    h("th", { scope: "row" }, m.name, h("br"), h("code", { class: "muted small", title: m.id }, m.id)),
    h("td", {}, m.architecture, h("br"), h("span", { class: "muted small" }, m.model_type)),
    h("td", { class: "num", title: String(m.num_parameters) }, fmtCount(m.num_parameters)),
    h("td", { class: "num", title: `${m.size_bytes} bytes` }, fmtBytes(m.size_bytes)),
    h("td", {}, m.dtype),
    h("td", {}, fmtDate(m.created_at)),
    h("td", {}, h("div", { class: "row-actions" },
      h("a", { href: `#/new?model=${encodeURIComponent(m.id)}`, class: "button-link", "aria-label": `Compress ${m.name}…` }, "Compress…"),
      h("button", { type: "button", class: "secondary", "aria-label": `Delete model ${m.name}`, onclick: () => deleteModel(m) }, "Delete"))),
  ));
  await loadModelsTable(true);
}

async function renderDatasets() {
  loadDatasetsTable ||= pagedTable("#datasets-table", "/datasets", (d) => h("tr", { "data-dataset-id": d.id },
    h("th", { scope: "row" }, d.name),
    h("td", {}, d.format),
    h("td", { class: "num" }, String(d.num_records)),
    h("td", { class: "num", title: `${d.size_bytes} bytes` }, fmtBytes(d.size_bytes)),
    h("td", {}, fmtDate(d.created_at)),
    h("td", {}, h("code", { class: "small" }, d.id)),
  ));
  await loadDatasetsTable(true);
}

async function deleteModel(model) {
  if (!confirm(`Delete model ${model.name} (${model.id})?`)) return;
  try {
    await api(`/models/${encodeURIComponent(model.id)}`, { method: "DELETE" });
    announce(`Model ${model.name} deleted`);
    await renderModels();
  } catch (err) {
    flash(err.message);
  }
}

function bindUpload(formId, { path, fileField, inputs, after, noun }) {
  const form = $(formId);
  const progressBox = $(".upload-progress", form);
  const bar = $("progress", form);
  const text = $(".progress-text", form);
  const error = $(".error", form);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const files = inputs.flatMap((selector) => [...$(selector, form).files]);
    if (!files.length) {
      error.textContent = `Choose a file to upload.`;
      $(inputs[0], form).focus();
      return;
    }
    const data = new FormData();
    // Files picked as a folder carry their relative path; the API wants the plain names.
    for (const file of files) data.append(fileField, file, file.name);
    const name = $("input[name=name]", form).value.trim();
    if (name) data.append("name", name);
    const total = files.reduce((sum, f) => sum + f.size, 0);
    const button = $("button[type=submit]", form);
    button.disabled = true;
    progressBox.hidden = false;
    bar.value = 0;
    text.textContent = `0% of ${fmtBytes(total)}`;
    let lastAnnounced = -1;
    try {
      const created = await uploadWithProgress(path, data, (fraction, loaded, _total, done) => {
        bar.value = fraction;
        if (done) text.textContent = "Uploaded; the server is checking it…";
        else {
          text.textContent = `${Math.floor(fraction * 100)}% of ${fmtBytes(total)}`;
          const decile = Math.floor(fraction * 10);
          if (decile !== lastAnnounced) { lastAnnounced = decile; bar.setAttribute("aria-valuetext", text.textContent); }
        }
      });
      bar.value = 1;
      text.textContent = `Done: ${created.name} (${created.id})`;
      announce(`${noun} ${created.name} uploaded`);
      form.reset();
      await after(created);
    } catch (err) {
      text.textContent = "Upload failed";
      error.textContent = err.param ? `${err.param}: ${err.message.replace(`${err.param}: `, "")}` : err.message;
    } finally {
      button.disabled = false;
    }
  });
}

// ------------------------------------------------------------------------------------------
// The OpenAPI schema → forms

async function loadSchema() {
  if (state.schema) return state.schema;
  const response = await fetch("/openapi.json");
  if (!response.ok) throw new Error(`Could not read /openapi.json (HTTP ${response.status})`);
  state.schema = await response.json();
  return state.schema;
}

function resolve(node) {
  let current = node;
  for (let i = 0; current && current.$ref && i < 10; i += 1) {
    const path = current.$ref.replace(/^#\//, "").split("/");
    let target = state.schema;
    for (const key of path) target = target?.[key];
    const { $ref, ...rest } = current;
    current = { ...target, ...rest };
  }
  return current;
}

function jobSpecSchema() {
  const spec = state.schema?.components?.schemas?.JobSpec;
  if (!spec) throw new Error("The OpenAPI document has no JobSpec schema");
  return spec;
}

/** The stage variants: [{tag, type, method, schema, title, description}] in schema order. */
function stageVariants() {
  if (state.variants) return state.variants;
  const items = resolve(jobSpecSchema().properties.stages.items);
  const list = items.oneOf || items.anyOf || [items];
  const constOf = (prop) => {
    const p = resolve(prop || {});
    return p.const ?? (p.enum && p.enum.length === 1 ? p.enum[0] : p.default);
  };
  state.variants = list.map((ref) => {
    const schema = resolve(ref);
    const type = constOf(schema.properties?.type);
    const method = constOf(schema.properties?.method);
    return { tag: `${type}.${method}`, type, method, schema, title: schema.title, description: schema.description || "" };
  }).filter((v) => v.type && v.method);
  return state.variants;
}

/** The schema of an optional section of JobSpec (calibration, evaluation, output). */
function sectionSchema(name) {
  const prop = jobSpecSchema().properties[name];
  if (!prop) return null;
  const options = (prop.anyOf || prop.oneOf || [prop]).map(resolve).filter((s) => s.type !== "null");
  return options[0] || null;
}

/** What kind of input a property needs: {kind, base, nullable, options}. */
function analyze(prop) {
  const p = resolve(prop);
  let nullable = false;
  let base = p;
  const variants = p.anyOf || p.oneOf;
  if (variants) {
    const resolved = variants.map(resolve);
    const nonNull = resolved.filter((v) => v.type !== "null");
    nullable = nonNull.length < resolved.length;
    if (nonNull.length === 1) base = nonNull[0];
    else return { kind: "mixed", base: { anyOf: nonNull }, nullable, variants: nonNull, prop: p };
  }
  let kind = "json";
  if (base.const !== undefined) kind = "const";
  else if (Array.isArray(base.enum)) kind = "enum";
  else if (base.type === "boolean") kind = "bool";
  else if (base.type === "integer" || base.type === "number") kind = "number";
  else if (base.type === "string") kind = "string";
  else if (base.type === "array") {
    const items = resolve(base.items || {});
    if (Array.isArray(items.enum)) kind = "multi";
    else if (["integer", "number", "string"].includes(items.type)) kind = "list";
  }
  return { kind, base, nullable, prop: p };
}

function limitsText(info) {
  const b = info.base;
  const parts = [];
  if (info.kind === "number") {
    const lower = b.exclusiveMinimum !== undefined ? `${b.exclusiveMinimum} <` : b.minimum !== undefined ? `${b.minimum} ≤` : "";
    const upper = b.exclusiveMaximum !== undefined ? `< ${b.exclusiveMaximum}` : b.maximum !== undefined ? `≤ ${b.maximum}` : "";
    if (lower || upper) parts.push(`${lower} value ${upper}`.trim().replace(/\s+/g, " "));
    if (b.type === "integer") parts.push("whole number");
  }
  if (info.kind === "string") {
    if (b.minLength !== undefined && b.maxLength !== undefined) parts.push(`${b.minLength}–${b.maxLength} characters`);
    else if (b.maxLength !== undefined) parts.push(`at most ${b.maxLength} characters`);
    if (b.pattern && !info.prop.description) parts.push(`format ${b.pattern}`);
  }
  if (info.kind === "multi" && b.minItems) parts.push(`at least ${b.minItems}`);
  if (info.kind === "list") parts.push("comma-separated");
  if (info.kind === "mixed") {
    const words = info.variants.flatMap((v) => (v.enum ? v.enum.map(String) : v.type === "array" ? ["a comma-separated list of numbers"] : [v.type]));
    parts.push(`one of: ${words.join(", ")}`);
  }
  if (info.nullable) parts.push("empty = null");
  return parts.join("; ");
}

function defaultText(prop, info) {
  if (!("default" in prop)) return info.kind === "multi" ? "none checked: the API's default" : "";
  const value = prop.default;
  if (value === null) return info.nullable ? "" : "default: null";
  return `default: ${Array.isArray(value) ? value.join(", ") : typeof value === "object" ? JSON.stringify(value) : String(value)}`;
}

function humanize(name) {
  return name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
}

/** Selects of the tenant's datasets or models, for *_id fields. */
function referenceSelect(id, kind, nullable) {
  const select = h("select", { id });
  const items = kind === "dataset" ? state.datasets : state.models;
  if (nullable) select.append(h("option", { value: "" }, "(none)"));
  else if (!items.length) select.append(h("option", { value: "" }, kind === "dataset" ? "(no datasets: upload one first)" : "(no models: upload one first)"));
  for (const item of items) {
    const label = kind === "dataset" ? `${item.name} — ${item.format}, ${fmtBytes(item.size_bytes)}` : `${item.name} — ${item.architecture}, ${fmtCount(item.num_parameters)} params`;
    select.append(h("option", { value: item.id }, `${label} (${item.id})`));
  }
  return select;
}

function ensureOption(select, value) {
  if (value === null || value === undefined || value === "") return;
  if (![...select.options].some((o) => o.value === String(value))) select.append(h("option", { value: String(value) }, String(value)));
}

/**
 * One input for one schema property. Returns {name, wrap, read(), write(v), setParam(p)}:
 * read() gives {set: false} (leave it out: the API's default applies), {set: true, value}
 * or {error}.
 */
function makeWidget(name, rawProp, { uid, required }) {
  const prop = resolve(rawProp);
  const info = analyze(prop);
  const id = `${uid}-${name}`;
  const helpId = `${id}-help`;
  const errId = `${id}-err`;
  const title = prop.title || humanize(name);
  const wrap = h("div", { class: `field kind-${info.kind}`, "data-field": name });
  const label = h("label", { for: id }, title, required ? h("span", { class: "required" }, " (required)") : null);
  const refKind = /(^|_)dataset_id$/.test(name) ? "dataset" : /(^|_)model_id$/.test(name) ? "model" : null;
  const limits = refKind && info.kind === "string" ? "" : limitsText(info);
  const helpParts = [prop.description ? richText(prop.description) : null, limits, defaultText(prop, info)]
    .filter((p) => p && (!Array.isArray(p) || p.length));
  const help = h("p", { class: "help", id: helpId });
  helpParts.forEach((part, i) => { if (i) help.append(" · "); help.append(...[part].flat()); });
  const describedBy = `${helpId} ${errId}`;
  const hasDefault = "default" in prop && prop.default !== null;
  const def = prop.default;
  let input;
  let read;
  let write;

  if (refKind && (info.kind === "string")) {
    input = referenceSelect(id, refKind, info.nullable || !required);
    read = () => (input.value ? { set: true, value: input.value } : { set: false });
    write = (v) => { ensureOption(input, v); input.value = v ?? ""; };
  } else if (info.kind === "enum") {
    input = h("select", { id });
    if (info.nullable || (!hasDefault && !required)) input.append(h("option", { value: "" }, info.nullable ? "null" : "(not set)"));
    for (const option of info.base.enum) input.append(h("option", { value: String(option) }, String(option)));
    read = () => {
      if (input.value === "") return info.nullable && hasDefault ? { set: true, value: null } : { set: false };
      return { set: true, value: info.base.enum.find((o) => String(o) === input.value) };
    };
    write = (v) => { input.value = v === null || v === undefined ? "" : String(v); };
  } else if (info.kind === "bool") {
    input = h("input", { id, type: "checkbox" });
    read = () => ({ set: true, value: input.checked });
    write = (v) => { input.checked = Boolean(v); };
    wrap.classList.add("checkbox");
  } else if (info.kind === "number") {
    const b = info.base;
    input = h("input", { id, type: "number", inputmode: b.type === "integer" ? "numeric" : "decimal", step: b.type === "integer" ? "1" : "any" });
    if (b.minimum !== undefined) input.min = String(b.minimum);
    if (b.maximum !== undefined) input.max = String(b.maximum);
    if (!hasDefault) input.placeholder = required ? "required" : info.nullable ? "null" : "";
    read = () => {
      if (input.validity.badInput) return { error: "Enter a number." };
      const raw = input.value.trim();
      if (raw === "") return { set: false };
      return { set: true, value: Number(raw) };
    };
    write = (v) => { input.value = v === null || v === undefined ? "" : String(v); };
  } else if (info.kind === "string") {
    const b = info.base;
    input = h("input", { id, type: "text", spellcheck: "false", autocomplete: "off" });
    if (b.pattern) input.setAttribute("pattern", b.pattern.replace(/^\^|\$$/g, ""));
    if (b.maxLength !== undefined) input.setAttribute("maxlength", String(b.maxLength));
    read = () => (input.value === "" ? { set: false } : { set: true, value: input.value });
    write = (v) => { input.value = v ?? ""; };
  } else if (info.kind === "multi") {
    const items = resolve(info.base.items);
    input = h("fieldset", { id, class: "checks", "aria-describedby": describedBy }, h("legend", {}, title));
    for (const option of items.enum) {
      const boxId = `${id}-${option}`;
      input.append(h("span", { class: "check" }, h("input", { id: boxId, type: "checkbox", value: String(option) }), h("label", { for: boxId }, String(option))));
    }
    read = () => {
      const value = $$("input:checked", input).map((box) => items.enum.find((o) => String(o) === box.value));
      return value.length || required ? { set: true, value } : { set: false };
    };
    write = (v) => { for (const box of $$("input", input)) box.checked = Array.isArray(v) && v.map(String).includes(box.value); };
  } else if (info.kind === "list") {
    const itemType = resolve(info.base.items).type;
    input = h("input", { id, type: "text", spellcheck: "false" });
    read = () => {
      const raw = input.value.trim();
      if (raw === "") return { set: false };
      const parts = raw.split(/[,\s]+/).filter(Boolean);
      if (itemType === "string") return { set: true, value: parts };
      const numbers = parts.map(Number);
      return numbers.some(Number.isNaN) ? { error: "Enter numbers separated by commas." } : { set: true, value: numbers };
    };
    write = (v) => { input.value = Array.isArray(v) ? v.join(", ") : v ?? ""; };
  } else if (info.kind === "mixed") {
    input = h("input", { id, type: "text", spellcheck: "false" });
    read = () => {
      const raw = input.value.trim();
      if (raw === "") return { set: false };
      for (const variant of info.variants) {
        if (variant.enum && variant.enum.map(String).includes(raw)) return { set: true, value: variant.enum.find((o) => String(o) === raw) };
      }
      if (/^-?\d+(\s*,\s*-?\d+)*$/.test(raw) && info.variants.some((v) => v.type === "array")) {
        return { set: true, value: raw.split(",").map((s) => Number(s.trim())) };
      }
      try { return { set: true, value: JSON.parse(raw) }; } catch { return { set: true, value: raw }; }
    };
    write = (v) => { input.value = Array.isArray(v) ? v.join(", ") : v ?? ""; };
  } else if (info.kind === "const") {
    return null;
  } else {
    input = h("textarea", { id, rows: 2, class: "code", spellcheck: "false" });
    input.placeholder = "JSON";
    read = () => {
      const raw = input.value.trim();
      if (raw === "") return { set: false };
      try { return { set: true, value: JSON.parse(raw) }; } catch { return { error: "Enter valid JSON." }; }
    };
    write = (v) => { input.value = v === undefined ? "" : JSON.stringify(v); };
  }

  if (info.kind !== "multi") input.setAttribute("aria-describedby", describedBy);
  if (required && input.tagName !== "FIELDSET") input.setAttribute("aria-required", "true");
  const error = h("p", { class: "field-error", id: errId, role: "alert" });
  if (info.kind === "bool") wrap.append(input, label, help, error);
  else if (info.kind === "multi") wrap.append(input, help, error);
  else wrap.append(label, input, help, error);
  if (hasDefault) write(def);
  return {
    name, wrap, read, write, info, prop,
    isDefault() {
      const current = read();
      if (!current.set) return true;
      return hasDefault && JSON.stringify(current.value) === JSON.stringify(def);
    },
    setParam(param) { wrap.dataset.params = param; },
  };
}

function renderFields(container, schema, uid, paramPrefix, skip = new Set()) {
  const widgets = new Map();
  const required = new Set(schema.required || []);
  container.replaceChildren();
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    if (skip.has(name)) continue;
    const widget = makeWidget(name, prop, { uid, required: required.has(name) });
    if (!widget) continue;
    widget.setParam(`${paramPrefix}.${name}`);
    widgets.set(name, widget);
    container.append(widget.wrap);
  }
  if (!widgets.size) container.append(h("p", { class: "muted" }, "This method has no settings."));
  return widgets;
}

function readWidgets(widgets, prefix, errors) {
  const out = {};
  for (const [name, widget] of widgets) {
    const value = widget.read();
    if (value.error) errors.push({ param: `${prefix}.${name}`, message: value.error });
    else if (value.set) out[name] = value.value;
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// The job form

let stageSeq = 0;
let jobFormReady = false;

async function openJobForm(preselectModel) {
  await loadSchema();
  await Promise.all([refreshModels(), refreshDatasets()]);
  if (!jobFormReady) {
    buildJobForm();
    jobFormReady = true;
  } else {
    refreshReferenceSelects();
  }
  if (preselectModel) $("#job-model").value = preselectModel;
}

function fillModelSelect() {
  const select = $("#job-model");
  const current = select.value;
  select.replaceChildren();
  if (!state.models.length) select.append(h("option", { value: "" }, "(no models: upload one first)"));
  for (const m of state.models) select.append(h("option", { value: m.id }, `${m.name} — ${m.architecture}, ${fmtCount(m.num_parameters)} params, ${fmtBytes(m.size_bytes)} (${m.id})`));
  if (current && state.models.some((m) => m.id === current)) select.value = current;
}

/** Dataset and model selects made earlier: refill them, keeping the choice. */
function refreshReferenceSelects() {
  fillModelSelect();
  for (const select of $$("#job-form .field select")) {
    const field = select.closest(".field")?.dataset.field || "";
    const kind = /(^|_)dataset_id$/.test(field) ? "dataset" : /(^|_)model_id$/.test(field) ? "model" : null;
    if (!kind || select.id === "job-model") continue;
    const value = select.value;
    const nullable = select.options[0]?.value === "" && select.options[0]?.textContent === "(none)";
    const fresh = referenceSelect(select.id, kind, nullable);
    select.replaceChildren(...fresh.children);
    if (value) { ensureOption(select, value); select.value = value; }
  }
}

function buildJobForm() {
  fillModelSelect();
  $("#stage-list").replaceChildren();
  state.stages = [];
  const variants = stageVariants();
  const first = variants.find((v) => v.tag === "prune.magnitude") || variants[0];
  addStage(first.tag);

  for (const name of ["calibration", "evaluation", "output"]) {
    const schema = sectionSchema(name);
    const box = $(`#${name}-fields`);
    const fieldset = $(`#${name}-section`);
    if (!schema) { fieldset.hidden = true; continue; }
    fieldset.dataset.params = name;
    $(`#${name}-help`).replaceChildren(...richText(schema.description || ""));
    const widgets = renderFields(box, schema, `sec-${name}`, name);
    const toggle = $(`#use-${name}`);
    const sync = () => {
      if (!toggle) return;
      box.hidden = !toggle.checked;
      for (const el of $$("input, select, textarea", box)) el.disabled = !toggle.checked;
    };
    toggle?.addEventListener("change", sync);
    sync();
    state.sections[name] = { widgets, enabled: () => (toggle ? toggle.checked : true) };
  }
}

function variantFor(tag) {
  return stageVariants().find((v) => v.tag === tag);
}

function addStage(tag, values = null) {
  const variants = stageVariants();
  const uid = `st${++stageSeq}`;
  const select = h("select", { id: `${uid}-method`, "aria-describedby": `${uid}-desc ${uid}-err` });
  const groups = new Map();
  for (const v of variants) {
    if (!groups.has(v.type)) groups.set(v.type, h("optgroup", { label: v.type }));
    groups.get(v.type).append(h("option", { value: v.tag }, `${v.type} · ${v.method}`));
  }
  select.append(...groups.values());
  const legend = h("legend", {});
  const desc = h("p", { class: "help stage-desc", id: `${uid}-desc` });
  const note = h("p", { class: "note", hidden: true });
  const fieldsBox = h("div", { class: "fields" });
  const error = h("p", { class: "field-error", id: `${uid}-err`, role: "alert" });
  const methodField = h("div", { class: "field method" }, h("label", { for: select.id }, "Method"), select, desc, note);
  const up = h("button", { type: "button", class: "secondary small" }, "Move up");
  const down = h("button", { type: "button", class: "secondary small" }, "Move down");
  const remove = h("button", { type: "button", class: "secondary small" }, "Remove");
  const li = h("li", { class: "stage" },
    h("fieldset", {}, legend,
      h("div", { class: "stage-tools" }, up, down, remove),
      methodField, fieldsBox),
    error);
  const stage = { uid, li, select, legend, desc, note, fieldsBox, methodField, error, widgets: new Map(), tag, up, down, remove };
  select.addEventListener("change", () => {
    const carried = {};
    for (const [name, widget] of stage.widgets) {
      if (!widget.isDefault()) { const r = widget.read(); if (r.set) carried[name] = r.value; }
    }
    stage.tag = select.value;
    renderStageFields(stage, carried);
    renumberStages();
  });
  up.addEventListener("click", () => moveStage(stage, -1));
  down.addEventListener("click", () => moveStage(stage, +1));
  remove.addEventListener("click", () => removeStage(stage));
  select.value = tag;
  state.stages.push(stage);
  $("#stage-list").append(li);
  renderStageFields(stage, values);
  renumberStages();
  return stage;
}

function renderStageFields(stage, values) {
  const variant = variantFor(stage.tag);
  stage.desc.replaceChildren(...richText(variant.description));
  stage.widgets = renderFields(stage.fieldsBox, variant.schema, stage.uid, "stages.?", new Set(["type", "method"]));
  // Which methods read calibration data is not in the schema; their descriptions say so.
  const needsCalibration = /calibration/i.test(variant.description);
  stage.note.hidden = !needsCalibration;
  stage.note.textContent = needsCalibration ? "This method reads calibration data: the Calibration section below is switched on." : "";
  if (needsCalibration) {
    const toggle = $("#use-calibration");
    if (toggle && !toggle.checked) { toggle.checked = true; toggle.dispatchEvent(new Event("change")); }
  }
  for (const [name, value] of Object.entries(values || {})) stage.widgets.get(name)?.write(value);
}

function renumberStages() {
  state.stages.forEach((stage, index) => {
    stage.legend.textContent = `Stage ${index + 1}`;
    stage.li.dataset.params = `stages.${index}`;
    stage.methodField.dataset.params = `stages.${index}.type stages.${index}.method`;
    for (const [name, widget] of stage.widgets) widget.setParam(`stages.${index}.${name}`);
    stage.up.disabled = index === 0;
    stage.down.disabled = index === state.stages.length - 1;
    stage.remove.disabled = state.stages.length === 1;
    stage.up.setAttribute("aria-label", `Move stage ${index + 1} up`);
    stage.down.setAttribute("aria-label", `Move stage ${index + 1} down`);
    stage.remove.setAttribute("aria-label", `Remove stage ${index + 1}`);
  });
  $("#add-stage").disabled = state.stages.length >= maxStages();
}

function maxStages() {
  return jobSpecSchema().properties.stages.maxItems || 16;
}

function moveStage(stage, delta) {
  const index = state.stages.indexOf(stage);
  const target = index + delta;
  if (target < 0 || target >= state.stages.length) return;
  state.stages.splice(index, 1);
  state.stages.splice(target, 0, stage);
  $("#stage-list").replaceChildren(...state.stages.map((s) => s.li));
  renumberStages();
  const same = delta < 0 ? stage.up : stage.down;
  (same.disabled ? stage.select : same).focus();
  announce(`Stage moved to position ${target + 1}`);
}

function removeStage(stage) {
  const index = state.stages.indexOf(stage);
  if (state.stages.length === 1) return;
  state.stages.splice(index, 1);
  stage.li.remove();
  renumberStages();
  state.stages[Math.min(index, state.stages.length - 1)].select.focus();
  announce(`Stage ${index + 1} removed`);
}

function onAddStage() {
  const variants = stageVariants();
  const last = state.stages[state.stages.length - 1];
  const lastType = last ? variantFor(last.tag).type : null;
  const next = variants.find((v) => v.type !== lastType && v.type !== "distill") || variants[0];
  const stage = addStage(next.tag);
  stage.select.focus();
  announce(`Stage ${state.stages.length} added`);
}

/** The spec the form describes, or {errors} the client can tell without asking the API. */
function specFromForm() {
  const errors = [];
  const spec = { model_id: $("#job-model").value };
  spec.stages = state.stages.map((stage, index) => {
    const variant = variantFor(stage.tag);
    return { type: variant.type, method: variant.method, ...readWidgets(stage.widgets, `stages.${index}`, errors) };
  });
  for (const [name, section] of Object.entries(state.sections)) {
    if (!section.enabled()) continue;
    spec[name] = readWidgets(section.widgets, name, errors);
  }
  const metadata = {};
  const lines = $("#job-metadata").value.split("\n").map((l) => l.trim()).filter(Boolean);
  for (const line of lines) {
    const at = line.indexOf("=");
    if (at < 1) { errors.push({ param: "metadata", message: `"${line}" is not key=value` }); continue; }
    metadata[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  if (lines.length) spec.metadata = metadata;
  Object.assign(spec, state.formExtras);
  return { spec, errors };
}

/** Fill the form from a spec (pasted JSON/YAML); returns the keys it could not show. */
function specToForm(spec) {
  const problems = [];
  if (!spec || typeof spec !== "object" || Array.isArray(spec)) throw new Error("The spec must be an object");
  const select = $("#job-model");
  ensureOption(select, spec.model_id);
  select.value = spec.model_id ?? "";
  const stages = Array.isArray(spec.stages) ? spec.stages : [];
  stages.forEach((stage, index) => {
    const tag = `${stage?.type}.${stage?.method}`;
    if (!variantFor(tag)) problems.push(`stages.${index}: unknown stage ${tag}`);
    const schema = variantFor(tag)?.schema;
    for (const key of Object.keys(stage || {})) {
      if (schema && !(key in (schema.properties || {}))) problems.push(`stages.${index}.${key}: not a field of ${tag}`);
    }
  });
  if (problems.length) return problems;
  $("#stage-list").replaceChildren();
  state.stages = [];
  for (const stage of stages) {
    const { type, method, ...values } = stage;
    addStage(`${type}.${method}`, values);
  }
  if (!state.stages.length) addStage(stageVariants()[0].tag);
  for (const [name, section] of Object.entries(state.sections)) {
    const toggle = $(`#use-${name}`);
    const value = spec[name];
    if (toggle) { toggle.checked = value !== undefined && value !== null; toggle.dispatchEvent(new Event("change")); }
    for (const [field, widget] of section.widgets) {
      if (value && field in value) widget.write(value[field]);
      else if ("default" in widget.prop) widget.write(widget.prop.default);
      else widget.write(null);
    }
    for (const key of Object.keys(value || {})) if (!section.widgets.has(key)) problems.push(`${name}.${key}: not a field`);
  }
  $("#job-metadata").value = Object.entries(spec.metadata || {}).map(([k, v]) => `${k}=${v}`).join("\n");
  const known = new Set(["model_id", "stages", "metadata", ...Object.keys(state.sections)]);
  state.formExtras = {};
  for (const [key, value] of Object.entries(spec)) if (!known.has(key)) state.formExtras[key] = value;
  const extras = Object.keys(state.formExtras);
  const formError = $("#job-form .form-error");
  formError.textContent = extras.length ? `Kept from the pasted spec, not shown in the form: ${extras.join(", ")}.` : "";
  return problems;
}

function clearErrors(form) {
  for (const el of $$(".field-error", form)) el.textContent = "";
  for (const el of $$("[aria-invalid]", form)) el.removeAttribute("aria-invalid");
  for (const el of $$(".has-error", form)) el.classList.remove("has-error");
  $(".form-error", form).textContent = "";
}

/** Where an error about `param` is shown: the element whose data-params names it, or the
 * closest parent path that has one ("stages.0.foo.bar" → "stages.0.foo" → "stages.0"). */
function errorHolder(form, param) {
  const parts = String(param || "").split(".").filter(Boolean);
  for (let n = parts.length; n > 0; n -= 1) {
    const path = parts.slice(0, n).join(".");
    const holder = form.querySelector(`[data-params~="${CSS.escape(path)}"]`);
    if (holder && !holder.hidden && !holder.closest("[hidden]")) return { holder, rest: parts.slice(n).join(".") };
  }
  return null;
}

/** Show the API's (or the client's) errors next to their fields; returns how many were placed. */
function showErrors(form, errors, fallbackMessage) {
  clearErrors(form);
  const unplaced = [];
  let firstFocus = null;
  for (const { param, message } of errors) {
    const found = param ? errorHolder(form, param) : null;
    if (!found) { unplaced.push(param ? `${param}: ${message}` : message); continue; }
    const slot = found.holder.querySelector(":scope > .field-error");
    const text = found.rest ? `${found.rest}: ${message}` : message;
    slot.textContent = slot.textContent ? `${slot.textContent} ${text}` : text;
    found.holder.classList.add("has-error");
    const control = found.holder.matches(".field")
      ? found.holder.querySelector("input, select, textarea") : null;
    if (control) control.setAttribute("aria-invalid", "true");
    firstFocus ||= control || found.holder.querySelector("input, select, textarea, button");
  }
  const summary = $(".form-error", form);
  if (unplaced.length) summary.textContent = unplaced.join(" · ");
  else summary.textContent = fallbackMessage || "The API refused the job: see the marked fields.";
  if (firstFocus) firstFocus.focus();
  else { summary.tabIndex = -1; summary.focus(); }
}

function apiErrors(err) {
  if (err.errors && err.errors.length) return err.errors.map((e) => ({ param: e.param, message: e.message }));
  const message = err.param && err.message.startsWith(`${err.param}: `) ? err.message.slice(err.param.length + 2) : err.message;
  return [{ param: err.param, message }];
}

async function submitSpec(form, spec) {
  const button = $("button[type=submit]", form);
  button.disabled = true;
  try {
    const job = await api("/jobs", { method: "POST", json: spec });
    clearErrors(form);
    announce(`Job ${job.id} queued`);
    location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
  } catch (err) {
    if (err.status === 401) return;
    showErrors(form, apiErrors(err), err.status >= 500 || err.status === 0 ? err.message : undefined);
  } finally {
    button.disabled = false;
  }
}

function onSubmitForm(event) {
  event.preventDefault();
  const form = event.target;
  const { spec, errors } = specFromForm();
  if (errors.length) { showErrors(form, errors, "Fix the marked fields."); return; }
  submitSpec(form, spec);
}

function parseSpecText(text) {
  const trimmed = text.trim();
  if (!trimmed) throw new Error("Paste a job spec first.");
  if (trimmed.startsWith("{")) {
    try { return JSON.parse(trimmed); } catch (err) { throw new Error(`Not valid JSON: ${err.message}`); }
  }
  return parseYAML(trimmed);
}

function onSubmitText(event) {
  event.preventDefault();
  const form = event.target;
  clearErrors(form);
  let spec;
  try { spec = parseSpecText($("#job-text").value); } catch (err) {
    $(".form-error", form).textContent = err.message;
    $("#job-text").focus();
    return;
  }
  submitTextSpec(form, spec);
}

async function submitTextSpec(form, spec) {
  const button = $("button[type=submit]", form);
  button.disabled = true;
  try {
    const job = await api("/jobs", { method: "POST", json: spec });
    announce(`Job ${job.id} queued`);
    location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
  } catch (err) {
    if (err.status === 401) return;
    const list = h("ul", {}, apiErrors(err).map((e) => h("li", {}, e.param ? h("code", {}, e.param) : null, e.param ? ": " : "", e.message)));
    $(".form-error", form).replaceChildren(h("span", {}, "The API refused the job:"), list);
    $("#job-text").focus();
  } finally {
    button.disabled = false;
  }
}

function selectTab(which) {
  const formTab = $("#tab-form");
  const textTab = $("#tab-text");
  const toText = which === "text";
  formTab.setAttribute("aria-selected", String(!toText));
  textTab.setAttribute("aria-selected", String(toText));
  formTab.tabIndex = toText ? -1 : 0;
  textTab.tabIndex = toText ? 0 : -1;
  $("#job-form").hidden = toText;
  $("#job-text-form").hidden = !toText;
}

function formToText() {
  const { spec } = specFromForm();
  $("#job-text").value = JSON.stringify(spec, null, 2);
  selectTab("text");
  $("#tab-text").focus();
}

function textToForm() {
  const form = $("#job-text-form");
  clearErrors(form);
  let spec;
  try { spec = parseSpecText($("#job-text").value); } catch (err) {
    $(".form-error", form).textContent = err.message;
    return;
  }
  const problems = specToForm(spec);
  if (problems.length) {
    $(".form-error", form).replaceChildren(h("span", {}, "The form cannot show this spec:"), h("ul", {}, problems.map((p) => h("li", {}, p))));
    return;
  }
  selectTab("form");
  $("#tab-form").focus();
}

// ------------------------------------------------------------------------------------------
// A small YAML subset: enough for job specs, not a general YAML parser.

/**
 * Parses block mappings and sequences (indented with spaces), flow collections on one line
 * ([1, 2], {a: 1}), quoted and plain scalars, null/true/false/numbers and # comments.
 * Anchors, aliases, tags, multi-line strings and several documents are refused with an error.
 */
export function parseYAML(text) {
  const lines = [];
  String(text).split(/\r?\n/).forEach((raw, index) => {
    const number = index + 1;
    if (/^\s*\t/.test(raw)) throw new Error(`YAML line ${number}: indent with spaces, not tabs`);
    const content = stripComment(raw).replace(/\s+$/, "");
    if (!content.trim()) return;
    if (/^(---|\.\.\.)(\s|$)/.test(content)) {
      if (lines.length) throw new Error(`YAML line ${number}: only one document is supported`);
      return;
    }
    lines.push({ indent: content.length - content.trimStart().length, text: content.trim(), number });
  });
  if (!lines.length) return null;
  let i = 0;

  const isDash = (t) => t === "-" || t.startsWith("- ");
  const keyMatch = (t) => t.match(/^("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^\s"'[\]{}#,&*!|>%@`-][^#]*?|-[^\s#][^#]*?)\s*:(?:\s+(.*))?$/);

  function parseNode(indent) {
    const line = lines[i];
    if (isDash(line.text)) return parseSeq(line.indent);
    if (keyMatch(line.text)) return parseMap(line.indent);
    i += 1;
    if (i < lines.length && lines[i].indent > line.indent) throw new Error(`YAML line ${lines[i].number}: unexpected indentation`);
    return scalar(line.text, line.number);
  }

  function parseSeq(indent) {
    const out = [];
    while (i < lines.length && lines[i].indent === indent && isDash(lines[i].text)) {
      const line = lines[i];
      const rest = line.text === "-" ? "" : line.text.slice(2).trim();
      if (!rest) {
        i += 1;
        out.push(i < lines.length && lines[i].indent > indent ? parseNode(lines[i].indent) : null);
      } else if (isDash(rest) || keyMatch(rest)) {
        // "- key: value" starts a mapping (or "- - x" a sequence) indented to where the key is.
        const column = line.indent + (line.text.length - rest.length);
        lines[i] = { indent: column, text: rest, number: line.number };
        out.push(parseNode(column));
      } else {
        i += 1;
        out.push(scalar(rest, line.number));
      }
    }
    if (i < lines.length && lines[i].indent > indent) throw new Error(`YAML line ${lines[i].number}: unexpected indentation`);
    return out;
  }

  function parseMap(indent) {
    const out = {};
    while (i < lines.length && lines[i].indent === indent && !isDash(lines[i].text)) {
      const line = lines[i];
      const match = keyMatch(line.text);
      if (!match) throw new Error(`YAML line ${line.number}: expected "key: value"`);
      const key = unquote(match[1], line.number);
      if (Object.prototype.hasOwnProperty.call(out, key)) throw new Error(`YAML line ${line.number}: duplicate key "${key}"`);
      const rest = (match[2] || "").trim();
      i += 1;
      if (rest) out[key] = scalar(rest, line.number);
      else if (i < lines.length && lines[i].indent > indent) out[key] = parseNode(lines[i].indent);
      else if (i < lines.length && lines[i].indent === indent && isDash(lines[i].text)) out[key] = parseSeq(indent);
      else out[key] = null;
    }
    if (i < lines.length && lines[i].indent > indent) throw new Error(`YAML line ${lines[i].number}: unexpected indentation`);
    return out;
  }

  const result = parseNode(lines[0].indent);
  if (i < lines.length) throw new Error(`YAML line ${lines[i].number}: unexpected content (check the indentation)`);
  return result;
}

function stripComment(line) {
  let quote = null;
  for (let k = 0; k < line.length; k += 1) {
    const c = line[k];
    if (quote) {
      if (c === "\\" && quote === '"') k += 1;
      else if (c === quote) quote = null;
    } else if (c === '"' || c === "'") {
      if (k === 0 || /[\s:[{,-]/.test(line[k - 1])) quote = c;
    } else if (c === "#" && (k === 0 || /\s/.test(line[k - 1]))) {
      return line.slice(0, k);
    }
  }
  return line;
}

function unquote(token, number) {
  if (token.startsWith('"')) {
    try { return JSON.parse(token); } catch { throw new Error(`YAML line ${number}: bad double-quoted string`); }
  }
  if (token.startsWith("'")) return token.slice(1, -1).replace(/''/g, "'");
  return token;
}

function scalar(token, number) {
  const t = token.trim();
  if (t.startsWith("[") || t.startsWith("{")) return flow(t, number);
  if (/^[|>]/.test(t)) throw new Error(`YAML line ${number}: multi-line strings (| and >) are not supported; use JSON`);
  if (/^[&*!]/.test(t)) throw new Error(`YAML line ${number}: anchors, aliases and tags are not supported`);
  if (t.startsWith('"') || t.startsWith("'")) {
    const quote = t[0];
    const end = quote === '"' ? /^"(?:[^"\\]|\\.)*"$/ : /^'(?:[^']|'')*'$/;
    if (!end.test(t)) throw new Error(`YAML line ${number}: unterminated or trailing text after a quoted string`);
    return unquote(t, number);
  }
  return plain(t);
}

function plain(t) {
  if (/^(null|Null|NULL|~)$/.test(t) || t === "") return null;
  if (/^(true|True|TRUE)$/.test(t)) return true;
  if (/^(false|False|FALSE)$/.test(t)) return false;
  if (/^[-+]?(0|[1-9][0-9_]*)$/.test(t)) return Number(t.replace(/_/g, ""));
  if (/^0x[0-9a-fA-F]+$/.test(t)) return parseInt(t, 16);
  if (/^[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(t)) return Number(t.replace(/_/g, ""));
  if (/^[-+]?\.(inf|Inf|INF)$/.test(t)) return t.startsWith("-") ? -Infinity : Infinity;
  if (/^\.(nan|NaN|NAN)$/.test(t)) return NaN;
  return t;
}

/** One-line flow collections: [a, b], {k: v}, nested. */
function flow(text, number) {
  let k = 0;
  const fail = (what) => { throw new Error(`YAML line ${number}: ${what} in "${text}"`); };
  const space = () => { while (k < text.length && /\s/.test(text[k])) k += 1; };
  function value() {
    space();
    const c = text[k];
    if (c === "[") {
      k += 1; const out = []; space();
      if (text[k] === "]") { k += 1; return out; }
      for (;;) {
        out.push(value()); space();
        if (text[k] === ",") { k += 1; space(); if (text[k] === "]") { k += 1; return out; } continue; }
        if (text[k] === "]") { k += 1; return out; }
        fail("expected , or ]");
      }
    }
    if (c === "{") {
      k += 1; const out = {}; space();
      if (text[k] === "}") { k += 1; return out; }
      for (;;) {
        const key = token(true); space();
        if (text[k] !== ":") fail("expected :");
        k += 1;
        out[typeof key === "string" ? key : String(key)] = value(); space();
        if (text[k] === ",") { k += 1; space(); if (text[k] === "}") { k += 1; return out; } continue; }
        if (text[k] === "}") { k += 1; return out; }
        fail("expected , or }");
      }
    }
    return token(false);
  }
  function token(isKey) {
    space();
    const c = text[k];
    if (c === '"' || c === "'") {
      const re = c === '"' ? /^"(?:[^"\\]|\\.)*"/ : /^'(?:[^']|'')*'/;
      const m = text.slice(k).match(re);
      if (!m) fail("unterminated string");
      k += m[0].length;
      return unquote(m[0], number);
    }
    const start = k;
    while (k < text.length) {
      const ch = text[k];
      if (ch === "," || ch === "]" || ch === "}") break;
      // A key ends at ": " (or ":" before , ] } or the end); "2:4" stays one scalar.
      if (isKey && ch === ":" && /[\s,\]}]/.test(text[k + 1] ?? " ")) break;
      k += 1;
    }
    const raw = text.slice(start, k).trim();
    if (!raw && !isKey) fail("missing value");
    return isKey ? raw : plain(raw);
  }
  const result = value();
  space();
  if (k < text.length) fail("unexpected text after the collection");
  return result;
}

// ------------------------------------------------------------------------------------------
// Jobs list

let loadJobsTable;

async function renderJobs() {
  if (!state.models.length) await refreshModels().catch(() => {});
  const status = $("#jobs-status").value;
  const path = `/jobs${status ? `?status=${status}` : ""}`;
  const table = $("#jobs-table");
  const card = table.closest(".card");
  const body = $("tbody", table);
  const more = $(".more", card);
  let after = null;
  const rowFor = (job) => {
    const bar = h("progress", { max: 1, value: job.progress, "aria-label": `Progress of ${job.id}` });
    return h("tr", { "data-job-id": job.id },
      h("th", { scope: "row" }, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, title: job.id, "aria-label": `Job ${job.id}` }, h("code", { class: "nowrap" }, shortId(job.id)))),
      h("td", {}, modelName(job.model_id)),
      h("td", {}, stagesSummary(job.spec)),
      h("td", {}, h("span", { class: `badge status-${job.status}` }, job.status)),
      h("td", { class: "progress-cell" }, bar, ` ${Math.round(job.progress * 100)}%`),
      h("td", { class: "num" }, job.artifact ? fmtBytes(job.artifact.size_bytes) : "–"),
      h("td", { class: "num" }, fmtNumber(job.metrics?.after?.perplexity)),
      h("td", {}, fmtDate(job.created_at)));
  };
  loadJobsTable = async (reset) => {
    if (reset) { after = null; }
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=20${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    if (reset) body.replaceChildren();
    body.append(...page.data.map(rowFor));
    after = page.data.length ? page.data[page.data.length - 1].id : after;
    more.hidden = !page.has_more;
    $(".empty", card).hidden = body.children.length > 0;
    return page.data;
  };
  more.onclick = () => loadJobsTable(false).catch((err) => flash(err.message));
  const jobs = await loadJobsTable(true);
  // While something is queued or running, refresh now and then (only while this view is shown).
  clearTimeout(state.jobsTimer);
  if (jobs.some((j) => !TERMINAL.has(j.status))) {
    state.jobsTimer = setTimeout(() => { if (!$("#view-jobs").hidden) renderJobs().catch(() => {}); }, 3000);
  }
}

// ------------------------------------------------------------------------------------------
// One job: the live view

function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
  // A stale "Finished" must not describe the next job shown (or this one, shown again).
  $("#job-stream-state").textContent = "";
}

let currentJob = null;

async function openJob(id) {
  if (currentJob?.id === id && state.stream) return; // already following it
  stopStream();
  currentJob = null;
  $("#job-title").textContent = `Job ${id}`;
  $("#job-log").replaceChildren();
  $("#job-results").hidden = true;
  $("#job-chart").hidden = true;
  $("#job-error").textContent = "";
  $("#job-download-state").textContent = "";
  $("#job-stream-state").textContent = "";
  if (!state.models.length) await refreshModels().catch(() => {});
  const job = await api(`/jobs/${encodeURIComponent(id)}`);
  currentJob = job;
  renderJobHeader(job);
  const controller = new AbortController();
  state.stream = controller;
  followEvents(job.id, controller.signal).catch((err) => {
    if (err.name !== "AbortError") $("#job-stream-state").textContent = `Live updates stopped: ${err.message}`;
  });
  if (TERMINAL.has(job.status)) await renderFinished(job);
}

function setStatus(status) {
  const badge = $("#job-status");
  badge.textContent = status;
  badge.className = `badge status-${status}`;
}

function setProgress(value) {
  const bar = $("#job-progress");
  bar.value = value;
  const text = `${Math.round(value * 100)}%`;
  bar.setAttribute("aria-valuetext", text);
  $("#job-progress-text").textContent = text;
}

function renderJobHeader(job) {
  setStatus(job.status);
  setProgress(job.progress ?? 0);
  $("#job-stage").textContent = job.stage || (TERMINAL.has(job.status) ? "–" : "waiting");
  $("#job-model-name").replaceChildren(h("span", {}, modelName(job.model_id)), " ", h("code", { class: "small muted" }, job.model_id));
  $("#job-stages").textContent = stagesSummary(job.spec);
  $("#job-created").textContent = fmtDate(job.created_at);
  $("#job-finished").textContent = fmtDate(job.finished_at);
  const cancel = $("#job-cancel");
  cancel.hidden = TERMINAL.has(job.status);
  cancel.disabled = Boolean(job.cancel_requested);
  cancel.textContent = job.cancel_requested ? "Cancel requested…" : "Cancel job";
  if (job.error) $("#job-error").textContent = `${job.error.type}: ${job.error.message}`;
}

/** Parse a text/event-stream body: returns a function fed with decoded text. */
export function sseParser(onEvent) {
  let buffer = "";
  let data = [];
  let type = "";
  let id = null;
  return (chunk, flush = false) => {
    buffer += chunk;
    const lines = buffer.split("\n");
    buffer = flush ? "" : lines.pop();
    for (let line of lines) {
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (data.length) onEvent({ id, type: type || "message", data: data.join("\n") });
        data = []; type = "";
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "event") type = value;
      else if (field === "id" && !value.includes("\0")) id = value;
    }
  };
}

async function followEvents(jobId, signal) {
  let lastId = null;
  let failures = 0;
  let finished = false;
  const seen = new Set();
  const stateLine = $("#job-stream-state");
  while (!signal.aborted && !finished) {
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (lastId !== null) headers["Last-Event-ID"] = String(lastId);
      const response = await fetch(`${API}/jobs/${encodeURIComponent(jobId)}/events/stream`, { headers, signal, cache: "no-store" });
      if (!response.ok) {
        const err = await errorFrom(response);
        if (response.status === 401) keyRefused();
        throw err;
      }
      failures = 0;
      stateLine.textContent = "Live";
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const feed = sseParser((event) => {
        if (event.id !== null) lastId = event.id;
        if (event.id !== null && seen.has(event.id)) return;
        if (event.id !== null) seen.add(event.id);
        let payload;
        try { payload = JSON.parse(event.data); } catch { return; }
        if (onJobEvent(event.type, payload)) finished = true;
      });
      for (;;) {
        const { value, done } = await reader.read();
        if (done) { feed(decoder.decode(), true); break; }
        feed(decoder.decode(value, { stream: true }));
      }
      if (!finished) throw new Error("the stream ended early");
    } catch (err) {
      if (signal.aborted || err.name === "AbortError") return;
      if (err instanceof ApiError && err.status >= 400 && err.status < 500 && err.status !== 429) {
        stateLine.textContent = `Live updates stopped: ${err.message}`;
        return;
      }
      failures += 1;
      const delay = Math.min(1000 * 2 ** (failures - 1), 15000);
      stateLine.textContent = `Connection lost (${err.message}); reconnecting in ${Math.round(delay / 1000)} s…`;
      await sleep(delay, signal);
    }
  }
  if (finished && !signal.aborted) stateLine.textContent = "Finished";
}

const EVENT_LABELS = { status: "status", stage: "stage", progress: "progress", metric: "metric", warning: "warning", error: "error" };

/** Handle one job event; true when it was the job's final status. */
function onJobEvent(type, event) {
  const data = event.data || {};
  const time = new Date(event.created_at);
  const item = h("li", { class: `log-${type}`, "data-event-id": event.id },
    h("time", { datetime: event.created_at }, Number.isNaN(time.getTime()) ? "" : time.toLocaleTimeString()),
    h("span", { class: `tag tag-${type}` }, EVENT_LABELS[type] || type),
    h("span", { class: "message" }, event.message));
  const log = $("#job-log");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
  log.append(item);
  if (atBottom) log.scrollTop = log.scrollHeight;

  // A job already finished when the page opened replays its whole log: the header keeps the
  // final state it was drawn with, and only the log grows.
  const live = !(currentJob && TERMINAL.has(currentJob.status));
  if (!live) return type === "status" && TERMINAL.has(data.status);
  if (type === "stage" && data.stage) $("#job-stage").textContent = data.stage;
  if (type === "progress" && typeof data.progress === "number") setProgress(data.progress);
  if (type === "error") $("#job-error").textContent = `${data.error_type ? `${data.error_type}: ` : ""}${event.message}`;
  if (type === "status" && data.status) {
    setStatus(data.status);
    if (data.status === "running" && $("#job-stage").textContent === "waiting") $("#job-stage").textContent = "starting";
    if (TERMINAL.has(data.status)) {
      $("#job-cancel").hidden = true;
      announce(`Job ${data.status}`);
      const id = event.job_id;
      api(`/jobs/${encodeURIComponent(id)}`).then((job) => {
        if (currentJob?.id !== id) return;
        currentJob = job;
        renderJobHeader(job);
        return renderFinished(job);
      }).catch((err) => flash(err.message));
      return true;
    }
  }
  return false;
}

async function cancelJob() {
  if (!currentJob) return;
  const button = $("#job-cancel");
  button.disabled = true;
  try {
    const job = await api(`/jobs/${encodeURIComponent(currentJob.id)}/cancel`, { method: "POST" });
    currentJob = job;
    renderJobHeader(job);
    announce(job.status === "cancelled" ? "Job cancelled" : "Cancel requested: the job stops at the next layer or step");
  } catch (err) {
    if (err.status !== 401) $("#job-error").textContent = err.message;
    button.disabled = false;
  }
}

// ------------------------------------------------------------------------------------------
// A finished job: before/after, download, chart

const METRIC_ROWS = [
  ["size_bytes", "Size on disk", fmtBytes, "ratio"],
  ["sparsity", "Sparsity", (x) => fmtPercent(x), "points"],
  ["bits_per_weight", "Bits per weight", (x) => fmtNumber(x, 3), "ratio"],
  ["perplexity", "Perplexity", (x) => fmtNumber(x, 4), "ratio"],
  ["latency_ms_per_token", "Latency (ms / token)", (x) => fmtNumber(x, 3), "ratio"],
  ["nonzero_parameters", "Non-zero parameters", fmtCount, "ratio"],
];

function change(before, after, how) {
  if (typeof before !== "number" || typeof after !== "number") return "–";
  if (how === "points") {
    const delta = (after - before) * 100;
    return `${delta >= 0 ? "+" : "−"}${Math.abs(delta).toFixed(1)} pts`;
  }
  if (before === 0) return "–";
  const ratio = after / before;
  const pct = (ratio - 1) * 100;
  return `×${ratio.toFixed(ratio < 0.1 ? 3 : 2)} (${pct >= 0 ? "+" : "−"}${Math.abs(pct).toFixed(1)}%)`;
}

async function renderFinished(job) {
  const metrics = job.metrics;
  const results = $("#job-results");
  if (job.status !== "succeeded" || !metrics) { results.hidden = true; return; }
  results.hidden = false;
  const before = metrics.before || {};
  const after = metrics.after || {};
  $("#metrics-table tbody").replaceChildren(...METRIC_ROWS.filter(([key]) => key in before || key in after).map(([key, label, fmt, how]) =>
    h("tr", { "data-metric": key },
      h("th", { scope: "row" }, label, " ", h("code", { class: "small muted" }, key)),
      h("td", { class: "num", title: String(before[key] ?? "") }, before[key] === undefined || before[key] === null ? "–" : fmt(before[key])),
      h("td", { class: "num", title: String(after[key] ?? "") }, after[key] === undefined || after[key] === null ? "–" : fmt(after[key])),
      h("td", { class: "num" }, change(before[key], after[key], how)))));
  const stages = Array.isArray(metrics.stages) ? metrics.stages : [];
  $("#stage-metrics-table tbody").replaceChildren(...stages.map((s) => {
    const { name, wall_time_s: wall, ...figures } = s;
    const text = Object.entries(figures).filter(([, v]) => v !== null && typeof v !== "object")
      .map(([k, v]) => `${k}: ${typeof v === "number" ? fmtNumber(v, 4) : v}`).join(", ");
    return h("tr", {}, h("th", { scope: "row" }, name), h("td", { class: "num" }, wall === undefined ? "–" : `${fmtNumber(wall, 3)} s`), h("td", {}, text || "–"));
  }));
  $("#stage-metrics-table").hidden = !stages.length;
  $("#artifact-format").textContent = job.artifact?.format || "–";
  $("#artifact-size").textContent = job.artifact ? `${fmtBytes(job.artifact.size_bytes)} (${job.artifact.size_bytes} bytes)` : "–";
  $("#artifact-sha256").textContent = job.artifact?.sha256 || "–";
  $("#job-download").disabled = !job.artifact;
  await renderChart(job).catch((err) => { $("#chart-note").textContent = `Could not draw the chart: ${err.message}`; });
}

function hex(buffer) {
  return [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function downloadArtifact() {
  const job = currentJob;
  if (!job?.artifact) return;
  const button = $("#job-download");
  const status = $("#job-download-state");
  button.disabled = true;
  status.textContent = "Downloading…";
  try {
    const response = await fetch(`${API}/jobs/${encodeURIComponent(job.id)}/artifact`, { headers: authHeaders() });
    if (!response.ok) {
      const err = await errorFrom(response);
      if (response.status === 401) keyRefused();
      throw err;
    }
    const checksum = response.headers.get("X-Checksum-SHA256") || "";
    const total = Number(response.headers.get("Content-Length")) || job.artifact.size_bytes;
    const reader = response.body.getReader();
    const chunks = [];
    let received = 0;
    let lastShown = -1;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      chunks.push(value);
      received += value.length;
      const pct = total ? Math.floor((received / total) * 100) : null;
      if (pct !== null && pct !== lastShown && pct % 5 === 0) { lastShown = pct; status.textContent = `Downloading… ${pct}%`; }
    }
    const blob = new Blob(chunks, { type: "application/x-tar" });
    $("#artifact-sha256").textContent = checksum || job.artifact.sha256;
    let verdict = "";
    // SubtleCrypto exists only in secure contexts (https, localhost); large files would need a
    // second copy in memory, so only smaller ones are checked here.
    if (globalThis.crypto?.subtle && checksum && blob.size <= 512 * 1024 * 1024) {
      const digest = hex(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()));
      verdict = digest === checksum.toLowerCase() ? " · sha256 checked in the browser: matches" : ` · sha256 MISMATCH: got ${digest}`;
    }
    const url = URL.createObjectURL(blob);
    const link = h("a", { href: url, download: `${job.id}.tar`, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    status.textContent = `Saved ${job.id}.tar (${fmtBytes(blob.size)})${verdict}`;
    announce("Download finished");
  } catch (err) {
    status.textContent = `Download failed: ${err.message}`;
  } finally {
    button.disabled = false;
  }
}

/** Round ticks for [lo, hi], each with a label of as many decimals as the step needs. */
export function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [{ value: lo, label: fmtNumber(lo) }];
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw;
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9) + (String(step / magnitude).includes(".") ? 1 : 0));
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    const value = Number(v.toPrecision(12));
    out.push({ value, label: value.toFixed(Math.min(decimals, 12)) });
  }
  return out;
}

function byteUnit(max) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let k = 0;
  while (k < units.length - 1 && max >= 1024 ** (k + 1)) k += 1;
  return [units[k], 1024 ** k];
}

function padRange(values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi === lo) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
  const pad = (hi - lo) * 0.08;
  return [Math.max(0, lo - pad), hi + pad];
}

async function renderChart(job) {
  const jobs = await listAll(`/jobs?model_id=${encodeURIComponent(job.model_id)}&status=succeeded`, 1000);
  const points = jobs
    .filter((j) => j.artifact && typeof j.metrics?.after?.perplexity === "number" && Number.isFinite(j.metrics.after.perplexity))
    .map((j) => ({ id: j.id, x: j.artifact.size_bytes, y: j.metrics.after.perplexity, stages: stagesSummary(j.spec), current: j.id === job.id }));
  const skipped = jobs.length - points.length;
  const section = $("#job-chart");
  section.hidden = false;
  const chart = $("#chart");
  const before = job.metrics?.before;
  const baseline = typeof before?.perplexity === "number" && typeof before?.size_bytes === "number" ? { x: before.size_bytes, y: before.perplexity } : null;
  if (!points.length) {
    chart.replaceChildren(h("p", { class: "muted" }, "No finished job on this model has a perplexity yet: add an evaluation section to a job."));
    $("#chart-note").textContent = "";
    $("#chart-table tbody").replaceChildren();
    return;
  }
  const W = 720; const H = 380;
  const M = { left: 78, right: 24, top: 20, bottom: 56 };
  const xs = points.map((p) => p.x).concat(baseline ? [baseline.x] : []);
  const ys = points.map((p) => p.y).concat(baseline ? [baseline.y] : []);
  const [x0, x1] = padRange(xs);
  const [y0, y1] = padRange(ys);
  const sx = (x) => M.left + ((x - x0) / (x1 - x0)) * (W - M.left - M.right);
  const sy = (y) => H - M.bottom - ((y - y0) / (y1 - y0)) * (H - M.top - M.bottom);
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "scatter", role: "img", "aria-labelledby": "chart-svg-title chart-svg-desc" },
    svg("title", { id: "chart-svg-title" }, "Perplexity after compression against artifact size"),
    svg("desc", { id: "chart-svg-desc" }, `${points.length} job${points.length === 1 ? "" : "s"} on model ${modelName(job.model_id)}; lower and further left is better.`));
  const grid = svg("g", { class: "grid" });
  const axes = svg("g", { class: "axes" });
  // Size ticks at round numbers of one unit (300 KiB, 400 KiB), not round numbers of bytes.
  const [unit, div] = byteUnit(x1);
  for (const { value, label } of ticks(x0 / div, x1 / div, 6)) {
    const x = sx(value * div);
    grid.append(svg("line", { x1: x, x2: x, y1: M.top, y2: H - M.bottom }));
    axes.append(svg("text", { x, y: H - M.bottom + 18, "text-anchor": "middle", class: "tick" }, `${label} ${unit}`));
  }
  for (const { value, label } of ticks(y0, y1, 5)) {
    grid.append(svg("line", { x1: M.left, x2: W - M.right, y1: sy(value), y2: sy(value) }));
    axes.append(svg("text", { x: M.left - 8, y: sy(value) + 4, "text-anchor": "end", class: "tick" }, label));
  }
  axes.append(
    svg("line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, class: "axis" }),
    svg("line", { x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom, class: "axis" }),
    svg("text", { x: (M.left + W - M.right) / 2, y: H - 12, "text-anchor": "middle", class: "axis-label" }, "Artifact size (artifact.size_bytes)"),
    svg("text", { x: 0, y: 0, transform: `translate(18 ${(M.top + H - M.bottom) / 2}) rotate(-90)`, "text-anchor": "middle", class: "axis-label" }, "Perplexity after (lower is better)"));
  plot.append(grid, axes);
  const marks = svg("g", { class: "points" });
  if (baseline) {
    const cx = sx(baseline.x); const cy = sy(baseline.y);
    marks.append(svg("g", { class: "baseline", tabindex: "0", role: "img", "aria-label": `Original model: ${fmtBytes(baseline.x)} on disk, perplexity ${fmtNumber(baseline.y)}` },
      svg("title", {}, `Original model (before compression)\nsize on disk ${fmtBytes(baseline.x)}\nperplexity ${fmtNumber(baseline.y)}`),
      svg("rect", { x: cx - 6, y: cy - 6, width: 12, height: 12, transform: `rotate(45 ${cx} ${cy})`, class: "baseline-mark" })));
  }
  // The current job last, so it is drawn on top.
  for (const p of [...points].sort((a, b) => Number(a.current) - Number(b.current))) {
    const label = `${p.id}: ${p.stages}; artifact ${fmtBytes(p.x)}, perplexity ${fmtNumber(p.y)}${p.current ? " (this job)" : ""}`;
    const link = svg("a", { href: `#/jobs/${encodeURIComponent(p.id)}`, class: "point-link", "aria-label": label },
      svg("circle", { cx: sx(p.x), cy: sy(p.y), r: p.current ? 7 : 5.5, class: `point job-point${p.current ? " current" : ""}`, "data-job-id": p.id },
        svg("title", {}, `${p.id}${p.current ? " (this job)" : ""}\n${p.stages}\nartifact ${fmtBytes(p.x)} (${p.x} bytes)\nperplexity ${fmtNumber(p.y, 5)}`)));
    marks.append(link);
  }
  plot.append(marks);
  const legend = h("ul", { class: "chart-legend" },
    h("li", {}, h("span", { class: "swatch job" }), "a job (select it to open)"),
    h("li", {}, h("span", { class: "swatch current" }), "this job"),
    baseline ? h("li", {}, h("span", { class: "swatch baseline" }), "the original model (files on disk)") : null);
  chart.replaceChildren(plot, legend);
  $("#chart-note").textContent = skipped ? `${skipped} succeeded job${skipped === 1 ? "" : "s"} without an evaluation (no perplexity) not shown.` : "";
  $("#chart-table tbody").replaceChildren(...points.map((p) => h("tr", {},
    h("th", { scope: "row" }, h("a", { href: `#/jobs/${encodeURIComponent(p.id)}`, title: p.id }, h("code", { class: "nowrap" }, shortId(p.id))), p.current ? " (this job)" : ""),
    h("td", {}, p.stages), h("td", { class: "num" }, fmtBytes(p.x)), h("td", { class: "num" }, fmtNumber(p.y, 5)))));
}

// ------------------------------------------------------------------------------------------
// Start

function init() {
  $("#signin-form").addEventListener("submit", signIn);
  $("#sign-out").addEventListener("click", signOut);
  $(".flash-close").addEventListener("click", clearFlash);
  $("#models-refresh").addEventListener("click", () => renderModels().catch((e) => flash(e.message)));
  $("#datasets-refresh").addEventListener("click", () => renderDatasets().catch((e) => flash(e.message)));
  $("#jobs-refresh").addEventListener("click", () => renderJobs().catch((e) => flash(e.message)));
  $("#jobs-status").addEventListener("change", () => renderJobs().catch((e) => flash(e.message)));
  bindUpload("#model-upload", {
    path: "/models", fileField: "files", inputs: ["#model-files", "#model-folder"], noun: "Model",
    after: async () => { await renderModels(); await refreshModels(); },
  });
  bindUpload("#dataset-upload", {
    path: "/datasets", fileField: "file", inputs: ["#dataset-file"], noun: "Dataset",
    after: async () => { await renderDatasets(); await refreshDatasets(); },
  });
  $("#add-stage").addEventListener("click", onAddStage);
  $("#job-form").addEventListener("submit", onSubmitForm);
  $("#job-text-form").addEventListener("submit", onSubmitText);
  $("#form-to-text").addEventListener("click", formToText);
  $("#text-to-form").addEventListener("click", textToForm);
  $("#tab-form").addEventListener("click", () => selectTab("form"));
  $("#tab-text").addEventListener("click", () => { if ($("#job-text").value.trim() === "") formToText(); else selectTab("text"); });
  $(".tabs").addEventListener("keydown", (event) => {
    if (!["ArrowLeft", "ArrowRight", "Home", "End"].includes(event.key)) return;
    const toText = event.key === "ArrowRight" || event.key === "End";
    if (toText) $("#tab-text").click(); else selectTab("form");
    (toText ? $("#tab-text") : $("#tab-form")).focus();
    event.preventDefault();
  });
  $("#job-cancel").addEventListener("click", cancelJob);
  $("#job-download").addEventListener("click", downloadArtifact);
  window.addEventListener("hashchange", () => { clearFlash(); route(); });
  route();
}

// Imported elsewhere (a test runner without the page), the module only exports its helpers.
if (globalThis.document?.getElementById("view-signin")) init();
