"""Writing a checkpoint's weights one tensor at a time, as safetensors shards.

A ``ShardWriter`` takes tensors as they are computed and writes each to its shard file at
once, so it holds none: a 70 B model is written with one tensor's worth of host memory. A shard
is at most ``max_shard_bytes`` (the whole file, its JSON header included). When it is closed
the files get the names ``transformers`` gives them and, when there are several, the
``model.safetensors.index.json`` that ``from_pretrained`` reads::

    with ShardWriter(Path("artifact"), max_shard_bytes=5 * 10**9) as writer:
        for name, tensor in tensors_one_by_one():
            writer.add(name, tensor)
    # artifact/model.safetensors                         (everything fitted in one file), or
    # artifact/model-00001-of-00003.safetensors ...      + model.safetensors.index.json
    #   {"metadata": {"total_size": <tensor bytes>}, "weight_map": {name: file}}

A safetensors file is ``[8-byte header length][JSON header][tensor data]``, and the header,
which lists every tensor's offsets, comes first. So each shard starts with room for the header
(``header_room``: 1/64 of a shard, at most 1 MiB), the data is appended behind it, and the header is
written into that room when the shard is complete, padded with spaces (the format allows
trailing spaces). A header that outgrows its room (over ~10 000 tensors in a shard), or a shard
so small that the room would be over 1 % of it, is written to a new file followed by a copy of
the data. Tensors are stored in the order they arrive
(the format needs no alignment; ``safe_open`` reads any).

When the caller knows every tensor's name, dtype and shape beforehand (a dense artifact of a
checkpoint: the same tensors), ``layout=`` fixes their places up front, headers written first;
tensors may then arrive in any order and the files are laid out as the layout says.

A tensor larger than ``max_shard_bytes`` cannot be split: it gets a file of its own (as
``save_pretrained`` does).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Sequence

import torch

from app.checkpoints.names import INDEX_FILE
from app.safetensors_header import TORCH_DTYPE_NAMES

SINGLE_FILE = "model.safetensors"
_METADATA = {"format": "pt"}  # transformers reads a file without it as another framework's
_SAFETENSORS_DTYPES = {getattr(torch, name): code for code, name in TORCH_DTYPE_NAMES.items()}
_LONGEST_DTYPE = max(TORCH_DTYPE_NAMES, key=len)


def shard_file_name(index: int, count: int) -> str:
    """``model-00002-of-00005.safetensors``: shard ``index`` (1-based) of ``count``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def header_room(max_shard_bytes: int) -> int:
    """The bytes kept at the start of a shard for its header: 1/64 of a shard within
    [4 KiB, 1 MiB], at most 1/8 of a (tiny) shard, a multiple of 8 so that the data starts
    aligned."""
    return min(max(max_shard_bytes // 64, 4096), 1 << 20, max_shard_bytes // 8) // 8 * 8


class ShardWriter:
    """Safetensors shards of at most ``max_shard_bytes`` each, written as tensors arrive."""

    def __init__(self, out_dir: Path, max_shard_bytes: int,
                 layout: Sequence[tuple[str, torch.dtype, Sequence[int]]] | None = None):
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir = Path(out_dir)
        self._created_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._room = header_room(max_shard_bytes)
        self._file: BinaryIO | None = None  # the shard being filled
        self._entries: dict[str, dict] = {}  # its header entries
        self._header_bound = 0  # an upper bound on its header's bytes, padding included
        self._data_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # temporary file, its tensors
        self._names: set[str] = set()
        self.total_size = 0  # tensor bytes, what the index's metadata reports
        self.files: list[Path] = []  # set by close()
        # With a layout, every tensor's place is decided up front: name -> (file, offset, dtype, shape).
        self._places: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] = {}
        if layout is not None:
            self._lay_out(layout)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` under ``name``, in the current shard or, when it would make that
        file too large, in a new one. Nothing is kept: the caller may drop the tensor."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already written")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: safetensors has no dtype {tensor.dtype}")
        self._names.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        if self._places:
            self._write_in_place(name, tensor)
            return
        size = _tensor_bytes(tensor)
        entry = _header_entry_bound(name, tensor, self.max_shard_bytes)
        if self._entries and self._file_bound(entry, size) > self.max_shard_bytes:
            self._finish_shard()
        if self._file is None:
            self._start_shard()
        assert self._file is not None
        self._file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self._entries[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._data_bytes, self._data_bytes + size]}
        self._header_bound += entry
        self._data_bytes += size
        self.total_size += size

    def close(self) -> list[Path]:
        """Complete the last shard, name the files and write the index; return the files."""
        if self.files:
            return self.files
        missing = set(self._places) - self._names
        if missing:
            raise ValueError(f"{len(missing)} tensors of the layout were never written, e.g. {min(missing)!r}")
        if self._file is None and not self._written:  # no tensor at all: one empty file
            self._start_shard()
        self._finish_shard()
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
        """Delete the files written so far (and the folder, if this writer made it and nothing
        else is in it)."""
        if self._file is not None:
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)
            self._file = None
        for temporary, _ in self._written:
            temporary.unlink(missing_ok=True)
        self._written.clear()
        if self._created_dir and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _lay_out(self, layout: Sequence[tuple[str, torch.dtype, Sequence[int]]]) -> None:
        """Cut ``layout`` (name, dtype, shape, in the order the files should store them) into
        shards and write each shard's header now: ``add`` then writes a tensor at its place,
        in any order. A dense artifact laid out as its checkpoint has the checkpoint's header."""
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        header_bound = data_bytes = 0
        for name, dtype, shape in layout:
            shape = tuple(shape)
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            entry = _entry_bound(name, shape, max(self.max_shard_bytes, size))
            if shards[-1] and 8 + header_bound + entry + data_bytes + size > self.max_shard_bytes:
                shards.append([])
            if not shards[-1]:
                header_bound, data_bytes = _header_base_bound(), 0
            shards[-1].append((name, dtype, shape, size))
            header_bound += entry
            data_bytes += size
            self.total_size += size
        for number, shard in enumerate(shards, start=1):
            entries, offset = {}, 0
            for name, dtype, shape, size in shard:
                entries[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                                 "data_offsets": [offset, offset + size]}
                offset += size
            header = json.dumps({"__metadata__": _METADATA, **entries}, separators=(",", ":")).encode()
            header = header.ljust(-(-len(header) // 8) * 8, b" ")
            path = self.out_dir / f".shard-{number:05d}.partial"
            with open(path, "wb") as file:
                file.write(struct.pack("<Q", len(header)) + header)
                file.truncate(8 + len(header) + offset)
            for name, dtype, shape, _ in shard:
                begin = entries[name]["data_offsets"][0]
                self._places[name] = (path, 8 + len(header) + begin, dtype, shape)
            self._written.append((path, list(entries)))

    def _write_in_place(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._places:
            raise ValueError(f"tensor {name!r} is not in the layout")
        path, offset, dtype, shape = self._places[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: the layout has {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        with open(path, "r+b") as file:
            file.seek(offset)
            file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)

    def _file_bound(self, entry: int, size: int) -> int:
        """An upper bound on the current shard's file size with one more tensor."""
        return 8 + max(self._room, self._header_bound + entry) + self._data_bytes + size

    def _start_shard(self) -> None:
        # A name that is not *.safetensors until close(): nothing reads a half-written artifact.
        path = self.out_dir / f".shard-{len(self._written) + 1:05d}.partial"
        self._file = open(path, "wb")
        self._file.write(b"\0" * (8 + self._room))  # the header's room, filled in at the end
        self._entries = {}
        self._header_bound = _header_base_bound()
        self._data_bytes = 0

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        path = Path(file.name)
        header = json.dumps({"__metadata__": _METADATA, **self._entries}, separators=(",", ":")).encode()
        unused = self._room - len(header)
        if 0 <= unused and unused * 100 <= self._data_bytes:
            file.seek(0)
            file.write(struct.pack("<Q", self._room) + header.ljust(self._room, b" "))
            file.close()
        else:
            # The header outgrew its room (rare), or the room would be over 1 % of a small
            # shard: a new file with the header as long as it needs, the data copied behind it
            # (at most ~100 times the room: cheap).
            file.close()
            header = header.ljust(-(-len(header) // 8) * 8, b" ")
            compact = path.with_suffix(".compact")
            with open(path, "rb") as source, open(compact, "wb") as target:
                target.write(struct.pack("<Q", len(header)) + header)
                source.seek(8 + self._room)
                shutil.copyfileobj(source, target, 16 << 20)
            compact.replace(path)
        self._written.append((path, list(self._entries)))


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _header_base_bound() -> int:
    """The header's bytes besides the tensor entries: ``{"__metadata__":{...}}`` and up to 7
    bytes of padding."""
    return len(json.dumps({"__metadata__": _METADATA}, separators=(",", ":"))) + 7


def _header_entry_bound(name: str, tensor: torch.Tensor, max_offset: int) -> int:
    return _entry_bound(name, tuple(tensor.shape), max(max_offset, _tensor_bytes(tensor)))


def _entry_bound(name: str, shape: tuple[int, ...], max_offset: int) -> int:
    """An upper bound on the header bytes of one tensor's entry (offsets at most ``max_offset``
    digits long, the longest dtype name, a separating comma)."""
    entry = {name: {"dtype": _LONGEST_DTYPE, "shape": list(shape), "data_offsets": [max_offset, max_offset]}}
    return len(json.dumps(entry, separators=(",", ":"))) + 1
