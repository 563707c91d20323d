"""Staging: write an upload (several files, or one archive) into an empty folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from app.checkpoints.archives import extract_archive
from app.checkpoints.errors import CheckpointError, UploadLimits
from app.checkpoints.names import ARCHIVE_SUFFIXES, NamePlanner, path_parts
from app.checkpoints.writing import ByteMeter, copy_stream


def stage_upload(files: list[tuple[str, BinaryIO]], dest: Path, limits: UploadLimits) -> None:
    """Store an upload in the empty folder ``dest``, streaming in chunks.

    ``files`` are (client file name, readable binary file) pairs. One file named *.zip,
    *.tar, *.tar.gz or *.tgz is an archive and is extracted into ``dest`` (members may sit in
    one common top-level folder, which is stripped); otherwise each file is stored under its
    base name. Names are checked before anything is written. On any error ``dest`` is left
    empty and :class:`CheckpointError` is raised (413 for size limits).

    >>> stage_upload([("config.json", open("config.json", "rb")),           # doctest: +SKIP
    ...               ("model.safetensors", open("model.safetensors", "rb"))], dest, limits)
    >>> stage_upload([("gpt2.tar.gz", open("gpt2.tar.gz", "rb"))], dest, limits)  # doctest: +SKIP
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"stage_upload needs an empty folder, and {dest} is not empty")
    if not files:
        raise CheckpointError("no files were uploaded; send the checkpoint files or one archive.")
    try:
        archive_name = path_parts(files[0][0])[-1:] if len(files) == 1 else []
        if archive_name and archive_name[0].lower().endswith(ARCHIVE_SUFFIXES):
            extract_archive(archive_name[0], files[0][1], dest, limits)
        else:
            _stage_files(files, dest, limits)
    except BaseException:
        # Leave nothing half-written behind: a partial upload is never a checkpoint.
        _empty_folder(dest)
        raise


def _stage_files(files: list[tuple[str, BinaryIO]], dest: Path, limits: UploadLimits) -> None:
    planner = NamePlanner()
    targets = [planner.place(raw) for raw, _ in files]  # every name checked before any write
    meter = ByteMeter(limits)
    for target, (_, source) in zip(targets, files, strict=True):
        if target is not None:
            copy_stream(source, dest / target, target, meter)


def _empty_folder(folder: Path) -> None:
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
