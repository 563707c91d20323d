"""The web client (app/web) in a real browser: Debian's Chromium driven by Playwright, against
the live API and Celery worker on PostgreSQL + Redis.

One walk through the issue's features, a screenshot of each step under test-output/web/: sign
in, upload a model and a dataset, compose a prune + quantize job with the form (the API's
validation message shown next to the field it names), watch it live until it succeeds, read the
before/after table and the chart of every job on the model, and download the artifact with the
checksum the API reports.

Needs /usr/bin/chromium (``apt-get install -y chromium``) and the ``playwright`` pip package;
Playwright's own browser download is never used. Skipped when either is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("SQUEEZE_TEST_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (or set SQUEEZE_TEST_CHROMIUM)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed: pip install playwright (in the test extra)")
expect = sync_api.expect

from tests.e2e.client import upload_dataset, upload_model, wait_for  # noqa: E402
from tests.factories import CORPUS, make_checkpoint  # noqa: E402

SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "web"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
JOB_TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1366, "height": 860}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.problems = []  # uncaught exceptions and console errors, checked at the end
    page.on("pageerror", lambda exc: page.problems.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and "Failed to load resource" not in msg.text
            and page.problems.append(f"console: {msg.text}"))
    yield page
    context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_sign_in_upload_compose_watch_compare_and_download(pg_stack, page, tmp_path):
    stack = pg_stack
    timings = {}
    started = time.monotonic()

    # -- sign in ---------------------------------------------------------------------------
    page.goto(stack.url + "/")
    expect(page).to_have_url(re.compile(r"/ui/"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.keyboard.press("Tab")  # the first stop is the skip link, shown on focus
    expect(page.locator(".skip-link")).to_be_focused()
    page.get_by_label("API key").fill("sqz_not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("refused")
    shot(page, "01-signin-refused")
    page.get_by_label("API key").fill(stack.admin_key)
    page.get_by_label("API key").press("Enter")
    expect(page.get_by_role("heading", name="Models & data")).to_be_visible()
    # The key lives in this tab's sessionStorage, nowhere else.
    assert page.evaluate("sessionStorage.getItem('squeeze.apiKey')") == stack.admin_key
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""

    # -- upload a model and a dataset ------------------------------------------------------
    folder = make_checkpoint(tmp_path / "tiny-gpt2")
    page.set_input_files("#model-files", [str(p) for p in sorted(folder.iterdir()) if p.is_file()])
    page.fill("#model-name", "web-tiny-gpt2")
    page.get_by_role("button", name="Upload model").click()
    expect(page.locator("#model-upload .progress-text")).to_contain_text("Done", timeout=120_000)
    assert page.eval_on_selector("#model-progress", "el => el.value") == 1
    models = stack.client.get("/v1/models", params={"limit": 100}).json()["data"]
    model = next(m for m in models if m["name"] == "web-tiny-gpt2")
    row = page.locator(f'#models-table tr[data-model-id="{model["id"]}"]')
    expect(row).to_contain_text("GPT2LMHeadModel")
    expect(row).to_contain_text("web-tiny-gpt2")
    # Parameter count and size, as the API reports them (formatted, exact value in the title).
    expect(row.locator("td").nth(1)).to_have_attribute("title", str(model["num_parameters"]))
    expect(row.locator("td").nth(2)).to_have_attribute("title", f'{model["size_bytes"]} bytes')

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    page.set_input_files("#dataset-file", str(corpus))
    page.fill("#dataset-name", "web-corpus")
    page.get_by_role("button", name="Upload dataset").click()
    expect(page.locator("#dataset-upload .progress-text")).to_contain_text("Done", timeout=60_000)
    datasets = stack.client.get("/v1/datasets", params={"limit": 100}).json()["data"]
    dataset = next(d for d in datasets if d["name"] == "web-corpus")
    expect(page.locator(f'#datasets-table tr[data-dataset-id="{dataset["id"]}"]')).to_be_visible()
    shot(page, "02-models-and-data")
    timings["sign in + uploads"] = time.monotonic() - started

    # A second job on the same model, through the API, so the chart has two points.
    other = stack.client.post("/v1/jobs", json={
        "model_id": model["id"], "stages": [{"type": "prune", "method": "random", "sparsity": 0.3}],
        "evaluation": {"dataset_id": dataset["id"], "seq_len": 64}})
    assert other.status_code == 201, other.text

    # -- compose the job with the form (generated from /openapi.json) ----------------------
    page.get_by_role("link", name="New job", exact=True).click()
    expect(page.get_by_role("heading", name="New job")).to_be_visible()
    page.select_option("#job-model", model["id"])
    first = page.locator("#stage-list > li").nth(0)
    first.get_by_label("Method").select_option("prune.magnitude")
    # Only the chosen method's fields, with their defaults and limits from the schema.
    expect(first.get_by_label("Scope")).to_have_value("layer")
    expect(first.locator('[data-field="sparsity"] .help')).to_contain_text("0 < value < 1")
    expect(first.locator('[data-field="bits"]')).to_have_count(0)
    first.get_by_label("Sparsity").fill("1.5")  # out of range: the API says so, next to the field
    page.get_by_role("button", name="Add stage").click()
    second = page.locator("#stage-list > li").nth(1)
    second.get_by_label("Method").select_option("quantize.rtn")
    expect(second.locator('[data-field="sparsity"]')).to_have_count(0)
    second.get_by_label("Bits").select_option("8")
    evaluation = page.locator("#evaluation-fields")
    evaluation.get_by_label("Dataset Id").select_option(dataset["id"])
    evaluation.get_by_label("Seq Len").fill("64")
    page.locator("#job-form").get_by_role("button", name="Submit job").click()
    error = first.locator('[data-params~="stages.0.sparsity"] > .field-error')
    expect(error).to_contain_text("less than 1")
    expect(first.get_by_label("Sparsity")).to_have_attribute("aria-invalid", "true")
    expect(first.get_by_label("Sparsity")).to_be_focused()
    shot(page, "03-job-form-api-error")

    first.get_by_label("Sparsity").fill("0.5")
    page.locator("#job-form").get_by_role("button", name="Submit job").click()
    expect(page).to_have_url(re.compile(r"#/jobs/job_"), timeout=30_000)
    job_id = page.url.rsplit("/", 1)[1]
    submitted = stack.client.get(f"/v1/jobs/{job_id}").json()
    stages = submitted["spec"]["stages"]
    assert [(s["type"], s["method"]) for s in stages] == [("prune", "magnitude"), ("quantize", "rtn")]
    assert submitted["spec"]["stages"][0]["sparsity"] == 0.5 and submitted["spec"]["stages"][1]["bits"] == 8
    assert submitted["spec"]["evaluation"]["dataset_id"] == dataset["id"]

    # -- watch it live ---------------------------------------------------------------------
    live_started = time.monotonic()
    expect(page.locator("#job-status")).to_have_text(re.compile(r"queued|running|succeeded"))
    expect(page.locator("#job-log li").first).to_be_visible()
    if page.locator("#job-status").inner_text() in ("queued", "running"):
        expect(page.get_by_role("button", name="Cancel job")).to_be_visible()
    page.wait_for_selector("#job-log li.log-stage", timeout=JOB_TIMEOUT_MS)
    shot(page, "04-job-live")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
    timings["job live to succeeded"] = time.monotonic() - live_started
    expect(page.locator("#job-stream-state")).to_have_text("Finished")
    assert page.eval_on_selector("#job-progress", "el => el.value") == 1
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    statuses = page.locator("#job-log li.log-status .message").all_inner_texts()
    assert statuses[0] == "job queued" and statuses[-1].startswith("job succeeded"), statuses
    stages = [t.removesuffix(" started") for t in page.locator("#job-log li.log-stage .message").all_inner_texts()]
    assert stages == ["load", "evaluate.before", "prune.magnitude", "quantize.rtn", "export", "evaluate.after"]
    # Each event once, in order, as the API's paged log has them.
    shown = [int(i) for i in page.locator("#job-log li").evaluate_all("els => els.map(e => e.dataset.eventId)")]
    logged = stack.client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert shown == [e["id"] for e in logged]

    # -- before / after --------------------------------------------------------------------
    job = stack.client.get(f"/v1/jobs/{job_id}").json()
    table = page.locator("#metrics-table")
    for key in ("size_bytes", "sparsity", "bits_per_weight", "perplexity", "latency_ms_per_token"):
        row = table.locator(f'tr[data-metric="{key}"]')
        expect(row).to_be_visible()
        cells = row.locator("td")  # the exact value is each cell's title
        assert float(cells.nth(0).get_attribute("title")) == pytest.approx(job["metrics"]["before"][key])
        assert float(cells.nth(1).get_attribute("title")) == pytest.approx(job["metrics"]["after"][key])
    expect(table.locator('tr[data-metric="sparsity"] td').nth(1)).to_contain_text("%")
    shot(page, "05-job-succeeded")

    # -- the chart: a point per job on this model with a perplexity ------------------------
    other_job = wait_for(stack.client, other.json()["id"], timeout=JOB_TIMEOUT_MS / 1000)
    assert other_job["status"] == "succeeded", stack.logs()
    expected = [j for j in stack.client.get("/v1/jobs", params={"model_id": model["id"], "status": "succeeded",
                                                                "limit": 100}).json()["data"]
                if j["metrics"]["after"].get("perplexity") is not None]
    assert len(expected) == 2
    page.reload()  # the other job may have finished after this page drew its chart
    points = page.locator("#chart svg circle.job-point")
    expect(points).to_have_count(len(expected))
    assert sorted(points.evaluate_all("els => els.map(e => e.dataset.jobId)")) == sorted(j["id"] for j in expected)
    current = page.locator(f'#chart svg circle.job-point.current[data-job-id="{job_id}"]')
    expect(current.locator("title")).to_contain_text(job_id)
    expect(current.locator("title")).to_contain_text("perplexity")
    expect(page.locator("#chart svg .axis-label")).to_have_text(
        ["Artifact size (artifact.size_bytes)", "Perplexity after (lower is better)"])
    page.locator("#job-chart").scroll_into_view_if_needed()
    current.hover()
    page.locator("#job-chart").screenshot(path=str(SHOTS / "06-chart.png"))

    # -- download: fetch with the key, saved as a file, checksum as the API reports it -----
    with page.expect_download(timeout=60_000) as info:
        page.get_by_role("button", name="Download artifact").click()
    saved = tmp_path / "artifact.tar"
    info.value.save_as(saved)
    assert info.value.suggested_filename == f"{job_id}.tar"
    digest = hashlib.sha256(saved.read_bytes()).hexdigest()
    assert digest == job["artifact"]["sha256"]
    assert saved.stat().st_size == job["artifact"]["size_bytes"]
    expect(page.locator("#artifact-sha256")).to_have_text(job["artifact"]["sha256"])
    expect(page.locator("#job-download-state")).to_contain_text("matches")
    shot(page, "07-downloaded")

    # -- the jobs list ---------------------------------------------------------------------
    page.get_by_role("link", name="Jobs", exact=True).click()
    expect(page.locator(f'#jobs-table tr[data-job-id="{job_id}"]')).to_contain_text("succeeded")
    shot(page, "08-jobs")

    timings["total"] = time.monotonic() - started
    print("web client timings (s):", {k: round(v, 1) for k, v in timings.items()})
    assert page.problems == []


def test_yaml_spec_errors_are_listed_and_load_into_the_form(pg_stack, page):
    page.goto(stack_url := pg_stack.url + "/ui/")
    page.get_by_label("API key").fill(pg_stack.admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Models & data")).to_be_visible()
    page.goto(stack_url + "#/new")
    expect(page.get_by_role("heading", name="New job")).to_be_visible()
    page.get_by_role("tab", name="JSON / YAML").click()
    page.get_by_label("Job spec (JSON, or YAML)").fill(
        "# a YAML spec\n"
        "model_id: mdl_does_not_matter\n"
        "stages:\n"
        "  - type: prune\n"
        "    method: magnitude\n"
        "    sparsity: 2        # out of range\n"
        "  - {type: quantize, method: rtn, bits: 8}\n")
    page.locator("#job-text-form").get_by_role("button", name="Submit job").click()
    errors = page.locator("#job-text-form .form-error")
    expect(errors).to_contain_text("stages.0.sparsity")
    expect(errors).to_contain_text("less than 1")
    shot(page, "09-yaml-error")
    # The same spec in the form: two stages, the values in their fields.
    page.get_by_role("button", name="Load into form").click()
    expect(page.get_by_role("tab", name="Form")).to_have_attribute("aria-selected", "true")
    stages = page.locator("#stage-list > li")
    expect(stages).to_have_count(2)
    expect(stages.nth(0).get_by_label("Sparsity")).to_have_value("2")
    expect(stages.nth(1).get_by_label("Method")).to_have_value("quantize.rtn")
    # Bad YAML is refused in the browser, with its line.
    page.get_by_role("tab", name="JSON / YAML").click()
    page.get_by_label("Job spec (JSON, or YAML)").fill("model_id: x\nstages:\n  - type: prune\n   method: magnitude\n")
    page.locator("#job-text-form").get_by_role("button", name="Submit job").click()
    expect(errors).to_contain_text("YAML line")
    assert page.problems == []


def _references(openapi: dict, schema: dict) -> dict[str, tuple[str, bool]]:
    """{field: (kind, optional)} for the properties of `schema` marked "x-squeeze-ref", where
    the mark sits on the property or, when it is nullable, on its non-null variant."""

    def resolve(node):
        while "$ref" in node:
            target = openapi
            for key in node["$ref"].removeprefix("#/").split("/"):
                target = target[key]
            node = target
        return node

    schema = resolve(schema)
    found = {}
    for name, prop in schema.get("properties", {}).items():
        variants = [resolve(v) for v in prop.get("anyOf", [])] or [resolve(prop)]
        kinds = [v["x-squeeze-ref"] for v in variants if "x-squeeze-ref" in v]
        if kinds:
            nullable = any(v.get("type") == "null" for v in variants)
            found[name] = (kinds[0], nullable or name not in schema.get("required", []))
    return found


def test_every_field_that_names_a_dataset_or_model_is_a_picker(pg_stack, page, tmp_path):
    client = pg_stack.client
    model = upload_model(client, make_checkpoint(tmp_path / "m"), name="picker-model")
    dataset = upload_dataset(client)
    openapi = client.get("/openapi.json").json()
    spec = openapi["components"]["schemas"]["JobSpec"]
    stage_refs = {}
    for variant in spec["properties"]["stages"]["items"]["oneOf"]:
        variant = openapi["components"]["schemas"][variant["$ref"].rsplit("/", 1)[1]]
        tag = f'{variant["properties"]["type"]["const"]}.{variant["properties"]["method"]["const"]}'
        stage_refs[tag] = _references(openapi, variant)
    section_refs = {name: _references(openapi, next(v for v in spec["properties"][name]["anyOf"] if "$ref" in v))
                    for name in ("calibration", "evaluation")}
    # The schema marks them (app/specs.py); the client must find every one without a list of its own.
    assert stage_refs["distill.kd"] == {"dataset_id": ("dataset", False), "teacher_model_id": ("model", True),
                                        "student_model_id": ("model", True)}
    assert section_refs == {"calibration": {"dataset_id": ("dataset", False)},
                            "evaluation": {"dataset_id": ("dataset", False)}}
    assert _references(openapi, spec)["model_id"] == ("model", False)

    page.goto(f"{pg_stack.url}/ui/")
    page.get_by_label("API key").fill(pg_stack.admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Models & data")).to_be_visible()
    page.goto(f"{pg_stack.url}/ui/#/new")
    expect(page.get_by_role("heading", name="New job")).to_be_visible()
    ids = {"dataset": dataset["id"], "model": model["id"]}

    def check(container, refs):
        # Exactly the marked fields are pickers, each listing the tenant's objects of its kind.
        pickers = container.locator("select[data-ref]")
        expect(pickers).to_have_count(len(refs))
        for name, (kind, optional) in refs.items():
            select = container.locator(f'[data-field="{name}"] select')
            expect(select).to_have_attribute("data-ref", kind)
            values = select.locator("option").evaluate_all("els => els.map(e => e.value)")
            assert ids[kind] in values, (name, values)
            assert (values[0] == "") == optional, (name, values)

    expect(page.locator("#job-model")).to_have_attribute("data-ref", "model")
    expect(page.locator(f'#job-model option[value="{model["id"]}"]')).to_have_count(1)  # the form is built
    stage = page.locator("#stage-list > li").nth(0)
    for tag, refs in stage_refs.items():
        stage.get_by_label("Method").select_option(tag)
        check(stage, refs)
    page.locator("#use-calibration").check()
    for name, refs in section_refs.items():
        check(page.locator(f"#{name}-fields"), refs)

    # A distillation composed with its pickers is accepted as the spec the API reads.
    stage.get_by_label("Method").select_option("distill.kd")
    stage.locator('[data-field="dataset_id"] select').select_option(dataset["id"])
    stage.locator('[data-field="teacher_model_id"] select').select_option(model["id"])
    page.locator("#job-form").get_by_role("button", name="Edit as JSON").click()
    written = json.loads(page.locator("#job-text").input_value())
    assert written["stages"][0]["dataset_id"] == dataset["id"]
    assert written["stages"][0]["teacher_model_id"] == model["id"]
    assert "student_model_id" not in written["stages"][0]  # "(none)": left to the API's default
    page.get_by_role("tab", name="Form").click()
    shot(page, "11-job-form-pickers")

    # An id the tenant does not have (pasted): the API's 404 names the field, shown at its picker.
    for param, spec in [("model_id", {**written, "model_id": "mdl_gone"}),
                        ("stages.0.teacher_model_id",
                         {**written, "stages": [{**written["stages"][0], "teacher_model_id": "mdl_gone"}]})]:
        page.get_by_role("tab", name="JSON / YAML").click()
        page.locator("#job-text").fill(json.dumps(spec))
        page.get_by_role("button", name="Load into form").click()
        page.locator("#job-form").get_by_role("button", name="Submit job").click()
        holder = page.locator(f'#job-form [data-params~="{param}"]')
        expect(holder.locator("> .field-error")).to_contain_text("no model 'mdl_gone'")
        expect(holder.locator("select")).to_have_attribute("aria-invalid", "true")
        expect(holder.locator("select")).to_have_value("mdl_gone")
    page.locator("#job-model").select_option(model["id"])
    stage.locator('[data-field="teacher_model_id"] select').select_option(model["id"])

    # A dataset uploaded meanwhile is in the pickers the next time the form is opened.
    later = upload_dataset(client, filename="later.txt")
    page.get_by_role("link", name="Jobs", exact=True).click()
    page.get_by_role("link", name="New job", exact=True).click()
    expect(stage.locator(f'[data-field="dataset_id"] option[value="{later["id"]}"]')).to_have_count(1)
    expect(stage.locator('[data-field="teacher_model_id"] select')).to_have_value(model["id"])
    assert page.problems == []


def test_cancel_button_stops_a_job_and_the_live_view_says_so(pg_stack, page, tmp_path):
    client = pg_stack.client
    model = upload_model(client, make_checkpoint(tmp_path / "m"))
    dataset = upload_dataset(client)
    # The worker runs one job at a time: B waits behind A (a slow evaluation: a window of 8
    # tokens moved two tokens at a time). B cannot finish before the click, queued or running
    # (a fast worker may have started it): a million distillation steps, stopped at the next.
    slow = client.post("/v1/jobs", json={"model_id": model["id"],
                                         "stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.2}],
                                         "evaluation": {"dataset_id": dataset["id"], "seq_len": 8, "stride": 2}})
    target = client.post("/v1/jobs", json={"model_id": model["id"], "stages": [
        {"type": "distill", "method": "kd", "dataset_id": dataset["id"], "steps": 1_000_000, "batch_size": 2,
         "seq_len": 32}]})
    assert slow.status_code == 201 and target.status_code == 201
    job_id = target.json()["id"]
    page.goto(f"{pg_stack.url}/ui/")
    page.get_by_label("API key").fill(pg_stack.admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Models & data")).to_be_visible()
    page.goto(f"{pg_stack.url}/ui/#/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text(re.compile("queued|running"))
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#job-log li.log-status .message").last).to_contain_text("cancelled")
    expect(page.get_by_role("button", name=re.compile("Cancel"))).to_be_hidden()
    expect(page.locator("#job-results")).to_be_hidden()
    shot(page, "10-job-cancelled")
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    # A is of no further use: cancelled too (it stops at its next layer), not waited for.
    assert client.post(f"/v1/jobs/{slow.json()['id']}/cancel").status_code in (200, 409)

    # A stream cut before the final status is reopened with Last-Event-ID: nothing is lost and
    # nothing is shown twice. The first answer is cut after the first event.
    events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert len(events) >= 2
    asked_with = []

    def cut_first_stream(route):
        asked_with.append(route.request.headers.get("last-event-id"))
        if len(asked_with) > 1:
            return route.continue_()
        first = events[0]
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"},
                      body=f"id: {first['id']}\nevent: {first['type']}\ndata: {json.dumps(first)}\n\n")

    page.route("**/events/stream*", cut_first_stream)
    page.get_by_role("link", name="Jobs", exact=True).click()
    # Leaving the job view ends its stream and clears its state line, so the "Finished" below
    # can only come from the new stream (the hash change is handled asynchronously).
    expect(page.locator("#view-jobs")).to_be_visible()
    expect(page.locator("#job-stream-state")).to_have_text("")
    page.goto(f"{pg_stack.url}/ui/#/jobs/{job_id}")
    expect(page.locator("#job-stream-state")).to_have_text("Finished", timeout=30_000)
    assert asked_with[:2] == [None, str(events[0]["id"])]
    shown = page.locator("#job-log li").evaluate_all("els => els.map(e => Number(e.dataset.eventId))")
    assert shown == [e["id"] for e in events]
    assert page.problems == []
