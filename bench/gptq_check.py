"""Why GPTQ int4 does or does not beat RTN int4 on a benchmark model: a diagnostic for
``bench/quality.py``'s models, not part of the table.

::

    OMP_NUM_THREADS=1 nice -n 19 python -m bench.gptq_check \\
        --model bench/.cache/models/gpt2-<key> --inputs bench/.cache/tokenizer-<key>/inputs-<key>.safetensors \\
        --train-text bench/.cache/corpus-<sha>/train-all.txt

For RTN and for several GPTQ settings (the spec's defaults, act-order, stronger dampening, twice
the calibration samples) it prints:

- ``ppl``: the held-out perplexity (``worker.evaluate.perplexity``, the table's evaluation; the
  model in memory, which equals the exported artifact's: the same dequantized weights);
- ``Δlog ppl vs dense / vs rtn g128 ± 2 s.e.``: the paired difference of mean per-token
  negative log-likelihood (the log of the perplexity ratio) against the dense model and
  against RTN int4 g128, with twice its standard error over the 128-token evaluation strides
  (the strides' NLL sums treated as independent samples): a difference inside that band is not
  a measurement of which is better;
- ``layer error cal / held-out``: the layers' output error GPTQ minimises,
  ``tr(ΔW H ΔW^T) / tr(W H W^T)`` with ``H`` the second moment of the dense model's inputs of
  that layer, on the calibration samples and on held-out text, averaged over the layers, and
  how many layers have a smaller error than RTN's.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from app.specs import QuantizeGPTQ, QuantizeRTN  # noqa: E402


def stride_nll(model, token_ids: torch.Tensor, seq_len: int, stride: int) -> torch.Tensor:
    """The NLL sum of each window's newly scored tokens, exactly as ``worker.evaluate.perplexity``
    scores them (so ``exp(sum / scored)`` is its perplexity)."""
    total, sums, scored_until = token_ids.numel(), [], 1
    with torch.no_grad():
        for begin in range(0, total, stride):
            end = min(begin + seq_len, total)
            window = token_ids[begin:end]
            logits = model(window.unsqueeze(0)).logits[0].float()
            first = max(scored_until, begin + 1)
            sums.append(float(F.cross_entropy(logits[first - begin - 1 : end - begin - 1],
                                              window[first - begin :], reduction="sum")))
            scored_until = end
            if end == total:
                break
    return torch.tensor(sums, dtype=torch.float64)


def layer_hessians(model, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` of every compressible layer's inputs, the dense model run on ``batches``."""
    from worker.engine.modules import compressible_layers

    sums, counts, handles = {}, {}, []
    for layer in compressible_layers(model):
        def hook(module, args, name=layer.name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        handles.append(layer.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in batches:
                model(ids.reshape(1, -1))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / counts[name] for name, total in sums.items()}


def relative_errors(dense, compressed, hessians: dict[str, torch.Tensor]) -> dict[str, float]:
    from worker.engine.modules import compressible_layers

    after = {layer.name: layer.weight() for layer in compressible_layers(compressed)}
    errors = {}
    for layer in compressible_layers(dense):
        weight = layer.weight().double()
        delta = after[layer.name].double() - weight
        hessian = hessians[layer.name]
        errors[layer.name] = float(torch.trace(delta @ hessian @ delta.t())
                                   / torch.trace(weight @ hessian @ weight.t()))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True, help="bench/quality.py's inputs-*.safetensors")
    parser.add_argument("--train-text", type=Path, required=True, help="for the 128-sample variant")
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from worker.engine.calibration import calibration_batches
    from worker.engine.loading import load_model
    from worker.engine.pipeline import run_pipeline
    from worker.engine.registry import EngineContext
    from worker.evaluate import perplexity

    device = torch.device("cpu")
    inputs = load_file(str(args.inputs))
    eval_ids, seq_len, stride = inputs["eval_ids"], args.context, args.context // 2
    calibration = [sample.unsqueeze(0) for sample in inputs["calibration"]]
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    calibration_128 = calibration_batches(tokenizer, [args.train_text.read_text(encoding="utf-8")],
                                          128, seq_len, seed=0)
    dense = load_model(args.model, device)
    hessians_cal = layer_hessians(dense, calibration)
    held_out = [eval_ids[i : i + seq_len] for i in range(0, eval_ids.numel() - seq_len + 1, seq_len)]
    hessians_held = layer_hessians(dense, held_out)

    variants = [
        ("dense", [], calibration),
        ("rtn int4 g128", [QuantizeRTN(bits=4, group_size=128)], calibration),
        ("gptq int4 g128 (spec defaults: damp 0.01)", [QuantizeGPTQ(bits=4, group_size=128)], calibration),
        ("gptq + act_order", [QuantizeGPTQ(bits=4, group_size=128, act_order=True)], calibration),
        ("gptq damp 0.1", [QuantizeGPTQ(bits=4, group_size=128, dampening=0.1)], calibration),
        ("gptq 128 samples", [QuantizeGPTQ(bits=4, group_size=128)], calibration_128),
        ("rtn int4 g32", [QuantizeRTN(bits=4, group_size=32)], calibration),
        ("gptq int4 g32", [QuantizeGPTQ(bits=4, group_size=32)], calibration),
        ("rtn int4 per channel", [QuantizeRTN(bits=4, group_size=None)], calibration),
        ("gptq int4 per channel", [QuantizeGPTQ(bits=4, group_size=None)], calibration),
    ]
    reference = dense_nll = None
    print("| variant | ppl | Δlog ppl vs dense ± 2 s.e. | Δlog ppl vs rtn g128 ± 2 s.e. "
          "| layer error cal | layer error held-out | layers better than rtn g128 (cal / held-out) |")
    print("|---|---:|---:|---:|---:|---:|---:|")

    def paired(nll: torch.Tensor, base: torch.Tensor) -> str:
        diff = (nll - base) / ((eval_ids.numel() - 1) / nll.numel())  # per token, stride by stride
        mean, se = float(diff.mean()), float(diff.std() / math.sqrt(diff.numel()))
        return f"{mean:+.4f} ± {2 * se:.4f}"

    rtn_errors = None
    for name, stages, batches in variants:
        model = copy.deepcopy(dense)
        ctx = EngineContext(device=device, calibration=batches, tokenizer=tokenizer,
                            source_model_dir=args.model)
        run_pipeline(model, stages, ctx)
        model = ctx.model or model
        ppl = perplexity(model, eval_ids, seq_len, stride, device)
        nll = stride_nll(model, eval_ids, seq_len, stride)
        scored = eval_ids.numel() - 1
        assert abs(math.exp(float(nll.sum()) / scored) / ppl - 1) < 1e-9, "stride_nll is not the table's evaluation"
        errors = (relative_errors(dense, model, hessians_cal), relative_errors(dense, model, hessians_held))
        if name == "dense":
            dense_nll = nll
        if name == "rtn int4 g128":
            reference, rtn_errors = nll, errors
        versus_dense = paired(nll, dense_nll) if name != "dense" else ""
        if reference is not None and name != "rtn int4 g128":
            delta = paired(nll, reference)
            better = " / ".join(f"{sum(e[k] < r[k] for k in e)} of {len(e)}"
                                for e, r in zip(errors, rtn_errors))
        else:
            delta, better = "", ""
        mean_errors = [sum(e.values()) / len(e) for e in errors]
        print(f"| {name} | {ppl:.2f} | {versus_dense} | {delta} | {mean_errors[0]:.5f} | {mean_errors[1]:.5f} | {better} |",
              flush=True)


if __name__ == "__main__":
    main()
