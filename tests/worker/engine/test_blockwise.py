"""One decoder block in memory: every method that works layer by layer runs block by block,
never holds two blocks, never loads the model whole, and computes what the model held whole
computes."""

from __future__ import annotations

import pytest
import torch

from app.specs import (CalibrationSpec, EvaluationSpec, JobSpec, PruneMagnitude, PruneRandom, PruneSparseGPT,
                       PruneStructured, PruneWanda, QuantizeDynamicInt8, QuantizeGPTQ, QuantizeRTN)
from tests.factories import DATA, make_checkpoint, tokenizer
from worker import evaluate
from worker.engine import calibration as calib
from worker.engine import compress as compress_module
from worker.engine.blockwise import Measure, blockwise_refusal, compress_blockwise
from worker.engine.compress import JobHooks, compress
from worker.engine.loading import load_model
from worker.engine.onload import OnloadedModel
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext

CPU = torch.device("cpu")
CORPUS_FILE = DATA / "corpus.txt"


class Corpus(JobHooks):
    def __init__(self):
        self.warnings = []

    def dataset_file(self, dataset_id):
        return CORPUS_FILE

    def event(self, type, message, **data):
        if type == "warning":
            self.warnings.append(message)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def checkpoint(arch, dtype=torch.bfloat16):
        if (arch, dtype) not in made:
            made[arch, dtype] = make_checkpoint(tmp_path_factory.mktemp(arch), arch, dtype=dtype)
        return made[arch, dtype]

    return checkpoint


def job(*stages) -> JobSpec:
    return JobSpec(model_id="mdl_x", stages=list(stages),
                   calibration=CalibrationSpec(dataset_id="ds_corpus", samples=4, seq_len=32),
                   evaluation=EvaluationSpec(dataset_id="ds_corpus", max_tokens=256, seq_len=64))


BLOCKWISE_JOBS = {
    "random": [PruneRandom(sparsity=0.5)],
    "magnitude": [PruneMagnitude(sparsity=0.5)],
    "wanda-2:4": [PruneWanda(pattern="2:4")],
    "sparsegpt": [PruneSparseGPT(sparsity=0.5)],
    "rtn-int4": [QuantizeRTN(bits=4, group_size=32)],
    "gptq": [QuantizeGPTQ(bits=4, group_size=32)],
    "dynamic-int8": [QuantizeDynamicInt8()],
    "sparsegpt-then-gptq": [PruneSparseGPT(sparsity=0.5), QuantizeGPTQ(bits=8, group_size=None)],
}


@pytest.mark.parametrize("stages", BLOCKWISE_JOBS.values(), ids=BLOCKWISE_JOBS.keys())
def test_a_job_holds_at_most_one_block_and_never_the_whole_model(stages, checkpoints, tmp_path, monkeypatch):
    seen = []
    onload = OnloadedModel.onload

    def counting_onload(self, index):
        block = onload(self, index)
        real = [i for i, other in enumerate(self.blocks) if not next(other.parameters()).is_meta]
        seen.append((index, self.materialised, real))
        return block

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the model was loaded whole")

    monkeypatch.setattr(OnloadedModel, "onload", counting_onload)
    monkeypatch.setattr(compress_module, "load_model", no_whole_model)
    _, metrics = compress(checkpoints("llama"), job(*stages), tmp_path, device="cpu", hooks=Corpus())

    assert metrics["onloading"] == "block"
    # Each block once, alone: the others are on the meta device when it is onloaded.
    assert seen == [(0, 1, [0]), (1, 1, [1])]
    assert metrics["before"]["perplexity"] > 1 and metrics["after"]["latency_ms_per_token"] > 0


