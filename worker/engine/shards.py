"""Writing a checkpoint's weights one tensor at a time, as safetensors shards.

A ``ShardWriter`` takes tensors as they are computed and writes them in files of at most
``max_shard_bytes`` (the whole file, its JSON header included), holding only the tensors of the
shard being filled: a 70 B model is written with one shard's worth of host memory. When it is
closed the files get the names ``transformers`` gives them and, when there are several, the
``model.safetensors.index.json`` that ``from_pretrained`` reads::

    with ShardWriter(Path("artifact"), max_shard_bytes=5 * 10**9) as writer:
        for name, tensor in tensors_one_by_one():
            writer.add(name, tensor)
    # artifact/model.safetensors                         (everything fitted in one file), or
    # artifact/model-00001-of-00003.safetensors ...      + model.safetensors.index.json
    #   {"metadata": {"total_size": <tensor bytes>}, "weight_map": {name: file}}

A tensor larger than ``max_shard_bytes`` cannot be split: it gets a file of its own (as
``save_pretrained`` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save_file

from app.checkpoints.names import INDEX_FILE

SINGLE_FILE = "model.safetensors"
_METADATA = {"format": "pt"}  # transformers reads a file without it as another framework's

# The longest dtype name safetensors writes ("F8_E4M3", "F8_E5M2", ...).
_LONGEST_DTYPE = "F8_E4M3"


def shard_file_name(index: int, count: int) -> str:
    """``model-00002-of-00005.safetensors``: shard ``index`` (1-based) of ``count``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


class ShardWriter:
    """Safetensors shards of at most ``max_shard_bytes`` each, written as tensors arrive."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir = Path(out_dir)
        self._created_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0  # the file the pending tensors make, header included (bound)
        self._pending_data = 0  # their tensor bytes
        self._written: list[tuple[Path, list[str]]] = []  # temporary file, its tensors
        self._names: set[str] = set()
        self.total_size = 0  # tensor bytes, what the index's metadata reports
        self.peak_pending_bytes = 0  # the most tensor data held at once, for tests and reports
        self.files: list[Path] = []  # set by close()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; the current shard is written first when it would
        not fit. The tensor is moved to the host and made contiguous here: the caller may drop
        its own reference."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already written")
        self._names.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        size = _tensor_bytes(tensor)
        entry = _header_entry_bound(name, tensor, self.max_shard_bytes)
        if self._pending and self._pending_bytes + entry + size > self.max_shard_bytes:
            self._flush()
        if not self._pending:
            self._pending_bytes = _header_base_bound()
        self._pending[name] = tensor
        self._pending_bytes += entry + size
        self._pending_data += size
        self.total_size += size
        self.peak_pending_bytes = max(self.peak_pending_bytes, self._pending_data)

    def close(self) -> list[Path]:
        """Write the last shard, name the files and write the index; return the files."""
        if self.files:
            return self.files
        self._flush()
        if not self._written:  # no tensor at all: still a valid, empty checkpoint file
            save_file({}, self.out_dir / SINGLE_FILE, metadata=_METADATA)
            self.files = [self.out_dir / SINGLE_FILE]
            return self.files
        count = len(self._written)
        names = [SINGLE_FILE] if count == 1 else [shard_file_name(i, count) for i in range(1, count + 1)]
        weight_map = {}
        for (temporary, tensors), file in zip(self._written, names):
            temporary.replace(self.out_dir / file)
            weight_map.update(dict.fromkeys(tensors, file))
            self.files.append(self.out_dir / file)
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.files

    def abort(self) -> None:
        """Drop what was queued and delete the files written so far (and the folder, if this
        writer made it and nothing else is in it)."""
        self._pending.clear()
        for temporary, _ in self._written:
            temporary.unlink(missing_ok=True)
        self._written.clear()
        if self._created_dir and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _flush(self) -> None:
        if not self._pending:
            return
        # A name that is not *.safetensors until close(): nothing reads a half-written artifact.
        temporary = self.out_dir / f".shard-{len(self._written) + 1:05d}.partial"
        save_file(self._pending, temporary, metadata=_METADATA)
        self._written.append((temporary, list(self._pending)))
        self._pending = {}
        self._pending_bytes = self._pending_data = 0


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _header_base_bound() -> int:
    """The bytes of a safetensors file that are not tensor entries: the 8-byte header length,
    ``{"__metadata__":{...}}`` and up to 7 bytes of padding."""
    return 8 + len(json.dumps({"__metadata__": _METADATA}, separators=(",", ":"))) + 7


def _header_entry_bound(name: str, tensor: torch.Tensor, max_offset: int) -> int:
    """An upper bound on the header bytes of one tensor's entry (offsets at most ``max_offset``
    digits long, the longest dtype name, a separating comma)."""
    offset = max(max_offset, _tensor_bytes(tensor))
    entry = {name: {"dtype": _LONGEST_DTYPE, "shape": list(tensor.shape), "data_offsets": [offset, offset]}}
    return len(json.dumps(entry, separators=(",", ":"))) + 1
