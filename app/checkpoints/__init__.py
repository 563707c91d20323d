"""Receive an uploaded Hugging Face checkpoint and check it before anything runs on it.

A checkpoint is the folder ``save_pretrained`` writes: ``config.json``, safetensors weights and
optionally tokenizer files. It arrives either as several files or as one archive (zip, tar,
tar.gz). Two steps, used by the upload endpoint::

    from app.checkpoints import CheckpointError, UploadLimits, inspect_checkpoint, stage_upload
    from app.config import get_settings

    limits = UploadLimits.from_settings(get_settings())
    try:
        stage_upload([(f.filename, f.file) for f in uploads], dest, limits)  # dest: an empty folder
        info = inspect_checkpoint(dest, limits)
    except CheckpointError as exc:
        ...  # answer exc.status_code (400 or 413) with exc.message, blaming exc.param
    info.architecture, info.num_parameters, info.sha256   # ("GPT2LMHeadModel", 124439808, "9f…")

Nothing uploaded is ever executed, unpickled or imported, and no real weights are allocated:
names are checked before anything is written (``names``), every file's content is sniffed for
pickles whatever its name (``sniffing``), archives are extracted member by member with every
byte counted (``archives``, ``writing``), JSON is parsed strictly, ``config.json`` is bounded
before anything is built from it (``model_config``), safetensors headers are checked by hand
and the architecture is built on the ``meta`` device only to learn which tensors and shapes
``config.json`` implies (``weights``). ``staging`` and ``inspection`` run the two steps.

torch and transformers are imported inside the functions that use them: the API process
imports this package at start and stays free of both until it inspects a checkpoint.
"""

from app.checkpoints.errors import CheckpointError, UploadLimits
from app.checkpoints.inspection import CheckpointInfo, inspect_checkpoint
from app.checkpoints.model_config import SUPPORTED_MODEL_TYPES
from app.checkpoints.names import (
    ARCHIVE_SUFFIXES,
    TOKENIZER_FILES,
    check_file_name,
    plain_file_name,
)
from app.checkpoints.staging import stage_upload

__all__ = [
    "ARCHIVE_SUFFIXES",
    "SUPPORTED_MODEL_TYPES",
    "TOKENIZER_FILES",
    "CheckpointError",
    "CheckpointInfo",
    "UploadLimits",
    "check_file_name",
    "inspect_checkpoint",
    "plain_file_name",
    "stage_upload",
]
