// The "New job" view: a form generated from the JobSpec schema (stages added, moved and
// removed; the optional sections switched on and off), and the same spec as JSON or YAML text.
//
// The API stays the authority on validation: its messages are shown next to the field that
// error.param names (e.g. "stages.0.sparsity"), through the data-params of each field.

import { api } from "./api.js";
import { $, $$, announce, h, richText } from "./dom.js";
import { refreshDatasets, refreshModels } from "./models.js";
import {
  ensureOption, fillPicker, jobSpecSchema, loadSchema, readWidgets, refreshPickers, renderFields, sectionSchema,
  stageVariants,
} from "./schema-form.js";
import { parseYAML } from "./yaml.js";

// The job being composed: its stages ({uid, li, select, fieldsBox, widgets, tag, ...}), the
// optional sections ({widgets, enabled()}) and the spec keys the form has no inputs for
// (webhook), kept from pasted text.
const draft = { stages: [], sections: {}, extras: {} };
let stageSeq = 0;          // numbers the stages' element ids, never reused
let jobFormReady = false;  // built once; later visits only refresh the pickers

export async function openJobForm(preselectModel) {
  await loadSchema();
  await Promise.all([refreshModels(), refreshDatasets()]);
  if (!jobFormReady) {
    buildJobForm();
    jobFormReady = true;
  } else {
    refreshPickers($("#job-form"));
  }
  if (preselectModel) $("#job-model").value = preselectModel;
}

function buildJobForm() {
  fillPicker($("#job-model"));
  $("#stage-list").replaceChildren();
  draft.stages = [];
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
    draft.sections[name] = { widgets, enabled: () => (toggle ? toggle.checked : true) };
  }
}

function variantFor(tag) {
  return stageVariants().find((v) => v.tag === tag);
}

function addStage(tag, values = null) {
  const variants = stageVariants();
  const uid = `st${++stageSeq}`;
  const select = h("select", { id: `${uid}-method`, "aria-describedby": `${uid}-desc ${uid}-method-err ${uid}-err` });
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
  // Errors about the stage as a whole go under it; about its type or method, under the select.
  const error = h("p", { class: "field-error", id: `${uid}-err`, role: "alert" });
  const methodError = h("p", { class: "field-error", id: `${uid}-method-err`, role: "alert" });
  const methodField = h("div", { class: "field method" }, h("label", { for: select.id }, "Method"), select, desc, note, methodError);
  const up = h("button", { type: "button", class: "secondary small" }, "Move up");
  const down = h("button", { type: "button", class: "secondary small" }, "Move down");
  const remove = h("button", { type: "button", class: "secondary small" }, "Remove");
  const li = h("li", { class: "stage" },
    h("fieldset", {}, legend,
      h("div", { class: "stage-tools" }, up, down, remove),
      methodField, fieldsBox),
    error);
  const stage = { uid, li, select, legend, desc, note, fieldsBox, methodField, widgets: new Map(), tag, up, down, remove };
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
  draft.stages.push(stage);
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
  draft.stages.forEach((stage, index) => {
    stage.legend.textContent = `Stage ${index + 1}`;
    stage.li.dataset.params = `stages.${index}`;
    stage.methodField.dataset.params = `stages.${index}.type stages.${index}.method`;
    for (const [name, widget] of stage.widgets) widget.setParam(`stages.${index}.${name}`);
    stage.up.disabled = index === 0;
    stage.down.disabled = index === draft.stages.length - 1;
    stage.remove.disabled = draft.stages.length === 1;
    stage.up.setAttribute("aria-label", `Move stage ${index + 1} up`);
    stage.down.setAttribute("aria-label", `Move stage ${index + 1} down`);
    stage.remove.setAttribute("aria-label", `Remove stage ${index + 1}`);
  });
  $("#add-stage").disabled = draft.stages.length >= maxStages();
}

function maxStages() {
  return jobSpecSchema().properties.stages.maxItems || 16;
}

