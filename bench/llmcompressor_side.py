"""llm-compressor's side of ``bench/quality.py``: one oneshot recipe on one model, timed.

Runs in its own virtual environment, ``bench/.venv-lc`` (``python -m bench.quality
--setup-llmcompressor`` makes it): llm-compressor's pins (``LLMCOMPRESSOR_REQUIREMENTS`` there)
exclude the service's (pyproject.toml), so one environment cannot hold both. So this file imports
nothing from the project; the two sides exchange ``save_pretrained`` folders and a safetensors
file of calibration token ids::

    bench/.venv-lc/bin/python bench/llmcompressor_side.py --model IN --calibration inputs.safetensors \\
        --recipe sparsegpt-2:4 --out OUT --result result.json

``result.json``: ``{"status": "ok", "load_s": 0.4, "compress_s": 3.1, "save_s": 0.9,
"peak_rss_mib": 812.0, "idle_rss_mib": 402.0, "versions": {...}}`` (``compress_s`` is the
``oneshot`` call alone; ``peak_rss_mib`` is this process's peak resident memory, ``VmHWM``, read
after the model was saved; ``idle_rss_mib`` its resident memory before the model was loaded), or
``{"status": "error", "error": "..."}``. ``--dtype auto`` keeps the checkpoint's dtype
(``bench/scale.py``); the default, float32, is what ``bench/quality.py`` compares with.

The recipes match the rows of ``bench/quality.py``: every ``Linear`` of the decoder blocks,
``lm_head`` left alone, the same block size and dampening as our defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Files a client needs besides the weights and config.json (as worker/engine/export.py copies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json")

IGNORE = ["lm_head"]
# Our defaults: PruneSparseGPT / QuantizeGPTQ block_size 128, dampening 0.01.
BLOCK_SIZE = 128
DAMPENING = 0.01


def recipe(name: str):
    """The llm-compressor modifier(s) that do what our row of the same name does."""
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import MagnitudePruningModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    def sparsity(label: str) -> dict:
        if label == "2:4":
            return {"sparsity": 0.5, "mask_structure": "2:4"}
        return {"sparsity": int(label) / 100, "mask_structure": "0:0"}

    method, _, label = name.partition("-")
    if method == "magnitude":
        # A training-time modifier (a schedule of sparsities over epochs); in oneshot it is
        # started once, at its start, and its masks are applied then.
        args = sparsity(label)
        return MagnitudePruningModifier(
            targets=r"re:.*(layers|\.h)\.\d+\..*\.weight$",
            init_sparsity=args["sparsity"], final_sparsity=args["sparsity"],
            mask_structure="unstructured" if args["mask_structure"] == "0:0" else args["mask_structure"],
            start=0, end=1, update=1,
        )
    if method == "wanda":
        return WandaPruningModifier(targets=["Linear"], ignore=IGNORE, **sparsity(label))
    if method == "sparsegpt":
        return SparseGPTModifier(targets=["Linear"], ignore=IGNORE, block_size=BLOCK_SIZE,
                                 dampening_frac=DAMPENING, **sparsity(label))
    if name == "gptq-int4-g128":
        # W4A16: symmetric int4 weights, one scale per 128 inputs; no activation ordering, as ours.
        return GPTQModifier(targets=["Linear"], ignore=IGNORE, scheme="W4A16", block_size=BLOCK_SIZE,
                            dampening_frac=DAMPENING, actorder=None)
    if name == "rtn-int4-g128":
        return QuantizationModifier(targets=["Linear"], ignore=IGNORE, scheme="W4A16")
    if name == "rtn-int8":
        # Symmetric int8 weights, one scale per output channel (the W8A16 preset uses groups of
        # 128 instead, so the scheme is spelt out).
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        return QuantizationModifier(
            ignore=IGNORE, config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
        )
    if name == "w8a8-dynamic":
        # int8 per-channel weights, int8 activations quantized per token at run time.
        return QuantizationModifier(targets=["Linear"], ignore=IGNORE, scheme="W8A8")
    raise SystemExit(f"unknown recipe {name!r}")


def compress(model_dir: Path, calibration: Path, name: str, out_dir: Path, dtype: str = "float32") -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    idle_rss_mib = rss_mib()  # imports done, nothing loaded
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype), local_files_only=True)
    load_s = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = load_file(calibration)["calibration"]  # [samples, seq_len], the samples our rows get
    dataset = Dataset.from_dict({"input_ids": ids.tolist(),
                                 "attention_mask": torch.ones_like(ids).tolist()})
    modifier = recipe(name)
    quantizes = "Quantization" in type(modifier).__name__ or "GPTQ" in type(modifier).__name__

    started = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifier,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False)
    compress_s = time.perf_counter() - started

    # Pruned models are written dense, as our pruning rows are; quantized ones compressed
    # (int8 / packed int4 with scales), as ours are.
    started = time.perf_counter()
    model.save_pretrained(out_dir, save_compressed=quantizes)
    for file in TOKENIZER_FILES:
        if (model_dir / file).is_file():
            shutil.copyfile(model_dir / file, out_dir / file)
    return {"load_s": load_s, "compress_s": compress_s, "save_s": time.perf_counter() - started,
            "peak_rss_mib": peak_rss_mib(), "idle_rss_mib": idle_rss_mib}


def peak_rss_mib(field: str = "VmHWM") -> float:
    """This process's peak resident memory (``VmHWM``; not ``ru_maxrss``, which Linux carries
    across ``exec`` from the parent that started this process)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_mib() -> float:
    """This process's resident memory now (``VmRSS``)."""
    return peak_rss_mib("VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="save_pretrained folder (nn.Linear layers)")
    parser.add_argument("--calibration", type=Path, required=True, help="safetensors with 'calibration' [n, seq_len]")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--dtype", default="float32",
                        help="the model's dtype while compressed: float32 (bench/quality.py), or auto "
                             "(the checkpoint's, bench/scale.py)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    try:
        import compressed_tensors
        import llmcompressor
        import transformers

        result = {"status": "ok", **compress(args.model, args.calibration, args.recipe, args.out, args.dtype),
                  "versions": {"llmcompressor": llmcompressor.__version__,
                               "transformers": transformers.__version__,
                               "compressed-tensors": compressed_tensors.__version__}}
    except Exception as exc:  # reported in the comparison table, not a crash of the benchmark
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500]}
    args.result.write_text(json.dumps(result))
    sys.exit(0 if result["status"] == "ok" else 1)


if __name__ == "__main__":
    main()
