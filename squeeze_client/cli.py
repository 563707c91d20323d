"""``squeeze``: the Squeeze service from a shell.

    export SQUEEZE_URL=http://127.0.0.1:8000 SQUEEZE_API_KEY=sk_...
    MODEL=$(squeeze models upload var/tiny-gpt2 --name tiny --metadata team=search)
    DATA=$(squeeze datasets upload var/corpus.txt)
    JOB=$(squeeze jobs submit examples/prune-quantize.yaml --model $MODEL --dataset $DATA)
    squeeze jobs watch $JOB            # live progress; exit 0 on succeeded, 1 on failed/cancelled
    squeeze jobs download $JOB -o compressed.tar
    squeeze jobs list --status running --json

Ids and file names go to stdout (so ``$(...)`` captures them); progress bars, logs and
errors go to stderr. ``--url`` and ``--api-key`` default to ``SQUEEZE_URL`` and
``SQUEEZE_API_KEY``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import httpx

from squeeze_client.client import DEFAULT_URL, TERMINAL_STATUSES, SqueezeClient, SqueezeError
from squeeze_client.schema import required_references


# -- output helpers ---------------------------------------------------------------------------


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class ProgressBar:
    """A one-line progress bar on stderr. On a terminal it redraws in place (``\\r``); into a
    file or pipe it prints a line every tenth instead, so logs stay readable.

    >>> bar = ProgressBar("upload", unit="bytes")
    >>> bar.update(512, 1024); bar.log("half way"); bar.update(1024, 1024); bar.close()
    """

    WIDTH = 28

    def __init__(self, label: str = "", *, unit: str = "bytes", stream: TextIO | None = None,
                 tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.label, self.unit = label, unit
        self.done: float = 0
        self.total: float | None = None
        self.started = time.monotonic()
        self._drawn_at = 0.0
        self._drawn_len = 0
        self._logged_tenth = -1

    def update(self, done: float, total: float | None = None, label: str | None = None) -> None:
        self.done = done
        self.total = total if total is not None else self.total
        if label is not None:
            self.label = label
        finished = self.total is not None and done >= self.total
        if self.tty:
            if finished or time.monotonic() - self._drawn_at >= 0.1:
                self._draw()
            return
        fraction = self._fraction()
        tenth = int(10 * fraction) if fraction is not None else -1
        if tenth > self._logged_tenth or (fraction is None and time.monotonic() - self._drawn_at >= 10):
            self._logged_tenth, self._drawn_at = tenth, time.monotonic()
            self.stream.write(self._render() + "\n")
            self.stream.flush()

    def log(self, message: str) -> None:
        """A line above the bar (the bar is redrawn below it on a terminal)."""
        if self.tty:
            self.stream.write("\r" + message.ljust(self._drawn_len) + "\n")
            self._drawn_len = 0
            self._draw()
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn_len:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self._drawn_len = 0

    def _fraction(self) -> float | None:
        if self.unit == "fraction":
            return max(0.0, min(1.0, self.done))
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))

    def _render(self) -> str:
        fraction = self._fraction()
        parts = [self.label] if self.label else []
        if fraction is not None:
            filled = int(round(fraction * self.WIDTH))
            parts.append("[" + "#" * filled + "." * (self.WIDTH - filled) + "]")
            parts.append(f"{fraction * 100:5.1f}%")
        if self.unit == "bytes":
            elapsed = max(time.monotonic() - self.started, 1e-6)
            sizes = human_bytes(self.done) + (f" / {human_bytes(self.total)}" if self.total else "")
            parts.append(f"{sizes}  {human_bytes(self.done / elapsed)}/s")
        return "  ".join(parts)

    def _draw(self) -> None:
        line = self._render()
        self.stream.write("\r" + line.ljust(self._drawn_len))
        self.stream.flush()
        self._drawn_len = len(line)
        self._drawn_at = time.monotonic()


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False, default=str))


def print_table(rows: Iterable[dict], columns: list[tuple[str, Any]]) -> int:
    """Columns are (heading, function of the row). Returns the number of rows."""
    table = [[heading for heading, _ in columns]]
    for row in rows:
        cells = [cell(row) for _, cell in columns]
        table.append(["-" if value is None else str(value) for value in cells])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip())
    return len(table) - 1


def short_time(value: str | None) -> str | None:
    return value.replace("T", " ")[:19] if value else None


# -- commands ---------------------------------------------------------------------------------


def parse_metadata(pairs: list[str] | None) -> dict[str, str]:
    metadata = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata takes key=value, got {pair!r}")
        metadata[key] = value
    return metadata


class UsageError(Exception):
    """A mistake in the command line or the spec file: exit status 2."""


def cmd_models_upload(client: SqueezeClient, args) -> int:
    bar = ProgressBar(f"upload {Path(args.path).name}")
    model = client.upload_model(args.path, name=args.name, metadata=parse_metadata(args.metadata),
                                progress=bar.update)
    bar.close()
    print(f"model {model['id']}: {model['architecture']}, {model['num_parameters']:,} parameters, "
          f"{human_bytes(model['size_bytes'])}", file=sys.stderr)
    print_json(model) if args.json else print(model["id"])
    return 0


def cmd_datasets_upload(client: SqueezeClient, args) -> int:
    bar = ProgressBar(f"upload {Path(args.path).name}")
    dataset = client.upload_dataset(args.path, name=args.name, metadata=parse_metadata(args.metadata),
                                    progress=bar.update)
    bar.close()
    print(f"dataset {dataset['id']}: {dataset['format']}, {dataset['num_records']:,} records, "
          f"{human_bytes(dataset['size_bytes'])}", file=sys.stderr)
    print_json(dataset) if args.json else print(dataset["id"])
    return 0


def _list(rows: Iterable[dict], args, columns) -> int:
    rows = islice(rows, args.limit) if args.limit else rows
    if args.json:
        print_json(list(rows))
    else:
        print_table(rows, columns)
    return 0


def cmd_models_list(client: SqueezeClient, args) -> int:
    return _list(client.list_models(metadata=parse_metadata(args.metadata) or None), args, [
        ("ID", lambda m: m["id"]), ("NAME", lambda m: m["name"]), ("ARCHITECTURE", lambda m: m["architecture"]),
        ("PARAMETERS", lambda m: f"{m['num_parameters']:,}"), ("SIZE", lambda m: human_bytes(m["size_bytes"])),
        ("CREATED", lambda m: short_time(m["created_at"])),
    ])


def cmd_datasets_list(client: SqueezeClient, args) -> int:
    return _list(client.list_datasets(metadata=parse_metadata(args.metadata) or None), args, [
        ("ID", lambda d: d["id"]), ("NAME", lambda d: d["name"]), ("FORMAT", lambda d: d["format"]),
        ("RECORDS", lambda d: f"{d['num_records']:,}"), ("SIZE", lambda d: human_bytes(d["size_bytes"])),
        ("CREATED", lambda d: short_time(d["created_at"])),
    ])


def cmd_jobs_list(client: SqueezeClient, args) -> int:
    jobs = client.list_jobs(status=args.status, model_id=args.model, metadata=parse_metadata(args.metadata) or None)
    return _list(jobs, args, [
        ("ID", lambda j: j["id"]), ("STATUS", lambda j: j["status"]), ("STAGE", lambda j: j["stage"]),
        ("PROGRESS", lambda j: f"{j['progress'] * 100:.0f}%"), ("MODEL", lambda j: j["model_id"]),
        ("CREATED", lambda j: short_time(j["created_at"])),
    ])


def cmd_get(kind: str):
    def run(client: SqueezeClient, args) -> int:
        obj = getattr(client, f"get_{kind}")(args.id)
        if args.json:
            print_json(obj)
        else:
            width = max(len(k) for k in obj)
            for key, value in obj.items():
                text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else value
                print(f"{key.ljust(width)}  {'-' if text is None else text}")
        return 0
    return run


def load_spec(path: str) -> dict:
    import yaml

    source = Path(path)
    text = sys.stdin.read() if path == "-" else source.read_text()
    try:
        spec = json.loads(text) if source.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: not valid {'JSON' if source.suffix.lower() == '.json' else 'YAML'}: {exc}") from exc
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: a job spec is a mapping (model_id, stages, ...)")
    return spec


# The command-line option that fills each kind of reference (``x-squeeze-ref`` in the schema).
REFERENCE_OPTIONS = {"model": "--model", "dataset": "--dataset"}


def fill_spec(spec: dict, openapi: dict, **ids: str | None) -> dict:
    """``--model`` fills every required model reference the spec leaves empty (``model_id``),
    ``--dataset`` every required dataset reference (the calibration and evaluation sections the
    spec has, distillation stages): the fields come from the server's schema (``x-squeeze-ref``),
    so a new one needs no change here. A value the spec already holds is never overwritten: a
    different one on the command line is an error. ``ids`` is ``model=..., dataset=...``."""
    spec = copy.deepcopy(spec)
    for slot in required_references(spec, openapi):
        given, option = ids.get(slot.kind), REFERENCE_OPTIONS.get(slot.kind)
        held = slot.holder.get(slot.key)
        if given:
            if held not in (None, "", given):
                raise UsageError(f"the spec names {slot.path} {held}; drop {option} or the spec's {slot.key}")
            slot.holder[slot.key] = given
        elif not held:
            raise UsageError(f"the spec has no {slot.path}: add one" + (f" or pass {option}" if option else ""))
    return spec


def _metrics_summary(job: dict) -> str:
    metrics = job.get("metrics") or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    parts = []
    if before.get("size_bytes") and after.get("size_bytes"):
        parts.append(f"size {human_bytes(before['size_bytes'])} -> {human_bytes(after['size_bytes'])} "
                     f"({before['size_bytes'] / after['size_bytes']:.2f}x smaller)")
    if after.get("sparsity") is not None:
        parts.append(f"sparsity {after['sparsity']:.1%}")
    if after.get("bits_per_weight") is not None:
        parts.append(f"{after['bits_per_weight']:.2f} bits/weight")
    if before.get("perplexity") is not None and after.get("perplexity") is not None:
        parts.append(f"perplexity {before['perplexity']:.4g} -> {after['perplexity']:.4g}")
    return ", ".join(parts)


def watch(client: SqueezeClient, job_id: str, timeout: float | None = None) -> int:
    """Follow a job on stderr until it ends: 0 when it succeeded, 1 otherwise."""
    bar = ProgressBar(job_id, unit="fraction")

    def on_event(event: dict) -> None:
        kind, data, message = event.get("type"), event.get("data") or {}, event.get("message", "")
        if kind == "progress" and data.get("progress") is not None:
            bar.update(float(data["progress"]))
        elif kind == "stage":
            bar.log(f"  stage   {data.get('stage') or message}")
            bar.update(bar.done, label=data.get("stage") or bar.label)
        elif kind == "status":
            bar.log(f"  status  {data.get('status') or message}")
            if data.get("status") == "succeeded":
                bar.update(1.0)
        else:
            bar.log(f"  {kind:7} {message}")

    job = client.wait(job_id, on_event=on_event, timeout=timeout)
    bar.close()
    status = job["status"]
    if status == "succeeded":
        summary = _metrics_summary(job)
        artifact = job.get("artifact") or {}
        print(f"job {job_id} succeeded" + (f": {summary}" if summary else ""), file=sys.stderr)
        if artifact:
            print(f"artifact {artifact.get('format')}, {human_bytes(artifact.get('size_bytes'))}, "
                  f"sha256 {artifact.get('sha256')}", file=sys.stderr)
        return 0
    error = job.get("error") or {}
    detail = f": {error.get('type')}: {error.get('message')}" if error else ""
    print(f"job {job_id} {status}{detail}", file=sys.stderr)
    return 1


def cmd_jobs_submit(client: SqueezeClient, args) -> int:
    spec = fill_spec(load_spec(args.spec), client.openapi(), model=args.model, dataset=args.dataset)
    job = client.create_job(spec)
    print_json(job) if args.json else print(job["id"], flush=True)
    print(f"job {job['id']} {job['status']}", file=sys.stderr)
    return watch(client, job["id"], args.timeout) if args.watch else 0


def cmd_jobs_watch(client: SqueezeClient, args) -> int:
    return watch(client, args.job, args.timeout)


def cmd_jobs_cancel(client: SqueezeClient, args) -> int:
    job = client.cancel_job(args.job)
    if args.json:
        print_json(job)
    else:
        print(f"{job['id']} {job['status']}" + (" (cancel requested)" if job["status"] not in TERMINAL_STATUSES else ""))
    return 0


def cmd_jobs_download(client: SqueezeClient, args) -> int:
    dest = args.output or f"{args.job}.tar"
    bar = ProgressBar(f"download {Path(dest).name}")
    result = client.download_artifact(args.job, dest, progress=bar.update)
    bar.close()
    print(f"sha256 {result.sha256} verified, {human_bytes(result.size_bytes)}", file=sys.stderr)
    print(result.path)
    return 0


# -- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # --url and --api-key work before or after the subcommand: the leaf copies default to
    # SUPPRESS so they only override the top-level values when given.
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", default=argparse.SUPPRESS, help="the server (env SQUEEZE_URL)")
    connection.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env SQUEEZE_API_KEY)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the raw JSON")

    parser = argparse.ArgumentParser(prog="squeeze", description="Compress language models with a Squeeze server.")
    parser.add_argument("--url", default=os.environ.get("SQUEEZE_URL") or DEFAULT_URL,
                        help="the server (default: env SQUEEZE_URL, else %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("SQUEEZE_API_KEY"),
                        help="API key (default: env SQUEEZE_API_KEY)")
    groups = parser.add_subparsers(dest="group", required=True, metavar="{models,datasets,jobs}")
    common = [connection]

    models = groups.add_parser("models", help="upload and list checkpoints").add_subparsers(dest="action", required=True)
    p = models.add_parser("upload", parents=common + [as_json], help="upload a save_pretrained folder or an archive")
    p.add_argument("path", help="a folder, or one .zip / .tar / .tar.gz file (large archives go in resumable parts)")
    p.add_argument("--name")
    p.add_argument("--metadata", nargs="+", action="extend", metavar="KEY=VALUE", help="labels, e.g. team=search")
    p.set_defaults(run=cmd_models_upload)
    p = models.add_parser("list", parents=common + [as_json], help="list models, newest first")
    p.add_argument("--limit", type=int, help="show at most this many")
    p.add_argument("--metadata", nargs="+", action="extend", metavar="KEY=VALUE", help="filter by labels")
    p.set_defaults(run=cmd_models_list)
    p = models.add_parser("get", parents=common + [as_json], help="show one model")
    p.add_argument("id")
    p.set_defaults(run=cmd_get("model"))

    datasets = groups.add_parser("datasets", help="upload and list text datasets").add_subparsers(dest="action", required=True)
    p = datasets.add_parser("upload", parents=common + [as_json], help="upload a .txt or .jsonl file")
    p.add_argument("path")
    p.add_argument("--name")
    p.add_argument("--metadata", nargs="+", action="extend", metavar="KEY=VALUE")
    p.set_defaults(run=cmd_datasets_upload)
    p = datasets.add_parser("list", parents=common + [as_json], help="list datasets, newest first")
    p.add_argument("--limit", type=int)
    p.add_argument("--metadata", nargs="+", action="extend", metavar="KEY=VALUE", help="filter by labels")
    p.set_defaults(run=cmd_datasets_list)
    p = datasets.add_parser("get", parents=common + [as_json], help="show one dataset")
    p.add_argument("id")
    p.set_defaults(run=cmd_get("dataset"))

    jobs = groups.add_parser("jobs", help="submit, follow and download compression jobs").add_subparsers(dest="action", required=True)
    p = jobs.add_parser("submit", parents=common + [as_json], help="submit a job spec (YAML or JSON)")
    p.add_argument("spec", help="SPEC.yaml or SPEC.json ('-' reads YAML from stdin)")
    p.add_argument("--model", help="model_id, when the spec has none")
    p.add_argument("--dataset", help="the dataset_id of the spec's calibration, evaluation and distillation, "
                                     "when the spec has none")
    p.add_argument("--watch", action="store_true", help="follow the job; exit 0 if it succeeds, 1 if not")
    p.add_argument("--timeout", type=float, help="with --watch: give up after this many seconds")
    p.set_defaults(run=cmd_jobs_submit)
    p = jobs.add_parser("watch", parents=common, help="follow a job live; exit 0 if it succeeds, 1 if not")
    p.add_argument("job")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 1)")
    p.set_defaults(run=cmd_jobs_watch)
    p = jobs.add_parser("list", parents=common + [as_json], help="list jobs, newest first")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--model", help="only this model's jobs")
    p.add_argument("--limit", type=int)
    p.add_argument("--metadata", nargs="+", action="extend", metavar="KEY=VALUE", help="filter by labels")
    p.set_defaults(run=cmd_jobs_list)
    p = jobs.add_parser("get", parents=common + [as_json], help="show one job")
    p.add_argument("id")
    p.set_defaults(run=cmd_get("job"))
    p = jobs.add_parser("cancel", parents=common + [as_json], help="cancel a queued or running job")
    p.add_argument("job")
    p.set_defaults(run=cmd_jobs_cancel)
    p = jobs.add_parser("download", parents=common, help="download a job's artifact (sha256 verified)")
    p.add_argument("job")
    p.add_argument("-o", "--output", help="file or folder (default: ./JOB.tar)")
    p.set_defaults(run=cmd_jobs_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("no API key: pass --api-key or set SQUEEZE_API_KEY")
    try:
        with SqueezeClient(args.url, args.api_key) as client:
            return args.run(client, args)
    except UsageError as exc:
        print(f"squeeze: {exc}", file=sys.stderr)
        return 2
    except SqueezeError as exc:
        param = f" (param: {exc.param})" if exc.param else ""
        print(f"squeeze: error {exc.status} {exc.type}: {exc.message}{param}", file=sys.stderr)
        return 1
    except httpx.ConnectError as exc:
        print(f"squeeze: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"squeeze: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"squeeze: timed out: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"squeeze: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
