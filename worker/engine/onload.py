"""A checkpoint's model with one decoder block in memory at a time.

The model is built on the ``meta`` device (names, types, shapes, no memory). What lies outside
the decoder blocks (embeddings, final norm, ``lm_head``, rotary tables) is materialised on the
compute device from the checkpoint, once: it is what every forward pass needs before and after
the blocks, and it is small beside them. Each block is onloaded from the checkpoint when its
turn comes (positioned reads of its tensors, in the checkpoint's dtype) and sent back to
``meta`` when it is done, so at most one block's weights exist at any moment::

    with OnloadedModel(Path("models/mdl_1"), torch.device("cuda:0")) as onloaded:
        inputs = first_block_inputs(onloaded.model, batches, device)   # blocks never run here
        for index, block in enumerate(onloaded.blocks):
            onloaded.onload(index)          # block `index`'s weights, read from the checkpoint
            ...                             # calibrate, compress, write, evaluate this block
            onloaded.offload(index)         # back to meta: its memory is freed

``OnloadedModel.materialised`` counts the blocks holding real weights; tests assert it never
exceeds one during a job.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import TracebackType

import torch
from torch import nn

from worker.engine.modules import decoder_blocks
from worker.engine.streaming import CheckpointSource


class OnloadedModel:
    """The model of the checkpoint in ``folder`` with its blocks on ``meta`` (see the module
    docstring). ``model``, ``blocks`` and ``prefix`` (the blocks' name, ``"model.layers"``)
    are the usual objects; ``source`` reads the checkpoint's tensors."""

    def __init__(self, folder: Path, device: torch.device):
        self.device = torch.device(device)
        self.source = CheckpointSource(Path(folder))
        try:
            self.model = self.source.model.eval()
            self.prefix, self.blocks = decoder_blocks(self.model)
            self.onloaded: set[int] = set()
            self.peak_onloaded = 0
            # Tensors shared by several names (lm_head tied to the embedding): the checkpoint
            # stores one; every name gets the same tensor.
            self._names_of: dict[int, list[str]] = {}
            for name, tensor in self.model.state_dict(keep_vars=True).items():
                self._names_of.setdefault(id(tensor), []).append(name)
            self._materialise_outside_blocks()
        except BaseException:
            self.source.__exit__(None, None, None)
            raise

    def __enter__(self) -> OnloadedModel:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for index in list(self.onloaded):
            self.offload(index)
        self.source.__exit__(kind, error, traceback)

    @property
    def materialised(self) -> int:
        """How many decoder blocks hold real weights now."""
        return len(self.onloaded)

    def onload(self, index: int) -> nn.Module:
        """Read block ``index``'s tensors from the checkpoint onto the device; return the block."""
        block = self.blocks[index]
        self._load(block, f"{self.prefix}.{index}.")
        self.onloaded.add(index)
        self.peak_onloaded = max(self.peak_onloaded, len(self.onloaded))
        return block

    def offload(self, index: int) -> None:
        """Drop block ``index``'s weights (back to ``meta``); what it computed stays computed."""
        self.blocks[index].to("meta")
        self.onloaded.discard(index)
        _return_freed_memory()

    def _load(self, module: nn.Module, prefix: str) -> None:
        stored = self.source.expected
        for local, tensor in list(module.state_dict(keep_vars=True).items()):
            name = prefix + local
            # The stored name of this tensor (a tied one may be stored under its twin's name).
            key = next((alias for alias in self._names_of.get(id(tensor), [name]) if alias in stored), name)
            _assign(self.model, self._names_of.get(id(tensor), [name]), self._read(key))

    def _read(self, name: str) -> torch.Tensor:
        """A stored tensor on the device. For a GPU it is read into page-locked host memory
        and copied without a staging copy; the read of the next tensor overlaps the copy."""
        if self.device.type != "cuda":
            return self.source.read(name)
        return self.source.read(name, pin=True).to(self.device, non_blocking=True)

    def _materialise_outside_blocks(self) -> None:
        """Every parameter and buffer not in a block onto the device: the stored ones read from
        the checkpoint, the others (rotary tables, causal masks) computed as ``from_pretrained``
        computes them, by the model's own ``_init_weights`` of the module that owns them."""
        inside = f"{self.prefix}."
        for aliases in self._names_of.values():
            if aliases[0].startswith(inside):
                continue
            key = next((alias for alias in aliases if alias in self.source.expected), aliases[0])
            _assign(self.model, aliases, self._read(key))
        persistent = set(self.model.state_dict())
        owners = set()
        for name, buffer in self.model.named_buffers():
            if name in persistent or name.startswith(inside):
                continue
            _assign(self.model, [name], torch.empty_like(buffer, device=self.device))
            owners.add(name.rpartition(".")[0])
        for owner in sorted(owners):
            module = self.model.get_submodule(owner)
            # The flags from_pretrained leaves would make _init_weights skip the module.
            module._is_hf_initialized = False
            for tensor in module.buffers(recurse=False):
                if hasattr(tensor, "_is_hf_initialized"):
                    tensor._is_hf_initialized = False
            with torch.no_grad():
                self.model._init_weights(module)


def _return_freed_memory() -> None:
    """Give the C heap's freed pages back to the system. A block's tensors are freed when it is
    offloaded, but glibc keeps freed heap memory for reuse, and the block's fragments (smaller
    than the mmap threshold, which glibc raises as large blocks are freed) would otherwise
    add to the process's resident memory block after block."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _assign(model: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Make ``value`` the parameter or buffer called by each of ``names`` (one object for all,
    so tied weights stay tied), replacing the object: a meta tensor becomes a real one."""
    parameter = None
    for name in names:
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if attribute in owner._parameters:
            parameter = parameter if parameter is not None else nn.Parameter(value, requires_grad=False)
            owner._parameters[attribute] = parameter
        else:
            owner._buffers[attribute] = value
