"""One error envelope for every 4xx and 5xx answer::

    {"error": {"type": "invalid_request_error",
               "message": "Input should be less than 1",
               "param": "stages.0.sparsity"}}

``param`` names the request field at fault (dotted path into the JSON body, a form field or a
query parameter), or is null when no single field is to blame.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.specs import STAGE_TAGS

log = logging.getLogger("squeeze.api")


class APIError(Exception):
    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, status_code: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}  # e.g. Retry-After on a 429
        if status_code is not None:
            self.status_code = status_code


class NotFound(APIError):
    status_code = 404
    error_type = "not_found"


class Conflict(APIError):
    status_code = 409
    error_type = "conflict"


class PayloadTooLarge(APIError):
    status_code = 413
    error_type = "payload_too_large"


class TooManyRequests(APIError):
    status_code = 429
    error_type = "rate_limit_error"


class ServiceUnavailable(APIError):
    status_code = 503
    error_type = "service_unavailable"


class ErrorBody(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorEnvelope(BaseModel):
    """The body of every error response."""

    error: ErrorBody


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def envelope(status: int, error_type: str, message: str, param: str | None = None, **extra: Any):
    body: dict[str, Any] = {"type": error_type, "message": message, "param": param, **extra}
    return JSONResponse(status_code=status, content={"error": body})


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    # Drop where the value came from ("body", "query") and the stage-union tags that pydantic
    # inserts ("prune.magnitude"), which are not fields the client wrote.
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    return ".".join(str(part) for part in loc if str(part) not in STAGE_TAGS) or None


def _unknown_stage_field(stage: Any) -> str:
    """Which of a stage's two keys is wrong: its type, or its method within a known type."""
    known_types = {tag.split(".")[0] for tag in STAGE_TAGS}
    return "method" if isinstance(stage, dict) and stage.get("type") in known_types else "type"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        response = envelope(exc.status_code, exc.error_type, exc.message, exc.param)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
        param = _param_from_loc(tuple(first.get("loc", ())))
        if first.get("type") == "unknown_stage":
            param = f"{param}.{_unknown_stage_field(first.get('input'))}"
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        details = [
            {"param": _param_from_loc(tuple(e.get("loc", ()))), "message": e.get("msg")} for e in errors
        ]
        return envelope(422, "invalid_request_error", message, param, errors=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        error_type = _TYPE_BY_STATUS.get(exc.status_code, "api_error")
        return envelope(exc.status_code, error_type, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):  # pragma: no cover - defensive
        log.exception("unhandled error", exc_info=exc)
        return envelope(500, "api_error", "internal server error")


# For the OpenAPI document: the error responses a route can give.
def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "The request is malformed or the uploaded file is refused.",
        401: "No API key, or an invalid or revoked one.",
        403: "The key's scope does not allow this (an admin, or an operator, key is needed).",
        404: "The object does not exist.",
        409: "The request conflicts with the object's current state, or reuses an "
        "Idempotency-Key with a different body.",
        413: "The request body or file is larger than the limits.",
        422: "A field failed validation; `param` names it.",
        429: "Too many requests or jobs for this tenant.",
        503: "A backing service (database or broker) is unavailable.",
    }
    return {code: {"model": ErrorEnvelope, "description": descriptions[code]} for code in codes}
