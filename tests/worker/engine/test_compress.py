"""The engine's entry point: a checkpoint and a spec in, an artifact and metrics out, with
what it reports on the way, and a method added as one file."""

import sys
import textwrap

import pytest
import torch

from app.specs import CalibrationSpec, EvaluationSpec, JobSpec, OutputSpec, PruneMagnitude, QuantizeRTN
from tests.factories import DATA, make_checkpoint
from worker.engine import registry
from worker.engine.compress import JobHooks, compress
from worker.engine.loading import load_model
from worker.engine.modules import compressible_layers
from worker.engine.registry import JobCancelled

CPU = torch.device("cpu")
CORPUS_FILE = DATA / "corpus.txt"


class Recorder(JobHooks):
    def __init__(self, cancel_in: str | None = None):
        self.phases, self.progress_seen, self.events, self.cancel_in = [], [], [], cancel_in

    def phase_started(self, name, stage_index, progress):
        self.phases.append((name, stage_index, round(progress, 4)))

    def progress(self, fraction):
        self.progress_seen.append(fraction)

    def event(self, type, message, **data):
        self.events.append((type, message))

    def should_cancel(self):
        return self.cancel_in is not None and self.phases[-1][0] == self.cancel_in

    def dataset_file(self, dataset_id):
        assert dataset_id == "ds_corpus"
        return CORPUS_FILE


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("source"), "gpt2")


def spec(*stages, evaluation=True, calibration=False) -> JobSpec:
    return JobSpec(model_id="mdl_x", stages=list(stages),
                   evaluation=EvaluationSpec(dataset_id="ds_corpus", max_tokens=256) if evaluation else None,
                   calibration=CalibrationSpec(dataset_id="ds_corpus", samples=2, seq_len=32) if calibration else None)


def test_phases_by_name_metrics_and_artifact(source, tmp_path):
    hooks = Recorder()
    job = spec(PruneMagnitude(sparsity=0.5), PruneMagnitude(sparsity=0.5), QuantizeRTN(bits=8))

    artifact_dir, metrics = compress(source, job, tmp_path, device="cpu", hooks=hooks)

    # A stage name may repeat: each is its own phase, found by its place in the spec.
    assert hooks.phases == [("load", None, 0.0), ("evaluate.before", None, 0.1429),
                            ("prune.magnitude", 0, 0.2857), ("prune.magnitude", 1, 0.4286),
                            ("quantize.rtn", 2, 0.5714), ("export", None, 0.7143),
                            ("evaluate.after", None, 0.8571)]
    assert hooks.progress_seen == sorted(hooks.progress_seen) and 0 < hooks.progress_seen[-1] < 1
    assert [message for kind, message in hooks.events if kind == "metric"][1] == "stages finished"
    assert artifact_dir == tmp_path / "model" and (artifact_dir / "tokenizer.json").is_file()
    assert metrics["export"]["format"] == "compressed-tensors"
    assert [stage["name"] for stage in metrics["stages"]] == ["prune.magnitude", "prune.magnitude", "quantize.rtn"]
    assert metrics["before"]["perplexity"] < metrics["after"]["perplexity"]
    assert metrics["after"]["sparsity"] == pytest.approx(0.5, abs=0.01)  # the second finds the zeros
    assert metrics["evaluation"] == {"dataset_id": "ds_corpus", "tokens": 256, "seq_len": 128, "stride": 64}
    assert metrics["device"] == "cpu"


def test_without_evaluation_there_are_no_evaluate_phases(source, tmp_path):
    hooks = Recorder()
    _, metrics = compress(source, spec(PruneMagnitude(sparsity=0.5), evaluation=False), tmp_path, hooks=hooks)
    assert [name for name, _, _ in hooks.phases] == ["load", "prune.magnitude", "export"]
    assert metrics["evaluation"] is None and "perplexity" not in metrics["after"]
    assert metrics["export"]["format"] == "dense"


def test_cancel_stops_the_job_in_its_phase(source, tmp_path):
    hooks = Recorder(cancel_in="prune.magnitude")
    with pytest.raises(JobCancelled):
        compress(source, spec(PruneMagnitude(sparsity=0.5)), tmp_path, hooks=hooks)
    assert hooks.phases[-1][0] == "prune.magnitude" and not (tmp_path / "model").exists()


TOY_METHOD = '''
from typing import Literal

from pydantic import BaseModel

from worker.engine.modules import compressible_layers
from worker.engine.registry import register


class ScaleHalve(BaseModel):
    """{"type": "scale", "method": "halve"}: every weight of the decoder blocks halved."""

    type: Literal["scale"] = "scale"
    method: Literal["halve"] = "halve"


@register(ScaleHalve)
def scale_halve(model, config, ctx) -> dict:
    layers = compressible_layers(model)
    for done, layer in enumerate(layers):
        ctx.step(done, len(layers))
        layer.set_weight(layer.weight() * 0.5)
    return {"layers": len(layers)}
'''


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """A package outside the repository, laid out as worker/engine is: a family package
    (``scale/``) holding one method file. Nothing in the repository names it."""
    root = tmp_path / "plugins"
    (root / "toy_engine" / "scale").mkdir(parents=True)
    (root / "toy_engine" / "__init__.py").write_text("")
    (root / "toy_engine" / "scale" / "__init__.py").write_text("")
    (root / "toy_engine" / "scale" / "halve.py").write_text(textwrap.dedent(TOY_METHOD))
    monkeypatch.syspath_prepend(str(root))
    # The table as it was is restored afterwards: the toy must not stay registered.
    monkeypatch.setattr(registry, "_HANDLERS", registry.handlers())
    monkeypatch.setattr(registry, "_DISCOVERED", set(registry._DISCOVERED))
    monkeypatch.setattr(registry, "METHOD_PACKAGES", [*registry.METHOD_PACKAGES, "toy_engine"])
    yield "toy_engine.scale.halve"
    for name in [name for name in sys.modules if name.split(".")[0] == "toy_engine"]:
        del sys.modules[name]


def test_a_method_in_a_new_file_runs_through_compress(toy_package, source, tmp_path):
    assert toy_package not in sys.modules  # found by discovery, not imported by the test
    halve = next(config for config in registry.handlers() if config.__name__ == "ScaleHalve")
    # The toy's config is not in app/specs.py's union, so the spec is built without validation.
    job = JobSpec.model_construct(model_id="mdl_x", stages=[halve()], calibration=None, evaluation=None,
                                  output=OutputSpec(), webhook=None, metadata={})
    hooks = Recorder()

    artifact_dir, metrics = compress(source, job, tmp_path, hooks=hooks)

    assert [name for name, _, _ in hooks.phases] == ["load", "scale.halve", "export"]
    assert metrics["stages"][0]["name"] == "scale.halve" and metrics["stages"][0]["layers"] == 8
    original, halved = load_model(source, CPU), load_model(artifact_dir, CPU)
    for before, after in zip(compressible_layers(original), compressible_layers(halved)):
        torch.testing.assert_close(after.weight(), before.weight() * 0.5)
