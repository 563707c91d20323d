// Squeeze web client: plain ES modules, no build step, no dependencies. This file signs in and
// routes (#/models, #/new, #/jobs, #/jobs/<id>); each view lives in its own module under js/:
//
//   api.js          the one way to talk to /v1 (key, error envelope, paging, uploads)
//   models.js       "Models & data" (tables, uploads) and the tenant's models and datasets
//   schema-form.js  inputs generated from /openapi.json, pickers for "x-squeeze-ref" fields
//   job-form.js     "New job": the form and its JSON / YAML text (yaml.js reads the YAML)
//   job-list.js     "Jobs"
//   job-view.js     one job, live; job-results.js and chart.js once it has finished

import { forgetKey, session, signInWith, whenKeyRefused } from "./js/api.js";
import { $, $$, announce, clearFlash, flash } from "./js/dom.js";
import { bindJobForm, openJobForm } from "./js/job-form.js";
import { renderJobs, stopJobsRefresh } from "./js/job-list.js";
import { bindJobView, openJob, stopStream } from "./js/job-view.js";
import { bindUploads, forgetCatalog, renderDatasets, renderModels } from "./js/models.js";

let afterSignIn = null;  // the address to return to after signing in again

// ------------------------------------------------------------------------------------------
// Signing in

function showSignIn(message = "") {
  $("#nav").hidden = true;
  $("#session").hidden = true;
  showView("signin");
  $("#signin-error").textContent = message;
}

whenKeyRefused(() => {
  afterSignIn = location.hash;
  stopStream();
  showSignIn("The API refused this key (revoked, or mistyped). Sign in again.");
});

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
    await signInWith(key);
    input.value = "";
    input.removeAttribute("aria-invalid");
    onSignedIn();
    announce("Signed in");
    const target = afterSignIn && afterSignIn !== "#/signin" ? afterSignIn : "#/models";
    afterSignIn = null;
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
  $("#session-key").textContent = `Signed in with ${session.key.slice(0, 8)}…`;
}

function signOut() {
  stopStream();
  forgetKey();
  forgetCatalog();
  clearFlash();
  showSignIn("Signed out.");
  history.replaceState(null, "", "#/signin");
  $("#api-key").focus();
}

// ------------------------------------------------------------------------------------------
// Views and routing

const TITLES = { signin: "Sign in", models: "Models & data", new: "New job", jobs: "Jobs", job: "Job", notfound: "Not found" };

let firstShow = true;

function showView(name) {
  for (const view of $$(".view")) view.hidden = view.id !== `view-${name}`;
  for (const link of $$("#nav a")) {
    if (link.dataset.nav === name || (name === "job" && link.dataset.nav === "jobs")) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${TITLES[name] || name} · Squeeze`;
  // After a navigation, focus goes to the new view's heading (screen readers read it); on the
  // first load it stays at the top of the page, where the skip link is.
  if (!firstShow) $(`#view-${name} h2`)?.focus({ preventScroll: false });
  firstShow = false;
}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query) };
}

async function route() {
  stopJobsRefresh();
  if (!session.key) {
    if (location.hash && location.hash !== "#/signin") afterSignIn = location.hash;
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
// Start

$("#signin-form").addEventListener("submit", signIn);
$("#sign-out").addEventListener("click", signOut);
$(".flash-close").addEventListener("click", clearFlash);
$("#models-refresh").addEventListener("click", () => renderModels().catch((e) => flash(e.message)));
$("#datasets-refresh").addEventListener("click", () => renderDatasets().catch((e) => flash(e.message)));
$("#jobs-refresh").addEventListener("click", () => renderJobs().catch((e) => flash(e.message)));
$("#jobs-status").addEventListener("change", () => renderJobs().catch((e) => flash(e.message)));
bindUploads();
bindJobForm();
bindJobView();
window.addEventListener("hashchange", () => { clearFlash(); route(); });
route();
