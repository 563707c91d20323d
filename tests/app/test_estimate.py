"""The pre-flight estimate as a pure function: it grows with what makes a job bigger, and one
small case computed by hand term by term pins every formula it uses."""

from __future__ import annotations

import pytest

from app.services import estimate as estimate_module
from app.services.estimate import GiB, MiB, ModelFacts, estimate_job, weight_bytes_per_parameter
from app.specs import JobSpec

LLAMA = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 5632,
         "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
         "max_position_embeddings": 4096}


def llama(params: int = 720_000_000, **config) -> ModelFacts:
    return ModelFacts(num_parameters=params, size_bytes=2 * params, dtype="bfloat16", config={**LLAMA, **config})


def spec(*stages: dict, **sections) -> JobSpec:
    return JobSpec.model_validate({"model_id": "mdl_1", "stages": list(stages), **sections})


GPTQ = {"type": "quantize", "method": "gptq", "bits": 4}


def calibration(samples: int = 16, seq_len: int = 256) -> dict:
    return {"dataset_id": "ds_1", "samples": samples, "seq_len": seq_len}


def distill(**fields) -> dict:
    return {"type": "distill", "method": "kd", "dataset_id": "ds_1", **fields}


def totals(job: JobSpec, facts: ModelFacts, **datasets: int) -> tuple[int, int, int]:
    result = estimate_job(job, {"mdl_1": facts}, datasets or {"ds_1": 10_000_000})
    return result.host_bytes, result.device_bytes, result.disk_bytes


@pytest.mark.parametrize("stages, sections", [
    ([{"type": "prune", "method": "magnitude", "sparsity": 0.5}], {}),
    ([{"type": "quantize", "method": "rtn", "bits": 8}], {}),
    ([GPTQ], {"calibration": calibration()}),
    ([distill(keep_layers="every_other")], {}),
])
def test_every_figure_grows_with_the_parameters(stages, sections):
    small, large = (totals(spec(*stages, **sections), llama(params)) for params in (720_000_000, 1_440_000_000))
    assert all(a < b for a, b in zip(small, large)), (small, large)


def work_phase(job: JobSpec) -> int:
    """The host bytes of the phase that runs the stages (the peak may be another phase's), for
    a model whose layers are wide for its weights, so that the stage outweighs the export."""
    facts = llama(params=50_000_000)
    return sum(term.bytes for term in estimate_job(job, {"mdl_1": facts}, {"ds_1": 10**6}).phases["work"])


@pytest.mark.parametrize("field", ["samples", "seq_len"])
def test_memory_grows_with_the_calibration(field):
    sizes = [{**calibration(), field: value} for value in (16, 256, 4096)]
    works = [work_phase(spec(GPTQ, calibration=size)) for size in sizes]
    peaks = [totals(spec(GPTQ, calibration=size), llama())[:2] for size in sizes]
    assert works[0] < works[1] < works[2]
    assert peaks[0] <= peaks[1] < peaks[2]  # once calibration outgrows the other phases, the peak follows


@pytest.mark.parametrize("field, low, high", [("batch_size", 8, 64), ("seq_len", 128, 1024)])
def test_memory_grows_with_the_distillation_batch(field, low, high):
    assert work_phase(spec(distill(**{field: low}))) < work_phase(spec(distill(**{field: high})))
    small = totals(spec(distill(**{field: low})), llama())
    large = totals(spec(distill(**{field: high})), llama())
    assert small[0] < large[0] and small[1] < large[1]


def test_a_quantized_artifact_needs_less_disk_than_a_dense_one():
    dense = totals(spec({"type": "prune", "method": "magnitude", "sparsity": 0.5}), llama())[2]
    int8 = totals(spec({"type": "quantize", "method": "rtn", "bits": 8}), llama())[2]
    int4 = totals(spec(GPTQ, calibration=calibration()), llama())[2]
    assert int4 < int8 < dense


