// A finished job: the before/after table, each stage's figures, the artifact's download
// (fetched with the key, checked against its sha256) and the chart of every job on the model.

import { request } from "./api.js";
import { renderChart } from "./chart.js";
import { $, announce, h } from "./dom.js";
import { fmtBytes, fmtCount, fmtNumber, fmtPercent } from "./format.js";

let finishedJob = null;  // the job whose results are shown: the one the download button fetches

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

export async function renderFinished(job) {
  finishedJob = job;
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

export async function downloadArtifact() {
  const job = finishedJob;
  if (!job?.artifact) return;
  const button = $("#job-download");
  const status = $("#job-download-state");
  button.disabled = true;
  status.textContent = "Downloading…";
  try {
    const response = await request(`/jobs/${encodeURIComponent(job.id)}/artifact`);
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
