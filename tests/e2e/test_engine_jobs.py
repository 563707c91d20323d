"""The engine's methods through the service: a three-stage pipeline, structured pruning, and a
running job cancelled within seconds."""

from __future__ import annotations

import io
import tarfile
import time

import pytest
import torch

from tests.e2e.client import upload_dataset, upload_model, wait_for
from tests.factories import CORPUS, make_checkpoint, tokenizer


def _artifact(client, job, folder):
    response = client.get(f"/v1/jobs/{job['id']}/artifact")
    assert response.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(folder, filter="data")
    return folder


@pytest.fixture(scope="module")
def uploaded(pg_stack, tmp_path_factory):
    client = pg_stack.client
    return upload_model(client, make_checkpoint(tmp_path_factory.mktemp("m"))), upload_dataset(client)


def test_sparsegpt_distill_gptq_pipeline(pg_stack, uploaded, tmp_path):
    from worker.engine.loading import load_model
    from worker.evaluate import perplexity

    client = pg_stack.client
    model, dataset = uploaded
    job = client.post("/v1/jobs", json={
        "model_id": model["id"],
        "stages": [{"type": "prune", "method": "sparsegpt", "pattern": "2:4"},
                   {"type": "distill", "method": "kd", "dataset_id": dataset["id"], "steps": 6,
                    "batch_size": 2, "seq_len": 32, "eval_every": 3},
                   {"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32}],
        "calibration": {"dataset_id": dataset["id"], "samples": 8, "seq_len": 32},
        "evaluation": {"dataset_id": dataset["id"], "seq_len": 64}}).json()
    done = wait_for(client, job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, pg_stack.logs())
    names = [s["name"] for s in done["metrics"]["stages"]]
    assert names == ["prune.sparsegpt", "distill.kd", "quantize.gptq"]
    assert done["artifact"]["format"] == "compressed-tensors"

    loaded = load_model(_artifact(client, done, tmp_path / "a"), torch.device("cpu"))
    ids = torch.tensor(tokenizer()(CORPUS)["input_ids"])
    assert perplexity(loaded, ids, 64, 32, torch.device("cpu")) == pytest.approx(
        done["metrics"]["after"]["perplexity"], rel=1e-3)
    # The 2:4 pattern survived distillation and int4 quantization: every group of 4 inputs
    # holds at least 2 zeros.
    for name, module in loaded.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            groups = (module.weight == 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
            assert (groups >= 2).all(), name
    # Embeddings stay float32, so the whole model is well under half the bits, not an eighth.
    assert done["metrics"]["after"]["bits_per_weight"] < done["metrics"]["before"]["bits_per_weight"] / 2


def test_structured_pruning_job_makes_a_smaller_dense_model(pg_stack, uploaded, tmp_path):
    from transformers import AutoModelForCausalLM

    client = pg_stack.client
    model, dataset = uploaded
    job = client.post("/v1/jobs", json={
        "model_id": model["id"], "stages": [{"type": "prune", "method": "structured", "sparsity": 0.25}],
        "calibration": {"dataset_id": dataset["id"], "samples": 4, "seq_len": 32}}).json()
    done = wait_for(client, job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, pg_stack.logs())
    before, after = done["metrics"]["before"], done["metrics"]["after"]
    assert after["parameters"] < before["parameters"]
    loaded = AutoModelForCausalLM.from_pretrained(_artifact(client, done, tmp_path / "a"))
    assert sum(p.numel() for p in loaded.parameters()) == after["parameters"]
    assert loaded.config.n_inner == 192  # 256 MLP neurons, a quarter removed


def test_depth_pruning_then_distillation_makes_a_shallower_model_that_scores_as_reported(
        pg_stack, uploaded, tmp_path):
    from transformers import AutoModelForCausalLM

    from worker.evaluate import perplexity

    client = pg_stack.client
    model, dataset = uploaded
    job = client.post("/v1/jobs", json={
        "model_id": model["id"],
        "stages": [{"type": "prune", "method": "structured", "sparsity": 0.5, "targets": ["layers"]},
                   {"type": "distill", "method": "kd", "dataset_id": dataset["id"], "steps": 4,
                    "batch_size": 2, "seq_len": 32, "eval_every": 2}],
        "calibration": {"dataset_id": dataset["id"], "samples": 4, "seq_len": 32},
        "evaluation": {"dataset_id": dataset["id"], "seq_len": 64}}).json()
    done = wait_for(client, job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, pg_stack.logs())
    prune = done["metrics"]["stages"][0]
    assert prune["layers"] == 1 and len(prune["layers_removed"]) == 1
    assert done["metrics"]["stages"][1]["student_layers"] == 1

    loaded = AutoModelForCausalLM.from_pretrained(_artifact(client, done, tmp_path / "a")).eval()
    assert loaded.config.n_layer == 1 and len(loaded.transformer.h) == 1
    assert sum(p.numel() for p in loaded.parameters()) == done["metrics"]["after"]["parameters"]
    ids = torch.tensor(tokenizer()(CORPUS)["input_ids"])
    assert perplexity(loaded, ids, 64, 32, torch.device("cpu")) == pytest.approx(
        done["metrics"]["after"]["perplexity"], rel=1e-3)


def test_cancel_stops_a_running_job_between_steps(pg_stack, uploaded):
    client = pg_stack.client
    model, dataset = uploaded
    job = client.post("/v1/jobs", json={
        "model_id": model["id"], "stages": [{"type": "distill", "method": "kd", "dataset_id": dataset["id"],
                                             "steps": 1_000_000, "batch_size": 2, "seq_len": 32}]}).json()
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job['id']}").json()["stage"] != "distill.kd":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    done = wait_for(client, job["id"], timeout=120)
    # Stopped between steps, long before the million it was asked for.
    assert done["status"] == "cancelled" and done["progress"] < 0.5, done
    assert done["artifact"] is None
    assert client.get(f"/v1/jobs/{job['id']}/artifact").status_code == 409
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
