// The "Jobs" view: every job of the tenant, newest first, refreshed while any is unfinished.

import { $, h } from "./dom.js";
import { fmtBytes, fmtDate, fmtNumber, shortId, stagesSummary } from "./format.js";
import { TERMINAL } from "./job-view.js";
import { modelName, refreshModels, catalog } from "./models.js";
import { pagedTable } from "./paged-table.js";

let refreshTimer = null;

export function stopJobsRefresh() {
  clearTimeout(refreshTimer);
}

function jobRow(job) {
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
}

export async function renderJobs() {
  if (!catalog.models.length) await refreshModels().catch(() => {});
  const status = $("#jobs-status").value;
  const load = pagedTable("#jobs-table", `/jobs${status ? `?status=${status}` : ""}`, jobRow);
  const jobs = await load(true);
  // While something is queued or running, refresh now and then (only while this view is shown).
  stopJobsRefresh();
  if (jobs.some((j) => !TERMINAL.has(j.status))) {
    refreshTimer = setTimeout(() => { if (!$("#view-jobs").hidden) renderJobs().catch(() => {}); }, 3000);
  }
}
