"""A checkpoint's dtype is kept: a bfloat16 (float16, float32) upload gives an artifact whose
unquantized tensors and scales are in that dtype, no larger than the upload, that a client's
``from_pretrained`` loads in that dtype and that scores the perplexity the job reported."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.safetensors_header import read_header
from app.specs import (CalibrationSpec, DistillKD, EvaluationSpec, JobSpec, OutputSpec, PruneMagnitude, PruneRandom,
                       PruneSparseGPT, PruneStructured, PruneWanda, QuantizeDynamicInt8, QuantizeGPTQ,
                       QuantizeRTN)
from tests.factories import DATA, make_checkpoint, tokenizer
from worker.engine import calibration as calib
from worker.engine.compress import JobHooks, compress
from worker.engine.loading import checkpoint_dtype, load_model
from worker.evaluate import perplexity

CPU = torch.device("cpu")
CORPUS_FILE = DATA / "corpus.txt"
EVAL_TOKENS, EVAL_WINDOW = 256, 64
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
# What compressed-tensors stores as integers for a quantized layer; every other tensor is a float.
INTEGER_TENSORS = (".weight", ".weight_packed", ".weight_zero_point", ".weight_shape")


class Corpus(JobHooks):
    def dataset_file(self, dataset_id):
        return CORPUS_FILE


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``checkpoints(arch, dtype)``: a tiny checkpoint stored in ``dtype``, made once."""
    made = {}

    def checkpoint(arch, dtype):
        if (arch, dtype) not in made:
            folder = tmp_path_factory.mktemp(f"{arch}-{SAFETENSORS_DTYPES[dtype]}")
            made[arch, dtype] = make_checkpoint(folder, arch, dtype=dtype)
        return made[arch, dtype]

    return checkpoint


def job(*stages, output: OutputSpec | None = None) -> JobSpec:
    return JobSpec(model_id="mdl_x", stages=list(stages),
                   calibration=CalibrationSpec(dataset_id="ds_corpus", samples=4, seq_len=32),
                   evaluation=EvaluationSpec(dataset_id="ds_corpus", max_tokens=EVAL_TOKENS, seq_len=EVAL_WINDOW),
                   output=output or OutputSpec())


def distill() -> DistillKD:
    return DistillKD(dataset_id="ds_corpus", steps=4, batch_size=2, seq_len=32, eval_every=2)


def tensor_dtypes(folder) -> dict[str, str]:
    """Every tensor of the artifact and its safetensors dtype, read from the headers."""
    dtypes = {}
    for path in folder.glob("*.safetensors"):
        header = read_header(path, max_header_bytes=path.stat().st_size)
        dtypes.update({name: entry.dtype for name, entry in header.tensors.items()})
    return dtypes


