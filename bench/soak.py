"""Soak test: many small jobs while workers are killed and restarted at random.

    python -m bench.soak --jobs 200 --workers 2 --kill-every 15

Starts the API and workers as real processes on PostgreSQL + Redis (as the end-to-end tests
do), submits the jobs, SIGKILLs a random worker every few seconds and starts a fresh one, and
when every job has ended prints how many reached a terminal state, how many ran to completion
twice, and how many artifacts each job has. The target is 200 / 0 / 1.
"""

from __future__ import annotations

import argparse
import collections
import random
import tempfile
import time
from pathlib import Path

import httpx

from tests.e2e.client import upload_model
from tests.e2e.stack import ServiceStack
from tests.factories import make_checkpoint

TERMINAL = {"succeeded", "failed", "cancelled"}
STAGES = [
    [{"type": "prune", "method": "magnitude", "sparsity": 0.5}, {"type": "quantize", "method": "rtn", "bits": 8}],
    [{"type": "prune", "method": "random", "sparsity": 0.3}],
    [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32}],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=15.0,
                        help="seconds between worker kills (a worker needs several to start on 2 cores)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    workdir = Path(tempfile.mkdtemp(prefix="squeeze-soak-"))
    stack = ServiceStack.postgres_redis(
        workdir, job_lease_s="4", reconcile_interval_s="1", job_max_attempts="10",
        max_active_jobs_per_tenant=str(args.jobs + 10), max_tenant_storage_bytes=str(50 * 1024**3))
    with stack.start(with_worker=False):
        names = [f"worker-{i}" for i in range(args.workers)]
        for name in names:
            stack.start_worker(name)
        client = stack.client
        model = upload_model(client, make_checkpoint(workdir / "model"))
        job_ids = [
            client.post("/v1/jobs", json={"model_id": model["id"], "stages": rng.choice(STAGES)}).json()["id"]
            for _ in range(args.jobs)
        ]
        print(f"submitted {len(job_ids)} jobs to {args.workers} workers; killing one every {args.kill_every} s")

        started, kills, generation = time.monotonic(), 0, args.workers
        next_kill = started + args.kill_every
        statuses: dict[str, str] = {}
        while time.monotonic() - started < args.timeout:
            try:
                statuses = {job["id"]: job["status"] for job in _all_jobs(client)}
            except (httpx.HTTPError, KeyError):  # the API may be restarting: look again shortly
                time.sleep(1)
                continue
            done = sum(statuses.get(j) in TERMINAL for j in job_ids)
            if done == len(job_ids):
                break
            if time.monotonic() >= next_kill:
                victim = rng.choice(names)
                stack.kill(victim)
                names.remove(victim)
                replacement = f"worker-{generation}"
                generation += 1
                stack.start_worker(replacement)
                names.append(replacement)
                kills += 1
                next_kill = time.monotonic() + args.kill_every
                print(f"  {time.monotonic() - started:6.0f} s: killed {victim}, started {replacement}; {done} jobs ended")
            time.sleep(0.5)

        completions = collections.Counter()
        for job_id in job_ids:
            events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
            completions[job_id] = sum(e["type"] == "status" and e["data"].get("status") == "succeeded" for e in events)
        artifacts = collections.Counter(
            sum(1 for _ in (stack.storage_root / "artifacts").glob(f"{job_id}-attempt*.tar")) for job_id in job_ids
            if statuses.get(job_id) == "succeeded"
        )
        terminal = sum(statuses.get(j) in TERMINAL for j in job_ids)
        by_status = collections.Counter(statuses.get(j) for j in job_ids)
        print(f"\nworkers killed: {kills}; wall time {time.monotonic() - started:.0f} s")
        print(f"jobs in a terminal state: {terminal} / {len(job_ids)}  ({dict(by_status)})")
        print(f"jobs that ran to completion twice: {sum(c > 1 for c in completions.values())}")
        print(f"artifacts per succeeded job: {dict(artifacts)} (count of jobs for each number of artifacts)")


def _all_jobs(client):
    after = None
    while True:
        page = client.get("/v1/jobs", params={"limit": 100, **({"after": after} if after else {})}).json()
        yield from page["data"]
        if not page["has_more"]:
            return
        after = page["data"][-1]["id"]


if __name__ == "__main__":
    main()
