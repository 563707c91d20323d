"""Bad input through HTTP: a clear 4xx naming the field at fault, and nothing stored.

Hostile uploads (pickles, escaping archives, remote code, lying headers) have their own home,
test_hostile_input.py; this file keeps the everyday mistakes: bad job specs, missing objects,
bad datasets, NUL bytes in any field.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.client import upload_dataset, upload_model
from tests.factories import checkpoint_files, make_checkpoint


def _stored(stack) -> tuple[int, set[str], set[str]]:
    models = stack.client.get("/v1/models", params={"limit": 100}).json()["data"]
    return len(models), _names(stack.storage_root / "models"), _names(stack.storage_root / "tmp")


def _names(folder) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    return checkpoint_files(make_checkpoint(tmp_path_factory.mktemp("good")))


def _assert_refused(stack, response, status, *words, param):
    before = getattr(stack, "_before", None)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    for word in words:
        assert word in error["message"].lower(), error["message"]
    if before is not None:
        assert _stored(stack) == before


@pytest.fixture
def snapshot(stack):
    stack._before = _stored(stack)
    yield stack
    stack._before = None


def test_bad_stage_is_422_naming_the_field_and_creates_no_job(snapshot, tmp_path):
    model = upload_model(snapshot.client, make_checkpoint(tmp_path / "m"))
    snapshot._before = _stored(snapshot)
    response = snapshot.client.post("/v1/jobs", json={
        "model_id": model["id"], "stages": [{"type": "prune", "method": "alchemy", "sparsity": 0.5}]})
    _assert_refused(snapshot, response, 422, "unknown stage", param="stages.0.method")
    response = snapshot.client.post("/v1/jobs", json={
        "model_id": model["id"], "stages": [{"type": "prune", "method": "magnitude", "sparsity": 1.5}]})
    _assert_refused(snapshot, response, 422, "less than 1", param="stages.0.sparsity")
    assert snapshot.client.get("/v1/jobs", params={"model_id": model["id"]}).json()["data"] == []


def test_job_on_missing_model_is_404(snapshot):
    response = snapshot.client.post("/v1/jobs", json={
        "model_id": "mdl_doesnotexist", "stages": [{"type": "quantize", "method": "rtn"}]})
    _assert_refused(snapshot, response, 404, "no model", param="model_id")


def test_job_on_missing_dataset_is_404(snapshot, tmp_path):
    model = upload_model(snapshot.client, make_checkpoint(tmp_path / "m"))
    snapshot._before = _stored(snapshot)
    response = snapshot.client.post("/v1/jobs", json={
        "model_id": model["id"], "stages": [{"type": "quantize", "method": "rtn"}],
        "evaluation": {"dataset_id": "ds_nope"}})
    _assert_refused(snapshot, response, 404, "no dataset", param="evaluation.dataset_id")


@pytest.mark.parametrize("key, value", [("attn_implementation", "flash_attention_2"),
                                        ("quantization_config", {"quant_method": "bitsandbytes"})])
def test_config_choosing_how_to_load_is_422_naming_the_field(snapshot, tmp_path, key, value):
    folder = make_checkpoint(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    files = [("files", item) for item in checkpoint_files(folder)]
    response = snapshot.client.post("/v1/models", files=files)
    _assert_refused(snapshot, response, 422, f"config.json: {key}", param="files")


def test_bad_datasets_are_refused(stack):
    before = stack.client.get("/v1/datasets").json()["data"]
    for filename, body, word in [("data.jsonl", b'{"text": "ok"}\nnot json\n', "line 2"),
                                 ("data.jsonl", b'{"content": "x"}\n', "text"),
                                 ("data.txt", b"\xff\xfe\x00bad", "utf-8"),
                                 ("data.csv", b"a,b", ".txt")]:
        response = stack.client.post("/v1/datasets", files={"file": (filename, body)})
        assert response.status_code == 400, response.text
        assert word in response.json()["error"]["message"].lower()
        assert response.json()["error"]["param"] == "file"
    assert stack.client.get("/v1/datasets").json()["data"] == before


def test_cancel_and_artifact_of_a_missing_job_are_404(stack):
    # A finished job's cancel (409) is tested with a real job in test_engine_jobs.py.
    response = stack.client.post("/v1/jobs/job_nope/cancel")
    assert response.status_code == 404 and response.json()["error"]["param"] == "job_id"
    response = stack.client.get("/v1/jobs/job_nope/artifact")
    assert response.status_code == 404 and response.json()["error"]["param"] == "job_id"


def test_model_and_dataset_delete(stack, tmp_path):
    model = upload_model(stack.client, make_checkpoint(tmp_path / "m"))
    dataset = upload_dataset(stack.client)
    assert stack.client.delete(f"/v1/models/{model['id']}").json()["deleted"] is True
    assert stack.client.get(f"/v1/models/{model['id']}").status_code == 404
    assert not (stack.storage_root / "models" / model["id"]).exists()
    assert stack.client.delete(f"/v1/datasets/{dataset['id']}").status_code == 200
    assert stack.client.get(f"/v1/datasets/{dataset['id']}").status_code == 404


NUL = "a\x00b"


@pytest.mark.parametrize("case", ["model name", "dataset name", "model metadata", "job metadata",
                                  "job model_id", "path id", "list filter"])
def test_nul_bytes_anywhere_are_a_4xx_naming_the_field(pg_stack, good_files, case):
    # PostgreSQL cannot store or even compare a NUL in text: it must be refused before the query.
    client = pg_stack.client
    if case == "model name":
        response = client.post("/v1/models", files=[("files", f) for f in good_files], data={"name": NUL})
        expected = (422, "name")
    elif case == "dataset name":
        response = client.post("/v1/datasets", files={"file": ("c.txt", b"some text")}, data={"name": NUL})
        expected = (422, "name")
    elif case == "model metadata":
        response = client.post("/v1/models", files=[("files", f) for f in good_files],
                               data={"metadata": json.dumps({"team": NUL})})
        expected = (422, "metadata")
    elif case == "job metadata":
        response = client.post("/v1/jobs", json={"model_id": "mdl_x", "metadata": {NUL: "v"},
                                                 "stages": [{"type": "prune", "method": "random", "sparsity": 0.1}]})
        expected = (422, "metadata")
    elif case == "job model_id":
        response = client.post("/v1/jobs", json={"model_id": NUL,
                                                 "stages": [{"type": "prune", "method": "random", "sparsity": 0.1}]})
        expected = (422, "model_id")
    elif case == "path id":
        response = client.get("/v1/models/mdl%00x")
        expected = (404, "model_id")
    else:
        response = client.get("/v1/jobs", params={"metadata[team]": NUL})
        expected = (422, "metadata[team]")
    assert response.status_code == expected[0], response.text
    error = response.json()["error"]
    assert error["param"] == expected[1], error
