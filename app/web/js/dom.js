// Small DOM helpers every view uses: element builders, the flash message, the live region.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

/** h("button", {class: "x", onclick: fn}, "text", child) */
export function h(tag, attrs = {}, ...children) {
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

const SVG_NS = "http://www.w3.org/2000/svg";

/** h() for SVG elements, which need their namespace and take every attribute as a string. */
export function svg(tag, attrs = {}, ...children) {
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
export function richText(text) {
  const parts = String(text || "").replace(/::(\s)/g, ":$1").replace(/::$/, ":").split(/``([^`]+)``/);
  return parts.map((part, i) => (i % 2 ? h("code", {}, part) : part));
}

/** Said by screen readers (navigation, uploads, submitted jobs); emptied first so a repeated
 * message is read again. */
export function announce(message) {
  const region = $("#announcer");
  region.textContent = "";
  requestAnimationFrame(() => { region.textContent = message; });
}

export function flash(message, kind = "error") {
  const box = $("#flash");
  box.className = `flash ${kind}`;
  $(".flash-text", box).textContent = message;
  box.hidden = false;
}

export function clearFlash() {
  $("#flash").hidden = true;
}