@pytest.mark.parametrize("stages", [[PruneWanda(sparsity=0.5)], [QuantizeGPTQ(bits=4, group_size=32)],
                                    [PruneSparseGPT(pattern="2:4")]], ids=["wanda", "gptq", "sparsegpt"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_block_by_block_computes_what_the_whole_model_computes(arch, stages, checkpoints, tmp_path):
    """One stage: the same calibration inputs reach every layer, so the same weights come out;
    the report's figures are those of the whole model before and of the artifact after."""
    source = checkpoints(arch, torch.float32)
    spec = job(*stages)
    batches = calib.calibration_batches(tokenizer(), [CORPUS_FILE.read_text()], 4, 32, 0)
    ids = calib.token_stream(tokenizer(), [CORPUS_FILE.read_text()], max_tokens=256)
    measure = Measure(ids, 64, 32, latency_len=16, repeats=1)
    result = compress_blockwise(source, spec, tmp_path / "out", EngineContext(calibration=batches), measure=measure)
    assert result.peak_blocks == 1

    whole = load_model(source, CPU)
    assert result.before["perplexity"] == pytest.approx(evaluate.perplexity(whole, ids, 64, 32, CPU), rel=1e-6)
    assert {k: result.before[k] for k in ("parameters", "nonzero_parameters", "sparsity")} == evaluate.weight_stats(whole)
    run_pipeline(whole, spec.stages, EngineContext(calibration=batches))
    artifact = load_model(tmp_path / "out", CPU)
    if type(artifact) is type(whole):  # a quantized GPT-2 is written as GPTBigCode (same logits)
        for name, tensor in whole.state_dict().items():
            assert torch.allclose(artifact.state_dict()[name], tensor, atol=1e-6), name
    assert result.after["perplexity"] == pytest.approx(evaluate.perplexity(whole, ids, 64, 32, CPU), rel=1e-6)
    assert result.after["perplexity"] == pytest.approx(evaluate.perplexity(artifact, ids, 64, 32, CPU), rel=1e-6)
    assert {k: result.after[k] for k in ("parameters", "nonzero_parameters", "sparsity")} == evaluate.weight_stats(artifact)


def test_what_needs_the_whole_model_says_why(checkpoints, tmp_path):
    assert blockwise_refusal(checkpoints("llama"), job(PruneStructured(sparsity=0.25))) == \
        "prune.structured needs the whole model"
    assert blockwise_refusal(checkpoints("llama"), job(PruneMagnitude(sparsity=0.5, scope="global"))) == \
        "prune.magnitude needs the whole model"
    hooks = Corpus()
    _, metrics = compress(checkpoints("llama"), job(PruneStructured(sparsity=0.25)), tmp_path, device="cpu",
                          hooks=hooks)
    assert metrics["onloading"] == "whole"
    assert hooks.warnings == ["the model is held whole: prune.structured needs the whole model"]


def test_a_cancelled_block_job_writes_no_artifact(checkpoints, tmp_path):
    class CancelAtSecondBlock(Corpus):
        calls = 0

        def should_cancel(self):
            self.calls += 1
            return self.calls > 3

    from worker.engine.registry import JobCancelled
    with pytest.raises(JobCancelled):
        compress(checkpoints("llama"), job(QuantizeGPTQ(bits=4, group_size=32)), tmp_path, device="cpu",
                 hooks=CancelAtSecondBlock())
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_running_out_of_device_memory_names_the_block(checkpoints, tmp_path, monkeypatch):
    """The allocator's error where a block's work runs becomes the job's ``out_of_memory``,
    naming the block; nothing of the artifact is left."""
    from app.config import get_settings
    from worker.engine.prune.wanda import WandaStep
    from worker.engine.registry import DeviceOutOfMemory
    from worker.tasks import describe_failure

    def exhausted(self, layer, norms):
        raise torch.OutOfMemoryError("Tried to allocate 2.00 GiB")

    monkeypatch.setattr(WandaStep, "compress", exhausted)
    batches = calib.calibration_batches(tokenizer(), [CORPUS_FILE.read_text()], 2, 16, 0)
    with pytest.raises(DeviceOutOfMemory) as raised:
        compress_blockwise(checkpoints("llama"), job(PruneWanda(sparsity=0.5)), tmp_path / "out",
                           EngineContext(calibration=batches))
    message = str(raised.value)
    assert message == "cpu ran out of memory in model.layers.0 (block 1 of 2); Tried to allocate 2.00 GiB"
    assert describe_failure(raised.value, get_settings()) == ("out_of_memory", message)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_gpu_out_of_memory_gives_the_devices_numbers(monkeypatch):
    """What a GPU's error adds: the numbers torch.cuda reports for the device (stood in for:
    this machine has none)."""
    from worker.engine.blockwise import _device_memory_named
    from worker.engine.registry import DeviceOutOfMemory

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 30 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 31 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Properties", (), {"total_memory": 32 * 2**30}))
    with pytest.raises(DeviceOutOfMemory) as raised:
        with _device_memory_named(torch.device("cuda:1"), ["model.layers.7 (block 8 of 32)"]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert str(raised.value) == ("cuda:1 ran out of memory in model.layers.7 (block 8 of 32): 30.00 GiB allocated, "
                                 "31.00 GiB reserved of 32.00 GiB; CUDA out of memory. Tried to allocate 2.00 GiB")
