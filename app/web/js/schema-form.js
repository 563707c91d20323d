// Forms generated from the API's own OpenAPI document (/openapi.json): one input per schema
// property, with the property's title, description, default and limits. Nothing about a
// method is written here: a new stage config in app/specs.py appears in the form as it is.
//
// A property that names another object carries "x-squeeze-ref" ("dataset" or "model") in the
// schema (app/specs.py: DatasetRef, ModelRef); it gets a picker of the tenant's datasets or
// models instead of a text box. A kind this client has no list for stays a text box.

import { $$, h, richText } from "./dom.js";
import { fmtBytes, fmtCount } from "./format.js";
import { catalog } from "./models.js";

const REFERENCE_KEY = "x-squeeze-ref";

let openapi = null;  // the OpenAPI document
let stageVariantList = null;  // read from it once

export async function loadSchema() {
  if (openapi) return openapi;
  const response = await fetch("/openapi.json");
  if (!response.ok) throw new Error(`Could not read /openapi.json (HTTP ${response.status})`);
  openapi = await response.json();
  return openapi;
}

function resolve(node) {
  let current = node;
  for (let i = 0; current && current.$ref && i < 10; i += 1) {
    const path = current.$ref.replace(/^#\//, "").split("/");
    let target = openapi;
    for (const key of path) target = target?.[key];
    const { $ref, ...rest } = current;
    current = { ...target, ...rest };
  }
  return current;
}

export function jobSpecSchema() {
  const spec = openapi?.components?.schemas?.JobSpec;
  if (!spec) throw new Error("The OpenAPI document has no JobSpec schema");
  return spec;
}

/** The stage variants: [{tag, type, method, schema, title, description}] in schema order. */
export function stageVariants() {
  if (stageVariantList) return stageVariantList;
  const items = resolve(jobSpecSchema().properties.stages.items);
  const list = items.oneOf || items.anyOf || [items];
  const constOf = (prop) => {
    const p = resolve(prop || {});
    return p.const ?? (p.enum && p.enum.length === 1 ? p.enum[0] : p.default);
  };
  stageVariantList = list.map((ref) => {
    const schema = resolve(ref);
    const type = constOf(schema.properties?.type);
    const method = constOf(schema.properties?.method);
    return { tag: `${type}.${method}`, type, method, schema, title: schema.title, description: schema.description || "" };
  }).filter((v) => v.type && v.method);
  return stageVariantList;
}

/** The schema of an optional section of JobSpec (calibration, evaluation, output). */
export function sectionSchema(name) {
  const prop = jobSpecSchema().properties[name];
  if (!prop) return null;
  const options = (prop.anyOf || prop.oneOf || [prop]).map(resolve).filter((s) => s.type !== "null");
  return options[0] || null;
}

/** What kind of input a property needs: {kind, base, nullable, variants, prop, ref}. */
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
  // On a nullable reference the extension sits on the non-null variant.
  const ref = base[REFERENCE_KEY] ?? p[REFERENCE_KEY] ?? null;
  return { kind, base, nullable, prop: p, ref };
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

// What a picker lists for each kind of reference.
const PICKERS = {
  dataset: {
    items: () => catalog.datasets,
    empty: "(no datasets: upload one first)",
    label: (d) => `${d.name} — ${d.format}, ${fmtBytes(d.size_bytes)}`,
  },
  model: {
    items: () => catalog.models,
    empty: "(no models: upload one first)",
    label: (m) => `${m.name} — ${m.architecture}, ${fmtCount(m.num_parameters)} params, ${fmtBytes(m.size_bytes)}`,
  },
};

/** A select of the tenant's datasets or models (kind), with a "(none)" choice when optional. */
function picker(id, kind, optional) {
  const select = h("select", { id, "data-ref": kind, "data-optional": optional || null });
  fillPicker(select);
  return select;
}

/** (Re)fill a picker (a select with data-ref) from the catalog, keeping its choice. */
export function fillPicker(select) {
  const { items, empty, label } = PICKERS[select.dataset.ref];
  const value = select.value;
  select.replaceChildren();
  if (select.dataset.optional !== undefined) select.append(h("option", { value: "" }, "(none)"));
  else if (!items().length) select.append(h("option", { value: "" }, empty));
  for (const item of items()) select.append(h("option", { value: item.id }, `${label(item)} (${item.id})`));
  if (value) { ensureOption(select, value); select.value = value; }
}

export function refreshPickers(root = document) {
  for (const select of $$("select[data-ref]", root)) fillPicker(select);
}

export function ensureOption(select, value) {
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
  const refKind = info.kind === "string" && info.ref in PICKERS ? info.ref : null;
  const limits = refKind ? "" : limitsText(info);
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

  if (refKind) {
    input = picker(id, refKind, info.nullable || !required);
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

export function renderFields(container, objectSchema, uid, paramPrefix, skip = new Set()) {
  const widgets = new Map();
  const required = new Set(objectSchema.required || []);
  container.replaceChildren();
  for (const [name, prop] of Object.entries(objectSchema.properties || {})) {
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

export function readWidgets(widgets, prefix, errors) {
  const out = {};
  for (const [name, widget] of widgets) {
    const value = widget.read();
    if (value.error) errors.push({ param: `${prefix}.${name}`, message: value.error });
    else if (value.set) out[name] = value.value;
  }
  return out;
}
