"""The pre-flight estimate as a pure function: it grows with what makes a job bigger, and a
small case of each path (the model held whole, one decoder block at a time) computed by hand
term by term pins every formula it uses."""

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
    result = estimate_job(job, {"mdl_1": llama(params=50_000_000)}, {"ds_1": 10**6})
    return sum(term.bytes for term in result.phases["block" if result.onloading == "block" else "work"])


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
    facts = ModelFacts(num_parameters=10**8, size_bytes=4 * 10**8, dtype="float32")
    result = estimate_job(spec(GPTQ, calibration=calibration()), {"mdl_1": facts}, process_bytes=0)
    assert result.assumptions["config_read"] is False and result.onloading == "block"
    terms = result.host_terms()
    assert terms["outside_blocks"] > 0 and terms["block"] > 0 and terms["stage"] > 0
    whole = estimate_job(spec({"type": "prune", "method": "structured", "sparsity": 0.25}, calibration=calibration()),
                         {"mdl_1": facts}, process_bytes=0)
    assert whole.onloading == "whole" and whole.host_bytes > 2 * 4 * 10**8  # the weights and their load copy at least


def test_the_recorded_json_names_each_term_and_the_largest():
    result = estimate_job(spec(GPTQ, calibration=calibration()), {"mdl_1": llama()}, {"ds_1": 10**7})
    recorded = result.as_json()
    assert recorded["host_bytes"] == sum(recorded["host"]["terms"].values()) == result.host_bytes
    assert recorded["device_bytes"] == sum(recorded["device"]["terms"].values()) == result.device_bytes
    assert recorded["disk_bytes"] == sum(recorded["disk"]["terms"].values()) == result.disk_bytes
    assert recorded["host"]["phase"] in ("read", "block") and recorded["onloading"] == "block"
    term, size = result.dominant()
    assert size == max(recorded["host"]["terms"].values()) and recorded["host"]["terms"][term] == size


