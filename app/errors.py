"""One place that turns domain errors into HTTP answers `{"detail", "error_code"}`.

Views never catch: the machine, the store and the runtime raise, and the handlers registered
here answer. A 500 carries a fixed sentence, never an exception's text.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from app.runtime.executor import ExecutorBusy, ShuttingDown
from app.runtime.resolution import ToolInputError
from app.runtime.service import AgentNotFound, IdempotencyMismatch
from app.runtime.sessions import SessionBusy, SessionTooLarge
from statemachine.errors import (
    ApprovalAlreadyResolved,
    ApprovalNotFound,
    ApprovalPending,
    ApprovalStillPending,
    InvalidTransition,
    RunNotFound,
    SessionExists,
    SessionNotFound,
    SessionOwnedElsewhere,
    StaleRun,
    StoreUnavailable,
)
from statemachine.states import Trigger

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_SERVER_ERROR",
    503: "SERVICE_UNAVAILABLE",
}

_HTTP_SENTENCES = {
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request body too large",
    500: "Internal server error",
}


class ApiError(Exception):
    """An HTTP answer decided outside the domain (auth, request parsing)."""

    def __init__(self, status: int, detail: str, error_code: str | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error_code = error_code or _HTTP_CODES.get(status, "ERROR")
        self.extra = extra


def error_response(http_status: int, detail: str, error_code: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> Response:
    """The one error shape: `{"detail", "error_code"}` plus any extra keys."""
    body = {"detail": detail,
            "error_code": error_code or _HTTP_CODES.get(http_status, "ERROR")}
    body.update(extra)
    response = jsonify(body)
    response.status_code = http_status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _transition(exc: InvalidTransition) -> Response:
    code = "RUN_NOT_PAUSED" if exc.trigger == Trigger.CONTINUE.value else "CONFLICT"
    return error_response(409, exc.sentence, code, status=exc.state.wire_status)


def _validation(exc: ValidationError) -> Response:
    messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    return error_response(422, "Validation error", errors=messages)


def _http(exc: HTTPException) -> Response:
    status = exc.code or 500
    detail = _HTTP_SENTENCES.get(status) or exc.description or exc.name
    response = error_response(status, detail)
    if status == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "Internal server error")


HANDLERS: list[tuple[type[BaseException], Any]] = [
    (ApiError, lambda e: error_response(e.status, e.detail, e.error_code, **e.extra)),
    (InvalidTransition, _transition),
    (ApprovalPending, lambda e: error_response(403, e.sentence, "APPROVAL_PENDING")),
    (AgentNotFound, lambda e: error_response(404, "Agent not found")),
    (RunNotFound, lambda e: error_response(404, "Run not found")),
    (ApprovalNotFound, lambda e: error_response(404, "Approval not found")),
    (SessionNotFound, lambda e: error_response(404, "Session not found")),
    (SessionExists, lambda e: error_response(409, "A session with this id already exists")),
    (SessionOwnedElsewhere, lambda e: error_response(
        409, "This session_id is already in use by another user")),
    (SessionBusy, lambda e: error_response(
        409, "The session has a run executing and cannot be deleted; cancel it or wait "
             "until it pauses or ends", run_id=e.run_id)),
    (SessionTooLarge, lambda e: error_response(
        409, "The session has more runs than one deletion takes")),
    (ToolInputError, lambda e: error_response(400, e.detail)),
    (ApprovalAlreadyResolved, lambda e: error_response(409, str(e))),
    (ApprovalStillPending, lambda e: error_response(409, str(e))),
    (StaleRun, lambda e: error_response(409, "The run changed while this request was "
                                             "processed; read it again")),
    (StoreUnavailable, lambda e: error_response(
        503, "The run store is unavailable; retry later", headers={"Retry-After": "1"})),
    (ShuttingDown, lambda e: error_response(
        503, "This server is shutting down and takes no new runs; retry",
        headers={"Retry-After": "1"})),
    (ExecutorBusy, lambda e: error_response(
        503, "Every execution slot of this server is busy; retry later",
        headers={"Retry-After": "1"})),
    (IdempotencyMismatch, lambda e: error_response(
        422, "Idempotency-Key was already used with a different request",
        errors={"Idempotency-Key": ["Already used with a different request."]})),
    (ValidationError, _validation),
    (HTTPException, _http),
    (Exception, _unexpected),
]


def register_error_handlers(app: Flask) -> None:
    for exc_type, handler in HANDLERS:
        app.register_error_handler(exc_type, handler)