def test_the_weights_cost_their_dtype_or_the_engine_s_load_dtype(monkeypatch):
    # loading.py keeps the checkpoint's dtype; the one constant would say if it widened it.
    assert weight_bytes_per_parameter("bfloat16") == 2 and weight_bytes_per_parameter("float64") == 8
    kept_dtype = totals(spec(GPTQ, calibration=calibration()), llama())
    monkeypatch.setattr(estimate_module, "ENGINE_LOAD_DTYPE_BYTES", 4)  # as when every model became float32
    assert weight_bytes_per_parameter("bfloat16") == 4
    float32 = totals(spec(GPTQ, calibration=calibration()), llama())
    assert all(kept < widened for kept, widened in zip(kept_dtype, float32))


def test_an_unknown_config_assumes_a_shape_from_the_parameter_count():
    result = estimate_job(spec(GPTQ, calibration=calibration()),
                          {"mdl_1": ModelFacts(num_parameters=10**8, size_bytes=4 * 10**8, dtype="float32")})
    assert result.assumptions["config_read"] is False
    assert result.host_bytes > 2 * 4 * 10**8  # the weights and their load copy at least


def test_the_recorded_json_names_each_term_and_the_largest():
    result = estimate_job(spec(GPTQ, calibration=calibration()), {"mdl_1": llama()}, {"ds_1": 10**7})
    recorded = result.as_json()
    assert recorded["host_bytes"] == sum(recorded["host"]["terms"].values()) == result.host_bytes
    assert recorded["device_bytes"] == sum(recorded["device"]["terms"].values()) == result.device_bytes
    assert recorded["disk_bytes"] == sum(recorded["disk"]["terms"].values()) == result.disk_bytes
    assert recorded["host"]["phase"] in ("load", "work", "reload")
    term, size = result.dominant()
    assert size == max(recorded["host"]["terms"].values()) and recorded["host"]["terms"][term] == size


def test_a_small_gpt2_magnitude_job_by_hand():
    """Every term of a tiny float32 GPT-2 pruned by magnitude, computed by hand."""
    config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 400, "n_positions": 128}
    facts = ModelFacts(num_parameters=100_000, size_bytes=401_000, dtype="float32", config=config,
                       other_files_bytes=5_000)
    result = estimate_job(spec({"type": "prune", "method": "magnitude", "sparsity": 0.5}), {"mdl_1": facts},
                          process_bytes=1_000_000)

    weights = 100_000 * 4                               # float32
    # Per block: c_attn 64 x 192, attention c_proj 64 x 64, c_fc and mlp c_proj 64 x 256 each.
    linear = 2 * (64 * 192 + 64 * 64 + 2 * 64 * 256)    # 98_304 weights in the blocks
    masks = linear                                      # one bool each
    artifact = weights + MiB                            # dense float32, plus headers and config
    # The latency pass, 128 tokens: per token 6 x hidden + 3 x MLP + 3 x qkv widths, float32;
    # eager attention scores and probabilities; the logits, their float copy and log-softmax.
    forward = 128 * (6 * 64 + 3 * 256 + 3 * 192) * 4 + 2 * 4 * 128 * 128 * 4 + 3 * 128 * 400 * 4
    layer_work = 64 * 256 * 24                          # the largest layer, 24 bytes a weight
    export = artifact + weights                         # converted tensors + serialized bytes
    assert forward == 2_023_424 and max(forward, layer_work, export) == forward

    def with_slack(own: int) -> int:  # the process, the job's own bytes and 15 % of them
        return 1_000_000 + own + own * 15 // 100

    load = with_slack(401_000 + weights + weights)      # mapped file, weights, load copy
    work = with_slack(401_000 + weights + masks + forward)  # the file stays mapped
    reload = with_slack(masks + artifact + weights + weights + forward)  # the artifact read back
    assert (load, work, reload) == (2_381_150, 4_361_137, 6_025_849)
    assert result.host_bytes == reload and result.host_phase == "reload"
    assert result.device_bytes == masks + weights + forward + GiB  # CUDA context and workspaces
    folder = artifact + 5_000 + MiB
    assert result.disk_bytes == folder + (folder + MiB)  # the artifact folder and its tar