@pytest.mark.parametrize("stages, reason", [
    ([{"type": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"}], "prune.magnitude"),
    ([{"type": "prune", "method": "structured", "sparsity": 0.25}], "prune.structured"),
    ([GPTQ, distill()], "distill.kd"),
])
def test_a_stage_that_needs_the_whole_model_makes_the_whole_job_so(stages, reason):
    result = estimate_job(spec(*stages, calibration=calibration()), {"mdl_1": llama()}, {"ds_1": 10**7})
    assert result.onloading == "whole" and result.assumptions["whole_model_reason"] == f"{reason} needs the whole model"
    block = estimate_job(spec(GPTQ, calibration=calibration()), {"mdl_1": llama()}, {"ds_1": 10**7})
    assert block.onloading == "block" and block.host_bytes < result.host_bytes


def test_a_small_gpt2_global_magnitude_job_by_hand():
    """Every term of a tiny float32 GPT-2 pruned by one global magnitude threshold (the model
    held whole), computed by hand."""
    config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 400, "n_positions": 128}
    facts = ModelFacts(num_parameters=100_000, size_bytes=401_000, dtype="float32", config=config,
                       other_files_bytes=5_000)
    result = estimate_job(spec({"type": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"}),
                          {"mdl_1": facts}, process_bytes=1_000_000)
    assert result.onloading == "whole"

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


def test_a_small_llama_gptq_job_block_by_block_by_hand():
    """Every term of a tiny bfloat16 Llama quantized by GPTQ one block at a time, with an
    evaluation, computed by hand."""
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 400,
              "max_position_embeddings": 128, "tie_word_embeddings": False}
    # Per block: q and o 64 x 64, k and v 64 x 32, gate, up and down 64 x 256: 61_440 weights.
    block_linear = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 256
    params = 2 * 400 * 64 + 2 * (block_linear + 2 * 64) + 64  # embeddings, lm_head, blocks, norms
    assert (block_linear, params) == (61_440, 174_400)
    facts = ModelFacts(num_parameters=params, size_bytes=2 * params + 10_000, dtype="bfloat16", config=config,
                       other_files_bytes=5_000)
    job = spec(GPTQ | {"group_size": 32}, calibration=calibration(samples=4, seq_len=32),
               evaluation={"dataset_id": "ds_1", "seq_len": 64, "stride": 32, "max_tokens": 256})
    result = estimate_job(job, {"mdl_1": facts}, {"ds_1": 1_000}, process_bytes=1_000_000)
    assert result.onloading == "block" and result.largest_stage == 0

    outside = (params - 2 * block_linear) * 2           # embeddings, lm_head, norms (bf16)
    # The block's weights, and at most its norms and a bias per output: 4 x 64 + 64 + 64 + 64 + 2 x 256 + 64.
    block = (block_linear + 1_024) * 2
    state = block_linear + 61_440 // 32 * 5             # int8 integers, a float32 scale + zero point per group
    calibration_states = (4 + 1) * 32 * 64 * 2          # 4 batches of 32 tokens (+1 being replaced), bf16
    # 256 tokens (the dataset has 1 000 bytes) in windows of 64 every 32: 7 windows, kept twice.
    evaluation = 2 * (7 + 1) * 64 * 64 * 2
    # Per token of each batch, window and the latency input: a position id and two rotary rows.
    arguments = (4 * 32 + 7 * 64 + 128) * (8 + 2 * 16 * 2)
    latency = 2 * 128 * 64 * 2                          # its input and output hidden states
    # Latency ids, evaluation and calibration prefixes tokenized (at most a token per byte).
    token_ids = 8 * 128 + 8 * 1_000 + 8 * 1_000
    # GPTQ on one block: 24 bytes a weight of the largest layer (64 x 256), six 256 x 256
    # float32 matrices of the sweep, the Hessians of the 64-, 64-, 64- and 256-wide inputs,
    # and one calibration batch of 32 tokens through the block (6 x hidden + 3 x MLP + 3 x
    # qkv widths a token, float32, and the attention scores and probabilities).
    stage = (16_384 * 24 + 6 * 256 * 256 * 4 + (3 * 64 * 64 + 256 * 256) * 4
             + 32 * (6 * 64 + 3 * 256 + 3 * 128) * 4 + 2 * 4 * 32 * 32 * 4)
    # The 128-token latency input through a block, with the logits, their copy and log-softmax.
    forward = 128 * (6 * 64 + 3 * 256 + 3 * 128) * 4 + 2 * 4 * 128 * 128 * 4 + 3 * 128 * 400 * 4
    assert stage == 2_506_752 and forward == 1_925_120  # only the larger counts
    fragments = 60 * block * 2 // 100                   # 60 % of a block left behind by each of 2, measured
    own = (outside + block + block + state + calibration_states + evaluation + arguments + latency + token_ids
           + fragments + stage)
    assert {term.name: term.bytes for term in result.phases["block"]} == {
        "process": 1_000_000, "outside_blocks": outside, "block": block, "block_written": block,
        "compression_state": state, "calibration": calibration_states, "evaluation": evaluation,
        "block_arguments": arguments, "latency": latency, "token_ids": token_ids, "block_fragments": fragments,
        "stage": stage,
        "allocator_slack": own * 15 // 100}
    block_phase = 1_000_000 + own + own * 15 // 100
    assert block_phase == 4_832_527
    # The datasets read first, in a phase of their own: the calibration's 1 000 bytes (nine
    # bytes each in memory), its tokens (16 bytes each) and the tokenizer's work on a piece of
    # 64 Ki characters; for so small a model that is the peak.
    read = 9 * 1_000 + 1_000 * 16 + 65_536 * 700 + token_ids
    read_phase = 1_000_000 + read + read * 15 // 100
    assert result.host_bytes == max(read_phase, block_phase) == read_phase and result.host_phase == "read"
    # On a GPU the hidden states at the block boundary, the token ids and the writer's copies stay on the host.
    assert result.device_bytes == outside + block + state + arguments + latency + stage + GiB
    # int4 integers and a scale + zero point per 32 of them; the rest bf16.
    artifact = 2 * block_linear // 2 + 2 * block_linear // 32 * 5 + (params - 2 * block_linear) * 2 + MiB
    folder = artifact + 5_000 + MiB
    assert result.disk_bytes == folder + (folder + MiB)


def test_the_largest_stage_on_a_block_is_the_one_with_the_sweep():
    result = estimate_job(spec({"type": "prune", "method": "magnitude", "sparsity": 0.5}, GPTQ,
                               calibration=calibration()), {"mdl_1": llama()}, {"ds_1": 10**7})
    assert result.onloading == "block" and result.largest_stage == 1 and result.dominant()[0] in ("process", "stage")
