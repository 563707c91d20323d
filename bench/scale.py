"""What compressing a real-sized model costs: time, peak memory and artifact size of the engine's
methods on a random bf16 Llama-style model, beside llm-compressor's and beside the time it takes
just to read the checkpoint and write a copy (issue 11)::

    nice -n 19 python -m bench.scale                              # the 0.72 B shape, four methods
    nice -n 19 python -m bench.scale --params 1e8 --methods magnitude-50,rtn-int8
    nice -n 19 python -m bench.scale --params 3e9 --methods gptq-int4-g128 --memory-limit 4294967296
    python -m bench.scale --quick --params 2e6 --methods rtn-int8 --no-llmcompressor  # smoke
    python -m bench.scale --table bench/.cache/scale.json     # the table of an earlier --json run

1. **Model.** A ``LlamaForCausalLM`` of the chosen shape (default hidden 2048, 16 layers, MLP
   5632, 32 heads / 4 KV heads: 0.72 B parameters with the bench's 4096-token tokenizer, a
   1.44 GB checkpoint), initialised by ``transformers`` (normal, std 0.02, seed 0) in bfloat16
   and written by ``save_pretrained`` (safetensors) with the tokenizer ``bench/quality.py``
   trains, cached under ``bench/.cache/models/`` by its shape. ``--params N`` picks a shape of
   about N parameters with the same proportions (head size 64, MLP 2.75 x hidden, a KV head per
   8 heads, hidden / 128 layers). The weights are random: quality is not measured here
   (``bench/quality.py`` does that), only cost.
2. **Floor.** The checkpoint's files read and written to a copy (64 MiB chunks, no fsync, best
   of two): the least any method that reads every weight and writes every weight can take.
3. **Idle footprint.** A process that imports what a method's process imports (Python, torch,
   transformers, the engine) and loads nothing: its peak RSS.
4. **Methods** (rows of ``bench/quality.py``, their stages and llm-compressor recipe). Each runs
   in a fresh process through ``worker.engine.compress.compress`` as a job does (inside the
   worker's ``memory_budget``, ``SQUEEZE_JOB_MEMORY_LIMIT_BYTES`` from ``--memory-limit``),
   without an evaluation section; with a calibration section (16 x 256 tokens of the training
   split, seed 0) when a stage needs one. Per phase (``load``, the stages, ``write``: the
   export's ``write_checkpoint``, ``reload``: the rest of ``compress``, which loads the artifact
   back to measure it) it records the wall time and the peak RSS (``VmHWM``, reset at each phase);
   a streamed job (data-free stages) writes during its stage. The parent records each process's
   CPU seconds: on a shared machine they compare two sides better than wall time.
5. **llm-compressor** (``bench/llmcompressor_side.py`` in ``bench/.venv-lc``) runs the matching
   recipe on the same checkpoint, in its dtype, with the same calibration token ids, and reports
   its load, ``oneshot`` and save times and its peak and idle RSS.
6. **Pre-flight estimate.** Where ``app/services/estimate.py`` exists, its host-memory estimate
   for the model and the job is printed beside the measured peak, with whether it bounds it.

Ratios: ``× floor`` and ``× llm-compressor`` divide load + compress + write by the floor and by
llm-compressor's load + oneshot + save. ``above idle / ckpt``: (peak RSS - idle footprint) /
checkpoint bytes, the issue's memory target (≤ 0.5 for a one-shot method).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub

from bench import quality  # noqa: E402
from bench.quality import BENCH_DIR, DATASET_ID, DEFAULT_CACHE, FULL, QUICK, log  # noqa: E402

METHODS = ("magnitude-50", "rtn-int8", "gptq-int4-g128", "sparsegpt-50")
CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN = 16, 256
HEAD_DIM = 64
CHUNK = 64 << 20  # bytes per read and write of the floor


# ---------------------------------------------------------------------------------------------
# The model: a shape, generated once and cached


@dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    layers: int = 16
    mlp: int = 5632
    heads: int = 32
    kv_heads: int = 4

    def parameters(self, vocab: int) -> int:
        """Untied embeddings and ``lm_head``, no biases, two norms a layer and a final one."""
        kv = self.kv_heads * (self.hidden // self.heads)
        layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.mlp + 2 * self.hidden
        return 2 * vocab * self.hidden + self.hidden + self.layers * layer

    def label(self) -> str:
        return f"h{self.hidden}-l{self.layers}-m{self.mlp}-a{self.heads}-kv{self.kv_heads}"


def shape_of_about(parameters: float, vocab: int) -> Shape:
    """The shape of about ``parameters`` with the default's proportions: the hidden size (a
    multiple of 64 below 512, of 256 above) whose layer count for that budget is closest to
    hidden / 128."""
    best = None
    for hidden in [*range(64, 512, 64), *range(512, 16385, 256)]:
        heads = hidden // HEAD_DIM
        kv_heads = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // 8))
        base = Shape(hidden, 0, max(64, round(2.75 * hidden / 64) * 64), heads, kv_heads)  # no layers
        per_layer = replace(base, layers=1).parameters(vocab) - base.parameters(vocab)
        layers = round((parameters - base.parameters(vocab)) / per_layer)
        if layers < 1:
            continue
        misfit = abs(math.log(layers / (hidden / 128)))
        if best is None or misfit < best[0]:
            best = (misfit, replace(base, layers=layers))
    if best is None:
        raise SystemExit(f"--params {parameters:.3g}: too few for one layer beside the embeddings")
    return best[1]


def cached_random_model(shape: Shape, tokenizer_dir: Path, cache: Path) -> Path:
    """The random bf16 model of ``shape`` with the bench tokenizer, generated if not cached."""
    key = quality.digest({"shape": asdict(shape), "tokenizer": tokenizer_dir.name, "seed": 0})
    folder = cache / "models" / f"llama-random-{shape.label()}-{key}"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    eos = tokenizer.convert_tokens_to_ids(quality.EOS)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.mlp,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=2048,
                         tie_word_embeddings=False, initializer_range=0.02,
                         bos_token_id=eos, eos_token_id=eos)
    log(f"generating a random bf16 Llama {shape.label()} ({shape.parameters(len(tokenizer)):,} parameters)")
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)  # normal(0, 0.02), norms 1
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)  # safetensors
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Measures the parent takes: the floor, and what an artifact holds


def read_write_floor(model_dir: Path, work: Path) -> dict[str, float]:
    """Seconds to read the checkpoint's weights files and to write a copy: best of two passes."""
    copy_dir = work / "floor-copy"
    buffer = bytearray(CHUNK)
    best = None
    for _ in range(2):
        shutil.rmtree(copy_dir, ignore_errors=True)
        copy_dir.mkdir(parents=True)
        read_s = write_s = 0.0
        for source in sorted(model_dir.glob("*.safetensors")):
            with open(source, "rb", buffering=0) as reader, open(copy_dir / source.name, "wb", buffering=0) as writer:
                while True:
                    started = time.perf_counter()
                    size = reader.readinto(buffer)
                    read_s += time.perf_counter() - started
                    if not size:
                        break
                    started = time.perf_counter()
                    writer.write(memoryview(buffer)[:size])
                    write_s += time.perf_counter() - started
        if best is None or read_s + write_s < best["read_s"] + best["write_s"]:
            best = {"read_s": read_s, "write_s": write_s}
    shutil.rmtree(copy_dir, ignore_errors=True)
    return {**best, "floor_s": best["read_s"] + best["write_s"]}


