"""Read and check a ``.safetensors`` header by hand, without loading any tensor.

The format is simple: 8 bytes of little-endian header length ``N``, ``N`` bytes of JSON, then
the raw tensor data. The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets"}``
(offsets relative to the start of the data section), plus an optional ``"__metadata__"`` of
strings. We check all of it ourselves so that a hostile file is refused before any library
maps or allocates it::

    header = read_header(Path("model.safetensors"), max_header_bytes=64 * 2**20)
    header.tensors["transformer.wte.weight"].shape   # (50257, 768)
    header.num_elements, header.data_size            # (124439808, 497759232)

Problems raise :class:`SafetensorsHeaderError`; ``too_large`` is set when a size limit (not the
file's structure) is what failed, so callers can answer 413 rather than 400.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

# Bytes per element for each dtype we accept. Newer safetensors versions know a few more
# (U16..U64, sub-byte floats); we keep to the ones every supported torch can load.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

# The torch spelling of each dtype, for reports ("float32" reads better than "F32").
TORCH_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

# No real tensor has more dimensions than this; a longer shape is junk or an attack.
MAX_RANK = 16


class SafetensorsHeaderError(ValueError):
    """The header is malformed (``too_large=False``) or over a size limit (``too_large=True``)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; ``begin``/``end`` are offsets in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    header_size: int  # N, the JSON length
    data_size: int  # bytes after the header

    @property
    def num_elements(self) -> int:
        return sum(t.num_elements for t in self.tensors.values())


def read_header(path: Path, *, max_header_bytes: int) -> SafetensorsHeader:
    """Read the header of ``path`` and check it fully against the file's size.

    Only ``8 + N`` bytes are read, and only after ``N`` is known to be within
    ``max_header_bytes`` and within the file.
    """
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size < 8:
            raise SafetensorsHeaderError(
                f"the file is {file_size} bytes, too short for a safetensors header"
            )
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > max_header_bytes:
            raise SafetensorsHeaderError(
                f"the header claims {header_size} bytes, over the limit of {max_header_bytes}",
                too_large=True,
            )
        if 8 + header_size > file_size:
            raise SafetensorsHeaderError(
                f"the header length ({header_size} bytes) runs past the end of the file "
                f"({file_size} bytes); the file is truncated or not safetensors"
            )
        raw = f.read(header_size)
    return parse_header(raw, data_size=file_size - 8 - header_size)


def parse_header(raw: bytes, *, data_size: int) -> SafetensorsHeader:
    """Check the JSON header ``raw`` for a file whose data section holds ``data_size`` bytes."""
    # The spec requires the JSON to start with "{" (it may be padded with trailing spaces).
    if not raw.startswith(b"{"):
        raise SafetensorsHeaderError("the header is not a JSON object; the file is not safetensors")
    try:
        doc = loads_strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SafetensorsHeaderError(f"the header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise SafetensorsHeaderError("the header is not a JSON object")

    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsHeaderError('"__metadata__" must map strings to strings')

    tensors = {name: _tensor_entry(name, spec, data_size) for name, spec in doc.items()}
    _check_layout(tensors, data_size)
    return SafetensorsHeader(
        tensors=tensors, metadata=metadata, header_size=len(raw), data_size=data_size
    )


def _tensor_entry(name: str, spec: object, data_size: int) -> TensorEntry:
    if not name:
        raise SafetensorsHeaderError("a tensor has an empty name")
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsHeaderError(
            f"tensor {name!r} must have exactly the keys dtype, shape and data_offsets"
        )
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise SafetensorsHeaderError(
            f"tensor {name!r} has unsupported dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})"
        )
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_count(d) for d in shape):
        raise SafetensorsHeaderError(
            f"tensor {name!r} has an invalid shape {shape!r}: "
            f"it must be a list of at most {MAX_RANK} non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise SafetensorsHeaderError(
            f"tensor {name!r} has invalid data_offsets {offsets!r}: expected [begin, end]"
        )
    begin, end = offsets
    if not begin <= end <= data_size:
        raise SafetensorsHeaderError(
            f"tensor {name!r} has data_offsets [{begin}, {end}] outside the data section "
            f"({data_size} bytes)"
        )
    entry = TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)
    expected = entry.num_elements * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise SafetensorsHeaderError(
            f"tensor {name!r} spans {end - begin} bytes but {dtype} {list(shape)} needs {expected}"
        )
    return entry


def _check_layout(tensors: dict[str, TensorEntry], data_size: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing after the last.

    Overlaps would let two names alias the same bytes; gaps and trailing bytes are places to
    smuggle data past anyone reading only the header. The safetensors library refuses the
    same files.
    """
    position, previous = 0, None
    for entry in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if entry.begin < position:
            raise SafetensorsHeaderError(
                f"tensors {previous!r} and {entry.name!r} overlap in the data section"
            )
        if entry.begin > position:
            raise SafetensorsHeaderError(
                f"there are {entry.begin - position} unused bytes before tensor {entry.name!r}"
            )
        position, previous = entry.end, entry.name
    if position != data_size:
        raise SafetensorsHeaderError(
            f"there are {data_size - position} bytes after the last tensor that no tensor uses"
        )


def _is_count(value: object) -> bool:
    # bool is an int subclass; true/false in a shape is junk.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def loads_strict_json(text: str) -> object:
    """``json.loads`` that refuses duplicate keys and the non-standard NaN/Infinity.

    Parsers disagree on which of two duplicate keys wins, so a duplicate could show this
    check one value and a later loader another.

    >>> loads_strict_json('{"a": 1, "a": 2}')
    Traceback (most recent call last):
    ...
    ValueError: duplicate key 'a'
    """
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(token: str) -> object:
    raise ValueError(f"{token} is not valid JSON")
