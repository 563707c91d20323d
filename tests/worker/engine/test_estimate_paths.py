"""The pre-flight estimate (``app/services/estimate.py``) against the engine it estimates: it
picks the path the engine picks (one decoder block at a time, or the model whole) for every
kind of job, and for a block-by-block GPTQ job its host figure bounds the peak resident memory
measured while the engine runs the job in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.checkpoints import UploadLimits
from app.checkpoints.inspection import inspect_checkpoint
from app.config import get_settings
from app.services.estimate import ModelFacts, estimate_job, whole_model_reason
from app.specs import JobSpec
from tests.factories import DATA, make_checkpoint, tokenizer
from worker.engine.blockwise import blockwise_refusal

CORPUS_FILE = DATA / "corpus.txt"
ROOT = Path(__file__).resolve().parents[3]


def facts_of(folder: Path) -> ModelFacts:
    """The facts the API records of ``folder`` when it is uploaded."""
    info = inspect_checkpoint(folder, UploadLimits.from_settings(get_settings()))
    config = json.loads((folder / "config.json").read_text())
    other = sum(f["size_bytes"] for f in info.files if not f["name"].endswith(".safetensors"))
    return ModelFacts(info.num_parameters, info.size_bytes, info.dtype, config, other)


def job(*stages: dict, output: str = "auto", evaluation: bool = False) -> JobSpec:
    sections = {"calibration": {"dataset_id": "ds_1", "samples": 4, "seq_len": 32}, "output": {"format": output}}
    if evaluation:
        sections["evaluation"] = {"dataset_id": "ds_1", "seq_len": 64, "stride": 32}
    return JobSpec.model_validate({"model_id": "mdl_1", "stages": list(stages), **sections})


MAGNITUDE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}
GPTQ = {"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32}
RTN = {"type": "quantize", "method": "rtn", "bits": 8}

JOBS = {
    "random": job({"type": "prune", "method": "random", "sparsity": 0.5}),
    "magnitude-layer": job(MAGNITUDE),
    "magnitude-2:4": job({**MAGNITUDE, "pattern": "2:4"}),
    "magnitude-global": job({**MAGNITUDE, "scope": "global"}),
    "wanda": job({"type": "prune", "method": "wanda", "sparsity": 0.5}),
    "sparsegpt": job({"type": "prune", "method": "sparsegpt", "sparsity": 0.5}),
    "structured": job({"type": "prune", "method": "structured", "sparsity": 0.25}),
    "rtn-auto": job(RTN),
    "rtn-dense": job(RTN, output="dense"),
    "rtn-compressed": job(RTN, output="compressed-tensors"),
    "gptq-auto": job(GPTQ, evaluation=True),
    "gptq-dense": job(GPTQ, output="dense"),
    "dynamic-int8": job({"type": "quantize", "method": "dynamic_int8"}),
    "sparsegpt-then-gptq": job({"type": "prune", "method": "sparsegpt", "sparsity": 0.5}, GPTQ),
    "magnitude-then-rtn-dense": job(MAGNITUDE, RTN, output="dense"),
    "global-then-rtn": job({**MAGNITUDE, "scope": "global"}, RTN),
    "distill": job(MAGNITUDE, {"type": "distill", "method": "kd", "dataset_id": "ds_1", "steps": 2}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: make_checkpoint(tmp_path_factory.mktemp(arch), arch, dtype=torch.bfloat16)
            for arch in ("gpt2", "llama")}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("name", JOBS)
def test_the_estimate_takes_the_path_the_engine_takes(name, arch, checkpoints):
    spec, folder = JOBS[name], checkpoints[arch]
    engine_reason = blockwise_refusal(folder, spec)
    facts = facts_of(folder)
    reason = whole_model_reason(spec)
    assert (reason is None) == (engine_reason is None), (reason, engine_reason)
    estimate = estimate_job(spec, {"mdl_1": facts}, {"ds_1": CORPUS_FILE.stat().st_size})
    assert estimate.onloading == ("block" if engine_reason is None else "whole")
    assert estimate.as_json()["onloading"] == estimate.onloading
    assert estimate.host_phase in ({"read", "block"} if engine_reason is None else {"load", "work", "reload"})


def test_the_engine_takes_both_paths_in_the_table(checkpoints):
    # The table above is only a check if it holds jobs of each path on each model.
    for folder in checkpoints.values():
        paths = {blockwise_refusal(folder, spec) is None for spec in JOBS.values()}
        assert paths == {True, False}


# -- The estimate bounds a measured peak ----------------------------------------------------

PEAK_JOB = job(GPTQ, evaluation=True)


def _resident(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _measure_in_this_process(work: str, checkpoint: str, spec_json: str) -> None:
    """Run by the child process: a warm-up job on the smallest llama (so the process is a
    worker that has run a job before: its libraries initialised, its allocator warm), then
    the resident memory as the process's own footprint, the peak reset, the job, its peak."""
    import gc

    from worker.engine.compress import JobHooks, compress

    class Corpus(JobHooks):
        def dataset_file(self, dataset_id):
            return CORPUS_FILE

    torch.set_num_threads(1)
    spec = JobSpec.model_validate_json(spec_json)
    warm_up = make_checkpoint(Path(work) / "warm-up", "llama", dtype=torch.bfloat16)
    compress(warm_up, spec, Path(work) / "warm-up-job", device="cpu", hooks=Corpus())
    gc.collect()
    idle = _resident("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the resident memory
    _, metrics = compress(Path(checkpoint), spec, Path(work) / "job", device="cpu", hooks=Corpus())
    print(json.dumps({"idle": idle, "peak": _resident("VmHWM:"), "onloading": metrics["onloading"]}))


def make_llama(folder: Path) -> Path:
    """A bf16 Llama wide enough that the job's own memory (the GPTQ sweep of a 1024-wide input,
    the Hessians) is tens of MB, well above what a process's resident memory wanders by."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=len(tokenizer()), max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0)
    folder.mkdir(parents=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def test_a_block_by_block_gptq_job_peaks_within_its_estimate(tmp_path):
    checkpoint = make_llama(tmp_path / "llama")
    child = (f"from tests.worker.engine.test_estimate_paths import _measure_in_this_process as m; "
             f"m({str(tmp_path)!r}, {str(checkpoint)!r}, {PEAK_JOB.model_dump_json()!r})")
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["onloading"] == "block"

    estimate = estimate_job(PEAK_JOB, {"mdl_1": facts_of(checkpoint)}, {"ds_1": CORPUS_FILE.stat().st_size},
                            process_bytes=measured["idle"])
    assert estimate.onloading == "block"
    job_bytes = measured["peak"] - measured["idle"]
    assert job_bytes > 16 * 2**20, measured  # the job itself used memory: the bound says something
    assert measured["peak"] <= estimate.host_bytes, (job_bytes, estimate.host_bytes - measured["idle"],
                                                     estimate.host_terms())