def artifact_summary(folder: Path) -> dict[str, Any]:
    """Bytes (every file but llm-compressor's ``recipe.yaml``) and, from the safetensors
    headers, tensor count and bytes per dtype; the zero fraction of one decoder MLP weight
    stored dense (a pruned method's check that it pruned)."""
    dtypes: dict[str, list[int]] = {}
    sample = None
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as file:
            header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            count_bytes = dtypes.setdefault(tensor["dtype"], [0, 0])
            count_bytes[0] += 1
            count_bytes[1] += tensor["data_offsets"][1] - tensor["data_offsets"][0]
            if sample is None and name.endswith("mlp.down_proj.weight") and tensor["dtype"] in ("BF16", "F16", "F32"):
                sample = (path, name)
    zeros = None
    if sample is not None:
        from safetensors import safe_open

        with safe_open(str(sample[0]), "pt") as file:
            weight = file.get_tensor(sample[1])
        zeros = float((weight == 0).float().mean())
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "recipe.yaml"]
    return {"bytes": sum(p.stat().st_size for p in files), "dtypes": dtypes, "mlp_zero_fraction": zeros}


def dtype_text(dtypes: dict[str, list[int]]) -> str:
    """``"BF16 0.05 GB (35), I32 0.35 GB (112)"``, largest first."""
    ordered = sorted(dtypes.items(), key=lambda item: -item[1][1])
    return ", ".join(f"{name} {size / 1e9:.3g} GB ({count})" for name, (count, size) in ordered)


