"""How an upload is refused: :class:`CheckpointError`, the limits an upload is held to, and the
messages that say which limit was hit.

Every check in this package raises ``CheckpointError``; the API answers its ``status_code``
(400, or 413 for a size limit) with its ``message`` and blames its ``param``.
"""

from __future__ import annotations

from dataclasses import dataclass

CONVERT_HINT = (
    "Convert the weights to safetensors, e.g. "
    "model.save_pretrained(dir, safe_serialization=True), and upload that folder."
)


class CheckpointError(Exception):
    """A bad upload.

    ``status_code`` is 400, or 413 when a size limit was hit; ``message`` says what is wrong
    and what to do; ``param`` names the request field at fault.
    """

    def __init__(self, message: str, *, param: str = "files", status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code


@dataclass
class UploadLimits:
    """The size limits an upload is held to (see the ``max_*`` fields of ``Settings``)."""

    max_total_bytes: int
    max_archive_members: int
    max_compression_ratio: float
    max_header_bytes: int
    max_parameters: int

    @classmethod
    def from_settings(cls, settings) -> UploadLimits:
        return cls(
            max_total_bytes=settings.max_upload_bytes,
            max_archive_members=settings.max_archive_members,
            max_compression_ratio=settings.max_compression_ratio,
            max_header_bytes=settings.max_safetensors_header_bytes,
            max_parameters=settings.max_model_parameters,
        )


def over_upload_limit(limits: UploadLimits) -> CheckpointError:
    return CheckpointError(
        f"the upload is over the limit of {human_bytes(limits.max_total_bytes)}; "
        "upload a smaller checkpoint.",
        status_code=413,
    )


def too_many_parameters(
    count: int, limits: UploadLimits, *, at_least: bool = False, what: str = "the model has"
) -> str:
    amount = f"at least {count:,}" if at_least else f"{count:,}"
    return (
        f"{what} {amount} parameters, over this server's limit of "
        f"{limits.max_parameters:,}; upload a smaller model."
    )


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
