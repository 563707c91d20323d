"""How good, how small and how fast a model is: the numbers a job reports before and after.

::

    ids = token_stream(tokenizer, texts, max_tokens=65536)
    ppl = perplexity(model, ids, seq_len=1024, stride=512, device=device)
    stats = weight_stats(model)            # {"parameters", "nonzero_parameters", "sparsity"}
    size = checkpoint_stats(artifact_dir, parameters=stats["parameters"])
    ms = latency_ms_per_token(model, seq_len=128, vocab_size=tokenizer.vocab_size, device=device)
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from app.safetensors_header import read_header
from worker.engine.modules import compressible_layers


@torch.no_grad()
def perplexity(
    model: nn.Module, token_ids: torch.Tensor, seq_len: int, stride: int, device: torch.device
) -> float:
    """Perplexity over ``token_ids`` (1-D) by Hugging Face's sliding window
    (https://huggingface.co/docs/transformers/perplexity).

    A window of ``seq_len`` tokens moves ``stride`` tokens at a time; each window scores only
    the tokens no earlier window scored, so every token after the first is scored exactly once,
    with up to ``seq_len - stride`` tokens of context before it. The result is
    ``exp(total negative log-likelihood / tokens scored)``; with one window covering the whole
    text it equals ``exp(model(ids, labels=ids).loss)``.
    """
    token_ids = token_ids.reshape(-1).to(device)
    model.eval()
    nll = NegativeLogLikelihood()
    for window in windows(token_ids.numel(), seq_len, stride):
        ids = token_ids[window.begin:window.end]
        nll.add(model(ids.unsqueeze(0)).logits[0], ids, window)
    return nll.perplexity()


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` of the text go through the model; those from ``first`` on are
    scored (the earlier ones are context only)."""

    begin: int
    end: int
    first: int


def windows(total: int, seq_len: int, stride: int) -> list[Window]:
    """The sliding windows of ``perplexity`` over ``total`` tokens: every token after the first
    is scored exactly once."""
    if not 1 <= stride <= seq_len:
        raise ValueError("need 1 <= stride <= seq_len")
    if total < 2:
        raise ValueError("perplexity needs at least two tokens")
    result, scored_until = [], 1  # token 0 has no context and is never scored
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        result.append(Window(begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == total:
            break
    return result


class NegativeLogLikelihood:
    """The sum over the windows of ``perplexity``, window by window, in whatever order the
    logits come (the block-by-block engine computes every window's at the end)."""

    def __init__(self) -> None:
        self.total, self.scored = 0.0, 0

    def add(self, logits: torch.Tensor, window_ids: torch.Tensor, window: Window) -> None:
        """``logits``: ``[window length, vocab]`` for the window's ``window_ids``."""
        # Position p predicts token p + 1; score the targets in [first, end).
        targets = window_ids[window.first - window.begin:]
        predictions = logits[window.first - window.begin - 1: window.end - window.begin - 1].float()
        self.total += float(F.cross_entropy(predictions, targets.to(predictions.device), reduction="sum"))
        self.scored += targets.numel()

    def perplexity(self) -> float:
        return math.exp(self.total / self.scored)


def weight_stats(model: nn.Module) -> dict[str, Any]:
    """``parameters``: unique parameters (tied embeddings counted once); ``nonzero_parameters``:
    those not exactly zero; ``sparsity``: the zero fraction of the compressible layers'
    weights (the ones pruning acts on)."""
    count = WeightCount()
    count.add(list(model.parameters()), compressible_layers(model))  # parameters(): a tied tensor once
    return count.stats()


class WeightCount:
    """``weight_stats`` of a model seen in parts (the block-by-block engine adds a block at a
    time, and the parts outside the blocks once)."""

    def __init__(self) -> None:
        self.parameters = self.nonzero = self.weights = self.zeros = 0

    def add(self, parameters: list[torch.Tensor], layers: list) -> None:
        self.parameters += sum(p.numel() for p in parameters)
        self.nonzero += sum(int(torch.count_nonzero(p)) for p in parameters)
        self.weights += sum(layer.weight().numel() for layer in layers)
        self.zeros += sum(int((layer.weight() == 0).sum()) for layer in layers)

    def stats(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "nonzero_parameters": self.nonzero,
                "sparsity": self.zeros / self.weights if self.weights else 0.0}


# Tensors a compressed-tensors checkpoint stores beside a weight; they describe it, they are not
# parameters of the model.
_QUANTIZATION_TENSOR_SUFFIXES = tuple(
    f".{of}_{what}"
    for of in ("weight", "input", "output")
    for what in ("scale", "zero_point", "shape", "global_scale", "g_idx")
)


def checkpoint_stats(folder: Path, parameters: int | None = None) -> dict[str, Any]:
    """Sizes of a checkpoint folder.

    ``size_bytes``: every file (config and tokenizer included); ``weights_bytes``: the
    ``*.safetensors`` files; ``bits_per_weight``: ``8 * weights_bytes / parameters``, i.e. what
    storing one parameter costs, scales, zero points and headers included (32 for a dense
    float32 checkpoint, a little over 8 or 4 for int8 / int4 layers).

    Pass ``parameters`` (``weight_stats(model)["parameters"]``) when the model is at hand:
    tied weights stored twice would otherwise count twice. Without it the count is read from
    the safetensors headers: every tensor except the quantization metadata (scales, zero
    points, shapes), a packed ``weight_packed`` counted by its ``weight_shape``.
    """
    folder = Path(folder)
    files = [path for path in folder.rglob("*") if path.is_file()]
    weight_files = [path for path in files if path.suffix == ".safetensors"]
    weights_bytes = sum(path.stat().st_size for path in weight_files)
    if parameters is None:
        parameters = _parameters_in_checkpoint(weight_files)
    return {
        "size_bytes": sum(path.stat().st_size for path in files),
        "weights_bytes": weights_bytes,
        "bits_per_weight": 8 * weights_bytes / parameters if parameters else None,
    }


def _parameters_in_checkpoint(weight_files: list[Path]) -> int:
    """Model parameters stored in safetensors files, read from their JSON headers (plus, for
    packed weights, the small ``weight_shape`` tensors)."""
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    for path in weight_files:
        # A checkpoint already on disk (an accepted upload or our own artifact): its header
        # needs no limit beyond its file's size.
        header = read_header(path, max_header_bytes=path.stat().st_size)
        for name, entry in header.tensors.items():
            shapes[name], where[name] = entry.shape, path
    count = 0
    for name, shape in shapes.items():
        if name.endswith(".weight_packed"):  # integers packed into int32 words: the dense shape
            shape_name = name.removesuffix("_packed") + "_shape"
            with safe_open(where[shape_name], framework="pt") as tensors:
                shape = tensors.get_tensor(shape_name).tolist()
        elif name.endswith(_QUANTIZATION_TENSOR_SUFFIXES):
            continue
        count += math.prod(shape)
    return count


@torch.no_grad()
def latency_ms_per_token(
    model: nn.Module, seq_len: int, vocab_size: int, device: torch.device, repeats: int = 3
) -> float:
    """Milliseconds per token of one forward pass over ``seq_len`` random tokens (batch 1): the
    median of ``repeats`` timed passes after one warm-up pass, divided by ``seq_len``."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, seq_len), generator=generator).to(device)
    return 1000 * median_seconds(lambda: model(ids), repeats, torch.device(device)) / seq_len


def median_seconds(run, repeats: int, device: torch.device) -> float:
    """The median seconds of ``repeats`` calls of ``run`` after one warm-up call (allocator,
    kernels, caches), the device synchronised around each."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    synchronize()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        synchronize()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)