# ---------------------------------------------------------------------------------------------
# A method's process (and the idle one)


@dataclass
class MethodJob:
    method: str  # a row of bench/quality.py, or "idle"
    model_dir: str
    train_text: str
    work_dir: str
    device: str


class Timeline:
    """Wall time and peak RSS of each phase of this process: ``mark(name)`` closes the current
    phase (its peak is ``VmHWM`` since it began) and starts the next."""

    def __init__(self):
        self.phases: list[dict[str, Any]] = []
        self.current, self.started = "imports", time.monotonic()

    def mark(self, name: str | None) -> None:
        now = time.monotonic()
        self.phases.append({"phase": self.current, "s": now - self.started,
                            "peak_rss_mib": quality.peak_rss_mib_of_this_process()})
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # the high-water mark starts again from what is resident now
        self.current, self.started = name, now

    def seconds(self, *names: str) -> float:
        return sum(phase["s"] for phase in self.phases if phase["phase"] in names)


def method_spec(method: str):
    """The job a method runs: its stages (``bench/quality.py``'s row), no evaluation, and a
    calibration section (16 x 256 tokens of the training split) only when a stage needs one."""
    from app.specs import CalibrationSpec, JobSpec, OutputSpec

    stages = quality.ROWS_BY_NAME[method].stages(FULL)
    needs_calibration = any(stage.requires_calibration for stage in stages)
    return JobSpec(model_id="bench", stages=stages, output=OutputSpec(), calibration=(
        CalibrationSpec(dataset_id=DATASET_ID, samples=CALIBRATION_SAMPLES, seq_len=CALIBRATION_SEQ_LEN, seed=0)
        if needs_calibration else None))


def run_method(job: MethodJob) -> dict[str, Any]:
    """A method's job through ``compress`` as the worker runs it; its phases' times and peaks."""
    timeline = Timeline()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from app.config import get_settings
    from worker.engine import compress as engine
    from worker.engine.registry import discover

    discover()
    if job.method == "idle":
        timeline.mark(None)
        return {"status": "ok", "peak_rss_mib": timeline.phases[0]["peak_rss_mib"]}

    spec = method_spec(job.method)
    limit = get_settings().job_memory_limit_bytes

    class Hooks(engine.JobHooks):
        def phase_started(self, name: str, stage_index: int | None, progress: float) -> None:
            timeline.mark(name)

        def dataset_file(self, dataset_id: str) -> Path:
            return Path(job.train_text)

    write, wrote = getattr(engine, "write_checkpoint", None), []
    if write is not None:  # the end of the export's writing: what follows reloads the artifact
        def timed_write(*args, **kwargs):
            result = write(*args, **kwargs)
            wrote.append(True)
            timeline.mark("reload")
            return result

        engine.write_checkpoint = timed_write
    with _memory_budget(limit):
        artifact_dir, metrics = engine.compress(Path(job.model_dir), spec, Path(job.work_dir),
                                                device=job.device, hooks=Hooks())
    timeline.mark(None)
    if not wrote:
        # The streamed path (data-free stages) writes the artifact as its stages go: its
        # "export" phase only reloads the artifact, and the writing is in the stages' time.
        for phase in timeline.phases:
            phase["phase"] = "reload" if phase["phase"] == "export" else phase["phase"]
    not_stages = {"imports", "load", "export", "reload"}
    return {"status": "ok", "phases": timeline.phases, "job_s": metrics["wall_time_s"],
            "load_s": timeline.seconds("load"),
            "compress_s": sum(p["s"] for p in timeline.phases if p["phase"] not in not_stages),
            "write_s": timeline.seconds("export"), "reload_s": timeline.seconds("reload"),
            "peak_rss_mib": max(p["peak_rss_mib"] for p in timeline.phases),
            "streamed": not wrote, "format": metrics["export"]["format"], "artifact_dir": str(artifact_dir),
            "memory_limit_bytes": limit}


def _memory_budget(limit: int | None):
    """The worker's own ``memory_budget`` (imported only when there is a limit: ``worker.tasks``
    pulls in Celery and SQLAlchemy, which the idle footprint does not count)."""
    if not limit:
        import contextlib

        return contextlib.nullcontext()
    from worker.tasks import memory_budget

    return memory_budget(limit)


