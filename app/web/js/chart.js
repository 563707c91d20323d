// The chart of a job's model: perplexity after compression against artifact size, one point
// per succeeded job with a perplexity, the original model as a diamond. Plain SVG; the same
// points are in a table under it.

import { listAll } from "./api.js";
import { $, h, svg } from "./dom.js";
import { fmtBytes, fmtNumber, shortId, stagesSummary } from "./format.js";
import { modelName } from "./models.js";

/** Round ticks for [lo, hi], each with a label of as many decimals as the step needs. */
function ticks(lo, hi, count = 5) {
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

export async function renderChart(job) {
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
