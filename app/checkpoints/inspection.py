"""Inspection: check a staged checkpoint folder and describe it.

Runs the cheap checks first (names, sizes, content, JSON, config.json), then the weight
headers against the architecture, then the tokenizer, and hashes every file last.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from app.checkpoints.errors import (
    CONVERT_HINT,
    CheckpointError,
    UploadLimits,
    human_bytes,
    too_many_parameters,
)
from app.checkpoints.model_config import SUPPORTED_MODEL_TYPES, check_config, context_length
from app.checkpoints.names import (
    CONFIG_FILE,
    INDEX_FILE,
    TOKENIZER_FILES,
    VOCABULARY_FILES,
    check_file_name,
    path_parts,
)
from app.checkpoints.sniffing import refuse_disguised_formats
from app.checkpoints.weights import match_architecture, read_weight_headers
from app.safetensors_header import loads_strict_json
from app.storage import sha256_file


# Checking a tokenizer goes through transformers/huggingface_hub, which would otherwise try to
# reach the Hub for files a checkpoint lacks. An upload is judged on what it contains.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class CheckpointInfo:
    architecture: str  # e.g. "GPT2LMHeadModel"
    model_type: str  # e.g. "gpt2"
    num_parameters: int  # parameters of the architecture, tied ones counted once
    size_bytes: int  # all files in the folder
    sha256: str  # of the sha256sum-style manifest of all files, see _manifest_sha256
    files: list[dict]  # [{"name", "size_bytes", "sha256"}] sorted by name
    has_tokenizer: bool
    context_length: int | None
    dtype: str  # dominant dtype of the weights, e.g. "float32"


# JSON files are read whole; the largest real ones (big tokenizer.json) are tens of MB.
MAX_JSON_BYTES = 64 * 1024 * 1024
# Where trust_remote_code / auto_map could hide. Data maps (vocabularies, the index) are not
# searched: a token may legitimately be called "auto_map".
_SETTINGS_JSON = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def inspect_checkpoint(folder: Path, limits: UploadLimits) -> CheckpointInfo:
    """Check the staged checkpoint in ``folder`` and describe it.

    Cheap checks run first (names, sizes, content sniffing, JSON, config bounds, safetensors
    headers), then the architecture is built on the meta device to compare tensor names and
    shapes, then any tokenizer is loaded, and finally every file is hashed. Raises
    :class:`CheckpointError` (400, or 413 for size limits) on the first problem.

    >>> info = inspect_checkpoint(dest, limits)                        # doctest: +SKIP
    >>> info.architecture, info.num_parameters, info.context_length    # doctest: +SKIP
    ('GPT2LMHeadModel', 124439808, 1024)
    """
    folder = Path(folder)
    sizes = _list_files(folder, limits)
    if CONFIG_FILE not in sizes:
        raise CheckpointError(
            "config.json is missing; upload the whole folder that save_pretrained wrote."
        )
    weight_files = sorted(name for name in sizes if name.endswith(".safetensors"))
    if not weight_files:
        raise CheckpointError(f"there are no .safetensors weights in the upload. {CONVERT_HINT}")

    documents = {
        name: _read_json_object(folder / name, name) for name in sizes if name.endswith(".json")
    }
    _refuse_remote_code(documents)
    config_doc = documents[CONFIG_FILE]
    model_type, architecture, config = check_config(config_doc, limits)

    tensors = read_weight_headers(folder, weight_files, documents.get(INDEX_FILE), limits)
    stored = sum(entry.num_elements for entry in tensors.values())
    if stored > limits.max_parameters:  # before building even the meta model
        raise CheckpointError(too_many_parameters(stored, limits, what="the weight files hold"))
    num_parameters, dtype = match_architecture(config, architecture, tensors)
    if num_parameters > limits.max_parameters:
        raise CheckpointError(too_many_parameters(num_parameters, limits))

    has_tokenizer = _check_tokenizer(folder, set(sizes))
    files = [
        {"name": name, "size_bytes": sizes[name], "sha256": sha256_file(folder / name)}
        for name in sorted(sizes)
    ]
    return CheckpointInfo(
        architecture=architecture,
        model_type=model_type,
        num_parameters=num_parameters,
        size_bytes=sum(sizes.values()),
        sha256=_manifest_sha256(files),
        files=files,
        has_tokenizer=has_tokenizer,
        context_length=context_length(config),
        dtype=dtype,
    )


def _list_files(folder: Path, limits: UploadLimits) -> dict[str, int]:
    """Name -> size of every file, after checking names, file types, total size and content."""
    sizes: dict[str, int] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if path_parts(entry.name) != [entry.name]:
                raise CheckpointError(f"{entry.name!r} is not a plain file name.")
            if entry.is_symlink():
                raise CheckpointError(f"{entry.name} is a link; only regular files are accepted.")
            if not entry.is_file(follow_symlinks=False):
                raise CheckpointError(
                    f"{entry.name} is a folder or special file; put all checkpoint files in one "
                    "flat folder."
                )
            check_file_name(entry.name)
            sizes[entry.name] = entry.stat(follow_symlinks=False).st_size
    total = sum(sizes.values())
    if total > limits.max_total_bytes:
        raise CheckpointError(
            f"the checkpoint is {human_bytes(total)}, over the limit of "
            f"{human_bytes(limits.max_total_bytes)}.",
            status_code=413,
        )
    for name, size in sizes.items():
        with open(folder / name, "rb") as f:
            head = f.read(64)
        refuse_disguised_formats(name, head, size, folder / name)
    return sizes


def _read_json_object(path: Path, name: str) -> dict:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(
            f"{name} is {human_bytes(size)}; JSON files over {human_bytes(MAX_JSON_BYTES)} "
            "are not accepted.",
            status_code=413,
        )
    try:
        document = loads_strict_json(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{name} is not valid JSON ({exc}); fix or re-save it.") from None
    if not isinstance(document, dict):
        raise CheckpointError(
            f"{name} must hold a JSON object ({{...}}), not {type(document).__name__}."
        )
    return document


def _refuse_remote_code(documents: dict[str, dict]) -> None:
    """Refuse configs that ask transformers to import code shipped with the checkpoint."""
    for name in _SETTINGS_JSON:
        if name in documents:
            found = _find_keys(documents[name], {"auto_map", "trust_remote_code"})
            if found:
                raise CheckpointError(
                    f"{name} contains {found!r}, which asks to run code shipped with the "
                    "model; uploaded code is never run. Remove it and use an architecture "
                    f"built into transformers ({', '.join(sorted(SUPPORTED_MODEL_TYPES))})."
                )


def _find_keys(value: object, keys: set[str]) -> str | None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in keys:
                return key
            found = _find_keys(item, keys)
            if found:
                return found
    elif isinstance(value, list):
        for item in value:
            found = _find_keys(item, keys)
            if found:
                return found
    return None


def _check_tokenizer(folder: Path, names: set[str]) -> bool:
    """Load the tokenizer if the upload has one; True when it did."""
    present = sorted(names & TOKENIZER_FILES)
    if not present:
        return False
    if not names & VOCABULARY_FILES:
        raise CheckpointError(
            f"{', '.join(present)} is present but no vocabulary file "
            f"({', '.join(sorted(VOCABULARY_FILES))}); upload the whole tokenizer "
            "(tokenizer.save_pretrained) or remove those files."
        )
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except BaseException as exc:  # the Rust tokenizers library panics with a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise CheckpointError(
            f"the tokenizer files do not load ({type(exc).__name__}: {exc}); re-save them with "
            "tokenizer.save_pretrained, or remove them to upload the model without a tokenizer."
        ) from None
    return True


def _manifest_sha256(files: Iterable[dict]) -> str:
    """sha256 of the folder's manifest: ``sha256sum``-style lines ``"<sha256>  <name>\\n"``,
    sorted by name. It changes when any file's name or content does, and only then.
    """
    manifest = "".join(
        f"{f['sha256']}  {f['name']}\n" for f in sorted(files, key=lambda f: f["name"])
    )
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()