def cpu_seconds_of_children() -> float:
    """User + system CPU seconds of this process's finished children: around one child's run,
    its CPU time, which other work on a shared machine disturbs much less than its wall time."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_in_subprocess(job: MethodJob, memory_limit: int | None) -> dict[str, Any]:
    work = Path(job.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ)
    if memory_limit:
        env["SQUEEZE_JOB_MEMORY_LIMIT_BYTES"] = str(memory_limit)
    cpu = cpu_seconds_of_children()
    process = subprocess.run([sys.executable, "-m", "bench.scale", "--_method", json.dumps(asdict(job))],
                             cwd=BENCH_DIR.parent, env=env, capture_output=True, text=True)
    cpu = cpu_seconds_of_children() - cpu
    result_path = work / "result.json"
    if result_path.exists():
        return {**json.loads(result_path.read_text()), "cpu_s": cpu}
    (work / "stderr.txt").write_text(process.stderr)
    tail = (process.stderr or process.stdout).strip().splitlines()[-3:]
    return {"status": "error", "reason": f"exit {process.returncode}: {' | '.join(tail)}"[:300]}


# ---------------------------------------------------------------------------------------------
# llm-compressor and the pre-flight estimate


def run_llmcompressor(method: str, model_dir: Path, inputs_path: Path, work: Path) -> dict[str, Any]:
    recipe = quality.ROWS_BY_NAME[method].llmcompressor
    if recipe is None:
        return {"status": "n/a", "reason": "no matching recipe"}
    python = quality.setup_llmcompressor()
    out, result_path = work / "llmcompressor" / method, work / "llmcompressor" / f"{method}.json"
    shutil.rmtree(out, ignore_errors=True)
    result_path.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = cpu_seconds_of_children()
    process = subprocess.run(
        [str(python), str(quality.LLMCOMPRESSOR_SIDE), "--model", str(model_dir), "--calibration",
         str(inputs_path), "--recipe", recipe, "--dtype", "auto", "--out", str(out), "--result", str(result_path)],
        capture_output=True, text=True)
    cpu = cpu_seconds_of_children() - cpu
    (work / "llmcompressor" / f"{method}.log").write_text(process.stdout + process.stderr)
    result = ({**json.loads(result_path.read_text()), "cpu_s": cpu} if result_path.exists()
              else {"status": "error", "reason": f"exit {process.returncode}"})
    if result["status"] == "ok":
        result["artifact"] = artifact_summary(out)
    result.setdefault("reason", result.get("error", ""))
    if not os.environ.get("BENCH_KEEP_ARTIFACTS"):
        shutil.rmtree(out, ignore_errors=True)
    return result


def did_nothing(theirs: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any] | None:
    """An "invalid" result where our method pruned and llm-compressor's left the weights dense
    (its magnitude modifier, a training-time one, prunes nothing in ``oneshot``), else None."""
    ours_zeros = (ours.get("artifact") or {}).get("mlp_zero_fraction")
    their_zeros = (theirs.get("artifact") or {}).get("mlp_zero_fraction")
    if theirs.get("status") == "ok" and ours_zeros and ours_zeros > 0.25 and their_zeros is not None and their_zeros < 0.01:
        return {**theirs, "status": "invalid",
                "reason": f"weights not pruned (MLP zeros {their_zeros:.2f}) in {theirs['load_s'] + theirs['compress_s'] + theirs['save_s']:.1f} s"}
    return None


def preflight_estimate(model_dir: Path, parameters: int, method: str, train_text: Path) -> dict[str, Any] | None:
    """The host-memory estimate of ``app/services/estimate.py`` for this job (``{"host_mib",
    "phase"}``, or ``{"error"}``), or None while that module does not exist."""
    try:
        from app.services import estimate
    except ImportError:
        return None
    try:
        config = json.loads((model_dir / "config.json").read_text())
        facts = estimate.ModelFacts(
            num_parameters=parameters,
            size_bytes=sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file()),
            dtype=config.get("dtype") or config.get("torch_dtype"), config=config)
        result = estimate.estimate_job(method_spec(method), {"bench": facts},
                                       {DATASET_ID: train_text.stat().st_size})
        return {"host_mib": result.host_bytes / 2**20, "phase": result.host_phase}
    except Exception as exc:  # the estimate is being written alongside: report, do not crash
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


# ---------------------------------------------------------------------------------------------
# The table


def report_table(report: dict[str, Any]) -> str:
    return table(Shape(**report["shape"]), report["parameters"], report["checkpoint_bytes"],
                 report["checkpoint_folder_bytes"], report["floor"], report["idle_rss_mib"], report["results"],
                 report["llmcompressor"], report["estimates"])


def table(shape: Shape, parameters: int, checkpoint_bytes: int, checkpoint_folder_bytes: int, floor: dict,
          idle_mib: float, results: dict[str, dict], theirs: dict[str, dict], estimates: dict[str, Any]) -> str:
    gb = checkpoint_bytes / 1e9
    lines = [f"### Llama {shape.label()}: {parameters / 1e9:.3f} B parameters, bf16 checkpoint {gb:.2f} GB",
             "", f"Floor (read {floor['read_s']:.2f} s + write a copy {floor['write_s']:.2f} s): "
             f"**{floor['floor_s']:.2f} s**. Idle process (Python + torch + transformers + engine): "
             f"**{idle_mib:.0f} MiB**.", "",
             "| method | side | load s | compress s | write s | l+c+w s | job s | × floor | × llm-compressor | process CPU s | CPU × llm-compressor "
             "| peak RSS MiB | peak in | above idle MiB | above idle / ckpt | estimate MiB | artifact GB | × ckpt | tensors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for method, ours in results.items():
        other = theirs.get(method, {})
        their_total = (other["load_s"] + other["compress_s"] + other["save_s"]) if other.get("status") == "ok" else None
        for side, result in (("squeeze", ours), ("llm-compressor", other)):
            if not result:
                continue
            if result.get("status") != "ok":
                lines.append(f"| {method} | {side} | {result.get('status')}: {result.get('reason', '')[:160]} |" + " |" * 16)
                continue
            if side == "squeeze":
                load, work, write, job = result["load_s"], result["compress_s"], result["write_s"], f"{result['job_s']:.1f}"
                idle = idle_mib
                estimate_text = _estimate_text(estimates.get(method), result["peak_rss_mib"])
            else:
                load, work, write, job = result["load_s"], result["compress_s"], result["save_s"], "–"
                idle, estimate_text = result.get("idle_rss_mib", math.nan), "–"
            total = load + work + write
            write_text = "(in compress)" if result.get("streamed") else f"{write:.1f}"
            versus = f"{total / their_total:.2f}" if their_total and side == "squeeze" else "–"
            cpu, their_cpu = result.get("cpu_s"), other.get("cpu_s") if other.get("status") == "ok" else None
            cpu_versus = f"{cpu / their_cpu:.2f}" if cpu and their_cpu and side == "squeeze" else "–"
            cpu_text = f"{cpu:.0f}" if cpu is not None else "–"
            above = result["peak_rss_mib"] - idle
            artifact = result["artifact"]
            zeros = artifact.get("mlp_zero_fraction")
            tensors = dtype_text(artifact["dtypes"]) + (f"; MLP zeros {zeros:.2f}" if zeros is not None else "")
            lines.append(
                f"| {method} | {side} | {load:.1f} | {work:.1f} | {write_text} | {total:.1f} | {job} "
                f"| {total / floor['floor_s']:.1f} | {versus} | {cpu_text} | {cpu_versus} | {result['peak_rss_mib']:.0f} | {peak_phase(result)} | {above:.0f} "
                f"| {above * 2**20 / checkpoint_bytes:.2f} | {estimate_text} | {artifact['bytes'] / 1e9:.3f} "
                f"| {artifact['bytes'] / checkpoint_folder_bytes:.2f} | {tensors} |")
    return "\n".join(lines)


def peak_phase(result: dict[str, Any]) -> str:
    phases = result.get("phases")
    return max(phases, key=lambda phase: phase["peak_rss_mib"])["phase"] if phases else "–"


def _estimate_text(estimate: dict[str, Any] | None, peak_mib: float) -> str:
    if estimate is None:
        return "–"
    if "error" in estimate:
        return f"error: {estimate['error'][:80]}"
    bound = "≥ peak: ok" if estimate["host_mib"] >= peak_mib else "**< peak: NOT a bound**"
    return f"{estimate['host_mib']:.0f} ({bound})"


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, metavar="N",
                        help="a shape of about N parameters (default: the 0.72 B shape, hidden 2048, 16 layers)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated rows of bench/quality.py (default {','.join(METHODS)})")
    parser.add_argument("--quick", action="store_true",
                        help="bench/quality.py's quick tokenizer (512 tokens, trained on 400,000 characters): a smoke run")
    parser.add_argument("--no-llmcompressor", action="store_true", help="skip llm-compressor's side")
    parser.add_argument("--memory-limit", type=int, metavar="BYTES",
                        help="SQUEEZE_JOB_MEMORY_LIMIT_BYTES for the methods' processes")
    parser.add_argument("--device", default="auto", help="the engine's device: auto, cpu, cuda:N")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--table", type=Path, metavar="JSON", help="only print the table of an earlier --json report")
    parser.add_argument("--_method", help=argparse.SUPPRESS)  # a method's subprocess
    args = parser.parse_args(argv)
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    for name in args.methods:
        if name not in quality.ROWS_BY_NAME or not quality.ROWS_BY_NAME[name].stages(FULL):
            parser.error(f"unknown method {name!r}: a row of bench/quality.py with a stage, e.g. {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._method:
        job = MethodJob(**json.loads(args._method))
        try:
            result = run_method(job)
        except BaseException as exc:  # a failing method (out of memory too) is a row of the table
            import traceback

            traceback.print_exc()
            result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:300]}
        (Path(job.work_dir) / "result.json").write_text(json.dumps(result, default=str))
        return

    if args.table:
        print(report_table(json.loads(args.table.read_text())))
        return
    started = time.monotonic()
    cache = args.cache_dir.resolve()
    settings = replace(QUICK if args.quick else FULL, calibration_samples=CALIBRATION_SAMPLES, calibration_seq_len=CALIBRATION_SEQ_LEN)
    corpus = quality.load_corpus()
    train_text, held_out_text = quality.corpus_files(corpus, settings, cache)
    tokenizer_dir = quality.cached_tokenizer(train_text.read_text(encoding="utf-8"), corpus.sha256, settings, cache)
    inputs_path = quality.cached_inputs(tokenizer_dir, train_text, held_out_text, settings)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    shape = Shape() if args.params is None else shape_of_about(args.params, vocab)
    model_dir = cached_random_model(shape, tokenizer_dir, cache)
    parameters = shape.parameters(vocab)
    checkpoint_bytes = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))  # weights
    checkpoint_folder_bytes = sum(path.stat().st_size for path in model_dir.iterdir() if path.is_file())
    work = cache / "runs" / model_dir.name
    work.mkdir(parents=True, exist_ok=True)

    floor = read_write_floor(model_dir, work)
    log(f"floor: read {floor['read_s']:.2f} s, write {floor['write_s']:.2f} s")
    idle = run_in_subprocess(MethodJob("idle", str(model_dir), str(train_text), str(work / "idle"), args.device), None)
    if idle["status"] != "ok":
        raise SystemExit(f"the idle process failed: {idle.get('reason')}")
    log(f"idle process: {idle['peak_rss_mib']:.0f} MiB")
    report: dict[str, Any] = {"shape": asdict(shape), "parameters": parameters, "checkpoint_bytes": checkpoint_bytes,
                              "checkpoint_folder_bytes": checkpoint_folder_bytes,
                              "floor": floor, "idle_rss_mib": idle["peak_rss_mib"], "memory_limit_bytes": args.memory_limit,
                              "results": {}, "llmcompressor": {}, "estimates": {}}
    for method in args.methods:
        log(f"{method}")
        result = run_in_subprocess(MethodJob(method, str(model_dir), str(train_text), str(work / method), args.device),
                                   args.memory_limit)
        if result["status"] == "ok":
            result["artifact"] = artifact_summary(Path(result["artifact_dir"]))
            if not os.environ.get("BENCH_KEEP_ARTIFACTS"):
                shutil.rmtree(result["artifact_dir"], ignore_errors=True)
            log(f"  {result['load_s'] + result['compress_s'] + result['write_s']:.1f} s, peak {result['peak_rss_mib']:.0f} MiB")
        else:
            log(f"  {result['status']}: {result.get('reason')} (see {work / method / 'stderr.txt'})")
        result["load_average"] = os.getloadavg()[0]  # the machine's, as the method ended
        report["results"][method] = result
        report["estimates"][method] = preflight_estimate(model_dir, parameters, method, train_text)
        if not args.no_llmcompressor:
            log(f"  llm-compressor {quality.ROWS_BY_NAME[method].llmcompressor}")
            theirs = run_llmcompressor(method, model_dir, inputs_path, work)
            theirs["load_average"] = os.getloadavg()[0]
            report["llmcompressor"][method] = did_nothing(theirs, result) or theirs
        quality.write_report(args.json, report)  # as it goes
    print(report_table(report) + "\n", flush=True)
    log(f"done in {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