function moveStage(stage, delta) {
  const index = draft.stages.indexOf(stage);
  const target = index + delta;
  if (target < 0 || target >= draft.stages.length) return;
  draft.stages.splice(index, 1);
  draft.stages.splice(target, 0, stage);
  $("#stage-list").replaceChildren(...draft.stages.map((s) => s.li));
  renumberStages();
  const same = delta < 0 ? stage.up : stage.down;
  (same.disabled ? stage.select : same).focus();
  announce(`Stage moved to position ${target + 1}`);
}

function removeStage(stage) {
  const index = draft.stages.indexOf(stage);
  if (draft.stages.length === 1) return;
  draft.stages.splice(index, 1);
  stage.li.remove();
  renumberStages();
  draft.stages[Math.min(index, draft.stages.length - 1)].select.focus();
  announce(`Stage ${index + 1} removed`);
}

function onAddStage() {
  const variants = stageVariants();
  const last = draft.stages[draft.stages.length - 1];
  const lastType = last ? variantFor(last.tag).type : null;
  const next = variants.find((v) => v.type !== lastType && v.type !== "distill") || variants[0];
  const stage = addStage(next.tag);
  stage.select.focus();
  announce(`Stage ${draft.stages.length} added`);
}

/** The spec the form describes, or {errors} the client can tell without asking the API. */
function specFromForm() {
  const errors = [];
  const spec = { model_id: $("#job-model").value };
  spec.stages = draft.stages.map((stage, index) => {
    const variant = variantFor(stage.tag);
    return { type: variant.type, method: variant.method, ...readWidgets(stage.widgets, `stages.${index}`, errors) };
  });
  for (const [name, section] of Object.entries(draft.sections)) {
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
  Object.assign(spec, draft.extras);
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
  draft.stages = [];
  for (const stage of stages) {
    const { type, method, ...values } = stage;
    addStage(`${type}.${method}`, values);
  }
  if (!draft.stages.length) addStage(stageVariants()[0].tag);
  for (const [name, section] of Object.entries(draft.sections)) {
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
  const known = new Set(["model_id", "stages", "metadata", ...Object.keys(draft.sections)]);
  draft.extras = {};
  for (const [key, value] of Object.entries(spec)) if (!known.has(key)) draft.extras[key] = value;
  const extras = Object.keys(draft.extras);
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

/** Show the API's (or the client's) errors next to their fields, the rest above the buttons. */
function showErrors(form, errors, fallbackMessage) {
  clearErrors(form);
  const unplaced = [];
  let firstFocus = null;
  for (const { param, message } of errors) {
    const found = param ? errorHolder(form, param) : null;
    const slot = found?.holder.querySelector(":scope > .field-error");
    if (!slot) { unplaced.push(param ? `${param}: ${message}` : message); continue; }
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

/** POST the spec; on success open the new job, otherwise showRefusal(err) says why. */
async function submitSpec(form, spec, showRefusal) {
  const button = $("button[type=submit]", form);
  button.disabled = true;
  try {
    const job = await api("/jobs", { method: "POST", json: spec });
    clearErrors(form);
    announce(`Job ${job.id} queued`);
    location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
  } catch (err) {
    if (err.status === 401) return;
    showRefusal(err);
  } finally {
    button.disabled = false;
  }
}

function onSubmitForm(event) {
  event.preventDefault();
  const form = event.target;
  const { spec, errors } = specFromForm();
  if (errors.length) { showErrors(form, errors, "Fix the marked fields."); return; }
  submitSpec(form, spec, (err) => showErrors(form, apiErrors(err), err.status >= 500 || err.status === 0 ? err.message : undefined));
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
  submitSpec(form, spec, (err) => {
    const list = h("ul", {}, apiErrors(err).map((e) => h("li", {}, e.param ? h("code", {}, e.param) : null, e.param ? ": " : "", e.message)));
    $(".form-error", form).replaceChildren(h("span", {}, "The API refused the job:"), list);
    $("#job-text").focus();
  });
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

export function bindJobForm() {
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
}
