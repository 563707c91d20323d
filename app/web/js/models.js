// The "Models & data" view (tables, uploads, delete) and the tenant's models and datasets as
// the other views need them: the pickers of the job form, a model's name beside its id.

import { api, listAll, uploadWithProgress } from "./api.js";
import { $, announce, flash, h } from "./dom.js";
import { fmtBytes, fmtCount, fmtDate } from "./format.js";
import { pagedTable } from "./paged-table.js";

/** Every model and dataset of the tenant (up to 500 each), as last fetched. */
export const catalog = { models: [], datasets: [] };

export async function refreshModels() {
  catalog.models = await listAll("/models", 500);
  return catalog.models;
}

export async function refreshDatasets() {
  catalog.datasets = await listAll("/datasets", 500);
  return catalog.datasets;
}

export function forgetCatalog() {
  catalog.models = [];
  catalog.datasets = [];
}

export function modelName(id) {
  const model = catalog.models.find((m) => m.id === id);
  return model ? model.name : id;
}

let loadModelsTable;
let loadDatasetsTable;

export async function renderModels() {
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

export async function renderDatasets() {
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

/** The two upload forms: the model's files (or a folder, or an archive), a dataset's file. */
export function bindUploads() {
  bindUpload("#model-upload", {
    path: "/models", fileField: "files", inputs: ["#model-files", "#model-folder"], noun: "Model",
    after: async () => { await renderModels(); await refreshModels(); },
  });
  bindUpload("#dataset-upload", {
    path: "/datasets", fileField: "file", inputs: ["#dataset-file"], noun: "Dataset",
    after: async () => { await renderDatasets(); await refreshDatasets(); },
  });
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
      error.textContent = "Choose a file to upload.";
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
      const created = await uploadWithProgress(path, data, (fraction, done) => {
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
