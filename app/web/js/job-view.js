// The view of one job, live: its status, stage and progress, and its event log, followed over
// the API's event stream (text/event-stream read with fetch, so the key goes in a header;
// EventSource cannot send one). A cut stream is reopened with Last-Event-ID: nothing is lost
// and nothing is shown twice.

import { ApiError, api, request } from "./api.js";
import { $, announce, flash, h } from "./dom.js";
import { fmtDate, stagesSummary } from "./format.js";
import { downloadArtifact, renderFinished } from "./job-results.js";
import { catalog, modelName, refreshModels } from "./models.js";

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

let stream = null;      // the AbortController of the event stream being followed
let currentJob = null;  // the job shown, as last read from the API

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
});

export function stopStream() {
  if (stream) stream.abort();
  stream = null;
  // A stale "Finished" must not describe the next job shown (or this one, shown again).
  $("#job-stream-state").textContent = "";
}

export async function openJob(id) {
  if (currentJob?.id === id && stream) return; // already following it
  stopStream();
  currentJob = null;
  $("#job-title").textContent = `Job ${id}`;
  $("#job-log").replaceChildren();
  $("#job-results").hidden = true;
  $("#job-chart").hidden = true;
  $("#job-error").textContent = "";
  $("#job-download-state").textContent = "";
  if (!catalog.models.length) await refreshModels().catch(() => {});
  const job = await api(`/jobs/${encodeURIComponent(id)}`);
  currentJob = job;
  renderJobHeader(job);
  const controller = new AbortController();
  stream = controller;
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
function sseParser(onEvent) {
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
      const headers = { Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = String(lastId);
      const response = await request(`/jobs/${encodeURIComponent(jobId)}/events/stream`, { headers, signal, cache: "no-store" });
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

/** Handle one job event; true when it was the job's final status. */
function onJobEvent(type, event) {
  const data = event.data || {};
  const time = new Date(event.created_at);
  const item = h("li", { class: `log-${type}`, "data-event-id": event.id },
    h("time", { datetime: event.created_at }, Number.isNaN(time.getTime()) ? "" : time.toLocaleTimeString()),
    h("span", { class: `tag tag-${type}` }, type),
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

export function bindJobView() {
  $("#job-cancel").addEventListener("click", cancelJob);
  $("#job-download").addEventListener("click", downloadArtifact);
}
