"""File names: which are safe, and which belong in a checkpoint.

Every name a client sends (a file of a multi-file upload, an archive member) passes through
here before anything is written::

    check_file_name("model-00001-of-00002.safetensors")   # fine
    check_file_name("pytorch_model.bin")                   # CheckpointError: a pickle
    planner = NamePlanner()
    planner.place("gpt2/config.json")                      # "config.json"
    planner.place("__MACOSX/._config.json")                # None: clutter, skipped
"""

from __future__ import annotations

import re

from app.checkpoints.errors import CONVERT_HINT, CheckpointError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "spiece.model",
        "vocab.txt",
        "chat_template.jinja",
    }
)
# The tokenizer files that hold a vocabulary; the others only configure one.
VOCABULARY_FILES = frozenset(
    {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt"}
)
ALLOWED_NAMES = frozenset(
    {CONFIG_FILE, INDEX_FILE, "generation_config.json", "README.md", "LICENSE", ".gitattributes"}
    | TOKENIZER_FILES
)
_SAFETENSORS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.safetensors")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
CODE_SUFFIXES = (".py", ".pyc", ".so", ".sh")
OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".onnx", ".gguf", ".npz", ".npy")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")

# Clutter that macOS puts in zips; never extracted, never an error.
_JUNK_FOLDERS = frozenset({"__MACOSX"})
_JUNK_NAMES = frozenset({".DS_Store"})


def check_file_name(name: str) -> None:
    """Refuse ``name`` (a bare file name) unless it is a file a checkpoint may contain.

    >>> check_file_name("model-00001-of-00002.safetensors")
    >>> check_file_name("pytorch_model.bin")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    app.checkpoints.errors.CheckpointError: pytorch_model.bin is a pickle-based weights file, ...
    """
    lower = name.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{name} is a pickle-based weights file, and pickles can run code when loaded, so "
            f"Squeeze never opens them. {CONVERT_HINT}"
        )
    if lower.endswith(CODE_SUFFIXES):
        raise CheckpointError(
            f"{name} is code; uploaded code is never run. Upload a checkpoint whose "
            "architecture is built into transformers (no custom modeling files)."
        )
    if lower.endswith(OTHER_WEIGHT_SUFFIXES):
        raise CheckpointError(
            f"{name} is not a safetensors file; weights must be safetensors. {CONVERT_HINT}"
        )
    if lower.endswith(ARCHIVE_SUFFIXES):
        raise CheckpointError(
            f"{name} is an archive; upload an archive on its own, not alongside other files "
            "or inside another archive."
        )
    if name in ALLOWED_NAMES or _SAFETENSORS_NAME.fullmatch(name):
        return
    raise CheckpointError(
        f"{name} is not a file a checkpoint may contain. Allowed: config.json, *.safetensors, "
        f"{INDEX_FILE}, generation_config.json, tokenizer files "
        f"({', '.join(sorted(TOKENIZER_FILES))}), README.md, LICENSE and .gitattributes. "
        "Remove the other files and upload again."
    )


def plain_file_name(raw: object) -> str:
    """``raw`` if it is one plain file name (no folders, NUL, control characters, ``..``)."""
    parts = path_parts(raw)
    if len(parts) != 1:
        raise CheckpointError(f"{raw!r} must be a plain file name, without folders")
    return parts[0]


def path_parts(raw: object) -> list[str]:
    """Split a client-supplied path into its components, refusing anything that could escape.

    ``"./gpt2/config.json"`` gives ``["gpt2", "config.json"]``. The caller decides what
    depth is acceptable; this only guarantees each part is a plain name.
    """
    if not isinstance(raw, str) or not raw:
        raise CheckpointError("a file has an empty name; give every file its name.")
    if "\x00" in raw:
        raise CheckpointError(f"the file name {raw!r} contains a NUL byte; rename the file.")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in raw):
        raise CheckpointError(
            f"the file name {raw!r} contains control characters; rename the file."
        )
    if "\\" in raw:
        raise CheckpointError(
            f"the file name {raw!r} contains a backslash; use plain names such as config.json."
        )
    if raw.startswith("/") or re.match(r"[A-Za-z]:", raw):
        raise CheckpointError(
            f"the file name {raw!r} is an absolute path; archive the checkpoint folder with "
            "relative names."
        )
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise CheckpointError(
            f"the file name {raw!r} contains '..'; names may not point outside the checkpoint."
        )
    return parts


class NamePlanner:
    """Turns the paths of an upload into flat file names, one at a time.

    Files may all sit at the top level, or all inside one common folder (the folder an
    archive was made from), which is stripped. Anything deeper, a mix of the two, or two
    files with the same final name is refused.
    """

    _UNDECIDED = object()

    def __init__(self) -> None:
        self._folder: object = self._UNDECIDED
        self._names: set[str] = set()

    def place(self, raw: str) -> str | None:
        """The name to store ``raw`` under, or None for clutter that is skipped."""
        parts = path_parts(raw)
        if not parts:
            raise CheckpointError(f"the file name {raw!r} names no file; give every file its name.")
        if parts[0] in _JUNK_FOLDERS or parts[-1] in _JUNK_NAMES:
            return None
        if len(parts) > 2:
            raise CheckpointError(
                f"{raw!r} is in a nested folder; put all checkpoint files in one folder "
                "(the one save_pretrained wrote) and upload or archive that."
            )
        folder = parts[0] if len(parts) == 2 else None
        if self._folder is self._UNDECIDED:
            self._folder = folder
        elif folder != self._folder:
            raise CheckpointError(
                f"{raw!r} is not in the same folder as the other files; all files must be at "
                "the top level or all inside one common folder."
            )
        name = parts[-1]
        check_file_name(name)
        if name in self._names:
            raise CheckpointError(f"{name} appears twice in the upload; send each file once.")
        self._names.add(name)
        return name

