import pytest
import torch
from pydantic import BaseModel

from app.specs import PruneMagnitude, PruneRandom, QuantizeRTN
from worker.engine.modules import compressible_layers
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext, JobCancelled


def test_runs_stages_in_order_and_reports_each(tiny_models):
    model = tiny_models["opt"]()
    progress, started = [], []
    ctx = EngineContext(on_progress=progress.append)
    stages = [PruneMagnitude(sparsity=0.5), QuantizeRTN(bits=8)]

    metrics = run_pipeline(model, stages, ctx, on_stage_start=lambda *args: started.append(args))

    assert started == [(0, "prune.magnitude"), (1, "quantize.rtn")]
    assert [m["name"] for m in metrics] == ["prune.magnitude", "quantize.rtn"]
    assert all(m["wall_time_s"] >= 0 for m in metrics)
    assert metrics[0]["sparsity"] == pytest.approx(0.5)
    assert metrics[1]["bits"] == 8
    assert all(0.0 <= p <= 1.0 for p in progress) and progress.count(1.0) == 2
    assert set(ctx.quantized) == {layer.name for layer in compressible_layers(model)}


def test_cancel_stops_between_layers(tiny_models):
    model = tiny_models["llama"]()
    before = [layer.weight().clone() for layer in compressible_layers(model)]
    checks = 0

    def should_cancel() -> bool:
        nonlocal checks
        checks += 1
        return checks > 4  # the stage start, then three layers

    with pytest.raises(JobCancelled):
        run_pipeline(model, [PruneRandom(sparsity=0.5)], EngineContext(should_cancel=should_cancel))

    after = [layer.weight() for layer in compressible_layers(model)]
    changed = [not torch.equal(b, a) for b, a in zip(before, after)]
    assert changed[:3] == [True, True, True]
    assert not any(changed[3:])


def test_cancelled_before_start_does_nothing(tiny_models):
    model = tiny_models["gpt2"]()
    ctx = EngineContext(should_cancel=lambda: True)
    with pytest.raises(JobCancelled):
        run_pipeline(model, [PruneMagnitude(sparsity=0.5, scope="global")], ctx)
    assert all((layer.weight() != 0).all() for layer in compressible_layers(model))


def test_an_unregistered_config_fails_before_any_work(tiny_models):
    class PruneSomehow(BaseModel):
        type: str = "prune"
        method: str = "somehow"

    model = tiny_models["gpt2"]()
    with pytest.raises(TypeError, match="PruneSomehow"):
        run_pipeline(model, [QuantizeRTN(bits=8), PruneSomehow()], EngineContext())
    assert all((layer.weight() != 0).all() for layer in compressible_layers(model))
