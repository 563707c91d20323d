// The one way to talk to /v1: the signed-in key, the error envelope, paging, uploads.
//
// The key lives in this tab's sessionStorage only. Any answer of 401 means the key was revoked
// or mistyped: it is forgotten and the handler given to whenKeyRefused (the sign-in page) runs.

const API = "/v1";
const KEY_STORAGE = "squeeze.apiKey";

export const session = { key: globalThis.sessionStorage?.getItem(KEY_STORAGE) ?? null };

let onKeyRefused = () => {};

export function whenKeyRefused(handler) {
  onKeyRefused = handler;
}

function keyRefused() {
  if (!session.key) return;
  forgetKey();
  onKeyRefused();
}

export function forgetKey() {
  session.key = null;
  sessionStorage.removeItem(KEY_STORAGE);
}

/** Keep `key` for this tab once the API accepts it; throws the API's error otherwise. */
export async function signInWith(key) {
  const response = await fetch(`${API}/models?limit=1`, { headers: { Authorization: `Bearer ${key}` } });
  if (!response.ok) throw await errorFrom(response);
  session.key = key;
  sessionStorage.setItem(KEY_STORAGE, key);
}

/** The API's error envelope ({error: {type, message, param, errors}}) as an exception. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.type = error?.type || "http_error";
    this.param = error?.param ?? null;
    this.errors = Array.isArray(error?.errors) ? error.errors : null;
  }
}

async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  return new ApiError(response.status, body?.error || { message: `HTTP ${response.status} ${response.statusText}` });
}

/** fetch() with the key: the Response when it is 2xx, else an ApiError (status 0: unreachable). */
export async function request(path, { method = "GET", json, headers = {}, signal, cache } = {}) {
  const sent = { Authorization: `Bearer ${session.key}`, ...headers };
  let body;
  if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(API + path, { method, headers: sent, body, signal, cache });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { type: "network_error", message: `Could not reach the API (${err.message})` });
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401) keyRefused();
    throw error;
  }
  return response;
}

/** request() for JSON answers: the parsed body (null for 204). */
export async function api(path, options = {}) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

/** One page of a list: {data, has_more}, `limit` items after the id `after`. */
export function listPage(path, { limit, after = null }) {
  const sep = path.includes("?") ? "&" : "?";
  return api(`${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
}

/** All pages of a list (newest first), at most `max` items. */
export async function listAll(path, max = 1000) {
  const items = [];
  let after = null;
  for (;;) {
    const page = await listPage(path, { limit: 100, after });
    items.push(...page.data);
    if (!page.has_more || !page.data.length || items.length >= max) return items;
    after = page.data[page.data.length - 1].id;
  }
}

/** POST multipart with upload progress (fetch cannot report it; XMLHttpRequest can).
 * onProgress(fraction, done): done once the last byte is sent and the server is checking. */
export function uploadWithProgress(path, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", API + path);
    xhr.setRequestHeader("Authorization", `Bearer ${session.key}`);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total, false);
    });
    xhr.upload.addEventListener("load", () => onProgress(1, true));
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
