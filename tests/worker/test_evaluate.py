import math

import pytest
import torch

from app.specs import PruneMagnitude, QuantizeRTN
from worker.engine.export import write_checkpoint
from worker.engine.pipeline import run_pipeline
from worker.engine.registry import EngineContext
from worker.evaluate import checkpoint_stats, latency_ms_per_token, perplexity, weight_stats

CPU = torch.device("cpu")


def token_ids(n: int) -> torch.Tensor:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(0))


def test_one_window_over_the_whole_text_is_the_model_loss(tiny_models):
    model = tiny_models["gpt2"]()
    ids = token_ids(100)
    with torch.no_grad():
        expected = math.exp(float(model(ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss))
    whole = perplexity(model, ids, seq_len=100, stride=100, device=CPU)
    longer_window = perplexity(model, ids, seq_len=128, stride=64, device=CPU)
    assert whole == pytest.approx(expected, rel=1e-5)
    assert longer_window == pytest.approx(expected, rel=1e-5)


def test_sliding_window_scores_every_token_once(tiny_models):
    model = tiny_models["llama"]()
    ids = token_ids(130)
    sliding = perplexity(model, ids, seq_len=32, stride=12, device=CPU)
    assert math.isfinite(sliding) and sliding > 1
    assert sliding == perplexity(model, ids, seq_len=32, stride=12, device=CPU)  # deterministic

    # Disjoint windows (stride == seq_len) are the mean loss of the separate chunks.
    with torch.no_grad():
        nll = sum(float(model(c.unsqueeze(0), labels=c.unsqueeze(0)).loss) * (c.numel() - 1)
                  for c in ids.split(32))
    scored = sum(c.numel() - 1 for c in ids.split(32))
    disjoint = perplexity(model, ids, seq_len=32, stride=32, device=CPU)
    assert disjoint == pytest.approx(math.exp(nll / scored), rel=1e-5)


def test_weight_stats_count_tied_weights_once_and_the_sparsity_of_the_layers(tiny_models):
    model = tiny_models["gpt2"]()
    unique = sum(p.numel() for p in model.parameters())
    stats = weight_stats(model)
    assert stats["parameters"] == unique
    stored = sum(t.numel() for t in model.state_dict().values())
    assert stats["parameters"] < stored  # lm_head is tied to the embedding
    assert stats["sparsity"] == 0.0

    run_pipeline(model, [PruneMagnitude(sparsity=0.25)], EngineContext())
    stats = weight_stats(model)
    assert stats["sparsity"] == pytest.approx(0.25, abs=1e-4)
    assert stats["nonzero_parameters"] < stats["parameters"]


def test_checkpoint_stats_dense_and_compressed(tiny_models, tmp_path):
    model = tiny_models["llama"]()
    parameters = weight_stats(model)["parameters"]
    write_checkpoint(model, EngineContext(), tmp_path / "dense", "dense", source_dir=tmp_path)
    dense = checkpoint_stats(tmp_path / "dense")
    assert dense["size_bytes"] > dense["weights_bytes"] > 4 * parameters
    assert 32 < dense["bits_per_weight"] < 32.5  # float32 plus the safetensors header
    assert checkpoint_stats(tmp_path / "dense", parameters=parameters) == dense

    ctx = EngineContext()
    run_pipeline(model, [QuantizeRTN(bits=4)], ctx)
    write_checkpoint(model, ctx, tmp_path / "int4", "compressed-tensors", source_dir=tmp_path)
    packed = checkpoint_stats(tmp_path / "int4")
    # Counted from the headers, packed weights by their weight_shape: the same parameter count.
    assert packed == checkpoint_stats(tmp_path / "int4", parameters=parameters)
    assert packed["bits_per_weight"] < dense["bits_per_weight"] / 2  # embeddings stay float32


def test_latency_is_positive(tiny_models):
    model = tiny_models["opt"]()
    assert latency_ms_per_token(model, seq_len=16, vocab_size=300, device=CPU, repeats=2) > 0
