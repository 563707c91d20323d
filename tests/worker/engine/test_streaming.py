"""Data-free jobs streamed tensor by tensor give the artifact the in-memory path gives, tensor
for tensor, and hold one shard plus one layer at a time."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors import safe_open

from app.specs import JobSpec, OutputSpec, PruneMagnitude, PruneRandom, PruneWanda, QuantizeDynamicInt8, QuantizeRTN
from tests.factories import make_model, tokenizer
from worker.engine import streaming
from worker.engine.export import resolve_format, write_checkpoint
from worker.engine.loading import load_model
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext, JobCancelled
from worker.engine.shards import ShardWriter
from worker.engine.streaming import compress_streaming, streaming_refusal

CPU = torch.device("cpu")


def checkpoint(folder, arch="llama", dtype=torch.bfloat16, **save):
    model = make_model(arch).to(dtype)
    model.save_pretrained(folder, **save)
    tokenizer().save_pretrained(folder)
    return folder


def job(*stages, fmt="auto", max_shard_size="5GB") -> JobSpec:
    return JobSpec(model_id="mdl_x", stages=list(stages), output=OutputSpec(format=fmt, max_shard_size=max_shard_size))


def in_memory(source, spec, out):
    """What compress() does for any job: the model loaded, the pipeline, the export."""
    ctx = EngineContext()
    stage_metrics = run_pipeline(load_model(source, CPU), spec.stages, ctx)
    export_info = write_checkpoint(ctx.model, ctx, out, resolve_format(spec.output.format, ctx), source,
                                   max_shard_bytes=spec.output.max_shard_bytes)
    return stage_metrics, export_info


def tensors(folder):
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as file:
            found.update({name: file.get_tensor(name) for name in file.keys()})
    return found


def without_times(stage_metrics):
    return [{key: value for key, value in stage.items() if key != "wall_time_s"} for stage in stage_metrics]


def assert_same_artifact(source, spec, tmp_path):
    expected_metrics, expected_export = in_memory(source, spec, tmp_path / "memory")
    assert streaming_refusal(source, spec) is None
    metrics, export_info = compress_streaming(source, spec, tmp_path / "streamed", EngineContext())

    assert without_times(metrics) == without_times(expected_metrics)
    # The shards may be cut elsewhere (tensors come in another order): the same bytes but headers.
    for key in ("format", "architecture"):
        assert export_info[key] == expected_export[key]
    assert export_info["weights_bytes"] == pytest.approx(expected_export["weights_bytes"], rel=0.02)
    expected, streamed = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert streamed[name].dtype == tensor.dtype, name
        assert torch.equal(streamed[name], tensor), name
    config, expected_config = (json.loads((tmp_path / side / "config.json").read_text())
                               for side in ("streamed", "memory"))
    assert config == expected_config
    def others(side):  # the files besides the weights: config, generation config, tokenizer
        return {p.name for p in (tmp_path / side).iterdir() if not p.name.startswith("model")}

    assert others("streamed") == others("memory")
    return tmp_path / "streamed"


STAGES = {
    "random": [PruneRandom(sparsity=0.5, seed=3)],
    "random 2:4": [PruneRandom(pattern="2:4")],
    "magnitude": [PruneMagnitude(sparsity=0.5)],
    "magnitude 2:4": [PruneMagnitude(pattern="2:4")],
    "magnitude global": [PruneMagnitude(sparsity=0.6, scope="global")],
    "rtn int8": [QuantizeRTN(bits=8)],
    "rtn int4 g32 asymmetric": [QuantizeRTN(bits=4, group_size=32, symmetric=False)],
    "dynamic int8": [QuantizeDynamicInt8()],
    "random then rtn": [PruneRandom(sparsity=0.5), QuantizeRTN(bits=4, group_size=16)],
    "rtn then magnitude global then random": [QuantizeRTN(bits=8), PruneMagnitude(sparsity=0.3, scope="global"),
                                              PruneRandom(sparsity=0.2, seed=1)],
}


@pytest.mark.parametrize("stages", STAGES.values(), ids=STAGES.keys())
def test_a_bfloat16_llama_streams_to_the_in_memory_artifact(stages, tmp_path):
    source = checkpoint(tmp_path / "source")
    assert_same_artifact(source, job(*stages), tmp_path)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
@pytest.mark.parametrize("stages", [[PruneRandom(sparsity=0.5)], [PruneMagnitude(sparsity=0.5, scope="global")],
                                    [PruneRandom(sparsity=0.3), QuantizeRTN(bits=8)]],
                         ids=["random", "magnitude global", "random then rtn"])
def test_float32_gpt2_and_opt_stream_dense(arch, stages, tmp_path):
    source = checkpoint(tmp_path / "source", arch, torch.float32)
    assert_same_artifact(source, job(*stages, fmt="dense"), tmp_path)


def test_a_sharded_checkpoint_streams_to_shards_that_load(tmp_path):
    source = checkpoint(tmp_path / "source", max_shard_size="60KB")
    assert (source / "model.safetensors.index.json").is_file()
    artifact = assert_same_artifact(source, job(QuantizeRTN(bits=8), max_shard_size="50KB"), tmp_path)
    assert len(list(artifact.glob("*.safetensors"))) > 2
    for path in artifact.glob("*.safetensors"):  # a file above the limit holds one larger tensor
        with safe_open(path, "pt") as file:
            assert path.stat().st_size <= 50_000 or len(file.keys()) == 1
    expected, loaded = load_model(tmp_path / "memory", CPU), load_model(artifact, CPU)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_what_does_not_stream_says_why(tmp_path):
    llama = checkpoint(tmp_path / "llama")
    gpt2 = checkpoint(tmp_path / "gpt2", "gpt2", torch.float32)
    wanda = JobSpec.model_construct(stages=[PruneWanda(sparsity=0.5)], output=OutputSpec())
    assert "prune.wanda" in streaming_refusal(llama, wanda)
    # A compressed GPT-2 is written as GPTBigCode, converted in memory (gpt_bigcode.py).
    assert "GPTBigCode" in streaming_refusal(gpt2, job(QuantizeRTN(bits=8)))
    assert streaming_refusal(gpt2, job(QuantizeRTN(bits=8), fmt="dense")) is None
    (llama / "model.safetensors").unlink()
    assert "cannot be read" in streaming_refusal(llama, job(QuantizeRTN(bits=8)))


def test_cancel_stops_between_layers_and_leaves_no_artifact(tmp_path):
    source = checkpoint(tmp_path / "source")
    asked = []
    ctx = EngineContext(should_cancel=lambda: asked.append(1) or len(asked) > 3)
    with pytest.raises(JobCancelled):
        compress_streaming(source, job(PruneMagnitude(sparsity=0.5)), tmp_path / "out", ctx)
    assert not (tmp_path / "out").exists()


def test_at_most_one_layer_is_held(tmp_path, monkeypatch):
    """Every tensor read from the checkpoint and every tensor given to the writer is tracked
    while alive: at no moment do they add up to more than the tensor being compressed, as read
    and as written (the writer writes each at once). The in-memory path holds the whole model."""
    source = checkpoint(tmp_path / "source", dtype=torch.float32)
    alive: list[weakref.ref] = []
    peak = [0]

    def measure():
        storages = {}
        for ref in alive:
            tensor = ref()
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        peak[0] = max(peak[0], sum(storages.values()))

    read, add = streaming.CheckpointSource.read, ShardWriter.add

    def tracked_read(self, name):
        tensor = read(self, name)
        alive.append(weakref.ref(tensor))
        measure()
        return tensor

    def tracked_add(self, name, tensor):
        alive.append(weakref.ref(tensor))
        measure()
        add(self, name, tensor)

    monkeypatch.setattr(streaming.CheckpointSource, "read", tracked_read)
    monkeypatch.setattr(ShardWriter, "add", tracked_add)
    spec = job(PruneMagnitude(sparsity=0.5, scope="global"), QuantizeRTN(bits=8), max_shard_size="100KB")
    compress_streaming(source, spec, tmp_path / "out", EngineContext())

    sizes = [t.numel() * t.element_size() for t in tensors(source).values()]
    assert 0 < peak[0] <= 2 * max(sizes) < sum(sizes) / 2
