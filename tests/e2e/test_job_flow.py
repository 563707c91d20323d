"""The whole service through HTTP with a real Celery worker process: upload a tiny GPT-2,
prune half of every layer and store it as int8, poll, download, and check that the artifact is
what the report says. Runs on PostgreSQL + Redis and on the embedded default."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
import torch
from safetensors import safe_open

from tests.e2e.client import upload_dataset, upload_model, wait_for
from tests.factories import CORPUS, make_checkpoint, tokenizer

SPARSITY = 0.5


def _load_artifact(folder):
    from transformers import AutoModelForCausalLM

    # A plain from_pretrained, as a client would (compressed-tensors installed); int8 layers
    # come back as float weights holding exactly the dequantized values.
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_prune_quantize_job_end_to_end(stack, tmp_path):
    client = stack.client
    model = upload_model(client, make_checkpoint(tmp_path / "upload"))
    assert model["architecture"] == "GPT2LMHeadModel" and model["model_type"] == "gpt2"
    assert model["num_parameters"] == sum(p.numel() for p in _reference_model(tmp_path).parameters())
    assert client.get(f"/v1/models/{model['id']}").json()["sha256"] == model["sha256"]
    dataset = upload_dataset(client)

    spec = {
        "model_id": model["id"],
        "stages": [{"type": "prune", "method": "magnitude", "sparsity": SPARSITY},
                   {"type": "quantize", "method": "rtn", "bits": 8}],
        "calibration": {"dataset_id": dataset["id"], "samples": 4, "seq_len": 32},
        "evaluation": {"dataset_id": dataset["id"], "seq_len": 64, "stride": 32},
    }
    created = client.post("/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    assert created.json()["status"] in ("queued", "running")
    job = wait_for(client, created.json()["id"])
    assert job["status"] == "succeeded", (job, stack.logs())
    assert job["progress"] == 1.0 and job["started_at"] and job["finished_at"]
    listed = client.get("/v1/jobs", params={"limit": 1}).json()
    assert listed["data"][0]["id"] == job["id"]

    # The download is what the headers and the job say it is.
    response = client.get(job["artifact"]["url"])
    assert response.status_code == 200
    digest = hashlib.sha256(response.content).hexdigest()
    assert digest == response.headers["x-checksum-sha256"] == job["artifact"]["sha256"]
    assert int(response.headers["content-length"]) == job["artifact"]["size_bytes"] == len(response.content)
    folder = tmp_path / "artifact"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(folder, filter="data")

    metrics = job["metrics"]
    loaded = _load_artifact(folder)

    # Scores what the report says: perplexity recomputed on the downloaded model.
    from worker.evaluate import perplexity

    ids = torch.tensor(tokenizer()(CORPUS)["input_ids"])
    ppl = perplexity(loaded, ids, 64, 32, torch.device("cpu"))
    assert ppl == pytest.approx(metrics["after"]["perplexity"], rel=1e-3)
    assert metrics["before"]["perplexity"] > 1 and metrics["evaluation"]["tokens"] == ids.numel()

    # Exactly the requested sparsity in every pruned layer (int8 rounding keeps zeros zero).
    layers = [m for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert len(layers) == 8
    for layer in layers:
        zeros = int((layer.weight == 0).sum())
        assert zeros == round(SPARSITY * layer.weight.numel())
    assert metrics["after"]["sparsity"] == pytest.approx(SPARSITY, abs=1e-6)

    # int8 storage: quantized layers' bytes (weights + scales) at most 0.3 of their float32 bytes.
    quantized_bytes = float32_bytes = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            if tensor.dtype == torch.int8:
                quantized_bytes += tensor.numel() + handle.get_tensor(key + "_scale").nbytes
                float32_bytes += tensor.numel() * 4
    assert float32_bytes > 0 and quantized_bytes <= 0.3 * float32_bytes
    assert metrics["after"]["size_bytes"] < metrics["before"]["size_bytes"]
    assert metrics["after"]["bits_per_weight"] < metrics["before"]["bits_per_weight"]
    assert [s["name"] for s in metrics["stages"]] == ["prune.magnitude", "quantize.rtn"]
    assert all(s["wall_time_s"] >= 0 for s in metrics["stages"])


def _reference_model(tmp_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tmp_path / "upload")