def eval_perplexity(model) -> float:
    """The job's evaluation, recomputed: the same tokens, window and stride."""
    ids = calib.token_stream(tokenizer(), calib.read_texts(CORPUS_FILE), max_tokens=EVAL_TOKENS)
    return perplexity(model, ids, EVAL_WINDOW, EVAL_WINDOW // 2, CPU)


def client_options(arch, stages) -> dict:
    """How the client loads the artifact: plain ``from_pretrained`` (weights kept compressed),
    except where the pinned compressed-tensors cannot on CPU (int4 GPTBigCode, asymmetric int4:
    see ``loading.load_model``): there dequantized while loading, as ``load_model`` does."""
    from transformers import CompressedTensorsConfig

    int4 = [stage for stage in stages if getattr(stage, "bits", None) == 4]
    if int4 and (arch == "gpt2" or not all(stage.symmetric for stage in int4)):
        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return {}


def check_artifact(arch, dtype, stages, checkpoints, tmp_path):
    """Run the job on the ``arch`` checkpoint stored in ``dtype`` and check what the module
    docstring promises; return the artifact folder."""
    source = checkpoints(arch, dtype)
    artifact, metrics = compress(source, job(*stages), tmp_path, device="cpu", hooks=Corpus())

    quantized = metrics["export"]["format"] == "compressed-tensors"
    expected = SAFETENSORS_DTYPES[dtype]
    for name, stored in tensor_dtypes(artifact).items():
        if quantized and stored in ("I8", "I32", "I64"):
            assert name.endswith(INTEGER_TENSORS), name
        else:
            assert stored == expected, (name, stored)
    if quantized:
        assert any(name.endswith(".weight_scale") for name in tensor_dtypes(artifact))
    assert json.loads((artifact / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    assert metrics["after"]["size_bytes"] <= metrics["before"]["size_bytes"]

    client = AutoModelForCausalLM.from_pretrained(artifact, **client_options(arch, stages)).eval()
    assert client.dtype == dtype
    assert eval_perplexity(client) == pytest.approx(metrics["after"]["perplexity"], rel=1e-5)
    return artifact


BF16_JOBS = {
    "random": [PruneRandom(sparsity=0.5)],
    "magnitude": [PruneMagnitude(sparsity=0.5)],
    "wanda": [PruneWanda(sparsity=0.5)],
    "sparsegpt": [PruneSparseGPT(sparsity=0.5)],
    "magnitude-2:4": [PruneMagnitude(pattern="2:4")],
    "sparsegpt-2:4": [PruneSparseGPT(pattern="2:4")],
    "structured": [PruneStructured(sparsity=0.25)],
    "rtn-int8": [QuantizeRTN(bits=8)],
    "rtn-int4-group": [QuantizeRTN(bits=4, group_size=32)],
    "rtn-int4-asymmetric": [QuantizeRTN(bits=4, group_size=32, symmetric=False)],
    "gptq": [QuantizeGPTQ(bits=4, group_size=32)],
    "dynamic-int8": [QuantizeDynamicInt8()],
    "distill": [distill()],
    "prune-then-quantize": [PruneWanda(sparsity=0.5), QuantizeGPTQ(bits=4, group_size=32)],
    "prune-distill-quantize": [PruneMagnitude(sparsity=0.5), distill(), QuantizeRTN(bits=8)],
}


@pytest.mark.parametrize("stages", BF16_JOBS.values(), ids=BF16_JOBS.keys())
def test_bfloat16_llama_gives_a_bfloat16_artifact(stages, checkpoints, tmp_path):
    check_artifact("llama", torch.bfloat16, stages, checkpoints, tmp_path)


GPT2_JOBS = {
    "magnitude": [PruneMagnitude(sparsity=0.5)],
    "sparsegpt": [PruneSparseGPT(sparsity=0.5)],
    "structured": [PruneStructured(sparsity=0.25, targets=["neurons"])],
    "rtn-int8": [QuantizeRTN(bits=8)],
    "gptq": [QuantizeGPTQ(bits=4, group_size=32)],
    "distill": [distill()],
}


@pytest.mark.parametrize("stages", GPT2_JOBS.values(), ids=GPT2_JOBS.keys())
def test_bfloat16_gpt2_gives_a_bfloat16_artifact(stages, checkpoints, tmp_path):
    """GPT-2's Conv1D layers (transposed weights), written as GPTBigCode when quantized."""
    check_artifact("gpt2", torch.bfloat16, stages, checkpoints, tmp_path)


@pytest.mark.parametrize("stages", [[QuantizeGPTQ(bits=4, group_size=32)], [PruneSparseGPT(sparsity=0.5)],
                                    [distill()]], ids=["gptq", "sparsegpt", "distill"])
def test_float16_opt_gives_a_float16_artifact(stages, checkpoints, tmp_path):
    check_artifact("opt", torch.float16, stages, checkpoints, tmp_path)


@pytest.mark.parametrize("stages", [[QuantizeRTN(bits=4, group_size=32)], [PruneWanda(sparsity=0.5)]],
                         ids=["rtn-int4", "wanda"])
def test_float32_llama_stays_float32(stages, checkpoints, tmp_path):
    check_artifact("llama", torch.float32, stages, checkpoints, tmp_path)


def test_bfloat16_quantized_artifact_stores_its_floats_in_half_the_bytes(checkpoints, tmp_path):
    """The same job on the same model stored in bfloat16 and in float32: the same integers, and
    every float tensor (embeddings, norms, lm_head, scales) in half the bytes."""
    stored = {}
    for dtype in (torch.bfloat16, torch.float32):
        artifact, _ = compress(checkpoints("llama", dtype), job(QuantizeRTN(bits=8)), tmp_path / str(dtype),
                               device="cpu", hooks=Corpus())
        by_kind = {"float": 0, "integer": 0}
        for path in artifact.glob("*.safetensors"):
            for entry in read_header(path, max_header_bytes=path.stat().st_size).tensors.values():
                by_kind["integer" if entry.dtype.startswith("I") else "float"] += entry.end - entry.begin
        stored[dtype] = by_kind
    assert stored[torch.bfloat16]["integer"] == stored[torch.float32]["integer"] > 0
    assert 2 * stored[torch.bfloat16]["float"] == stored[torch.float32]["float"]


@pytest.mark.parametrize("stages", [[PruneMagnitude(sparsity=0.5)], [QuantizeGPTQ(bits=4, group_size=32)]],
                         ids=["dense", "compressed-tensors"])
def test_the_jobs_max_shard_size_cuts_the_artifact(stages, checkpoints, tmp_path):
    artifact, metrics = compress(checkpoints("llama", torch.bfloat16),
                                 job(*stages, output=OutputSpec(max_shard_size="60KB")),
                                 tmp_path, device="cpu", hooks=Corpus())
    assert metrics["export"]["shards"] == len(list(artifact.glob("model-*-of-*.safetensors"))) >= 3
    assert (artifact / "model.safetensors.index.json").is_file()
    client = AutoModelForCausalLM.from_pretrained(artifact).eval()
    assert eval_perplexity(client) == pytest.approx(metrics["after"]["perplexity"], rel=1e-5)


def test_checkpoint_dtype_is_what_the_weights_are_stored_in(checkpoints, tmp_path):
    source = checkpoints("llama", torch.bfloat16)
    assert checkpoint_dtype(source) == torch.bfloat16
    # A config naming another dtype does not decide: the headers say what is stored.
    config = json.loads((source / "config.json").read_text())
    folder = tmp_path / "mislabelled"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    assert checkpoint_dtype(folder) == torch.bfloat16
    assert load_model(folder, CPU).dtype == torch.bfloat16
    # Without float tensors to read, the config's dtype (``torch_dtype`` in older configs).
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert checkpoint_dtype(bare) == torch.float16
    (bare / "config.json").write_text("{}")
    assert checkpoint_dtype(bare) == torch.float32
