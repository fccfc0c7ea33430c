"""Approval endpoints: list, count, read, resolve (compare-and-set), delete."""

from __future__ import annotations

import math

from flask import Blueprint, Response, jsonify, request
from werkzeug.routing import BaseConverter

from app.auth import check_not_own_run, identity, requires
from app.context import agentos
from app.decoding import NOT_UTF8_BODY, lone_surrogate_at
from app.errors import ApiError
from app.representation import approval_object, approval_status
from app.schemas import (
    TOO_DEEP,
    ApprovalCountQuerySchema,
    ApprovalsQuerySchema,
    ResolveApprovalSchema,
)
from statemachine.errors import ApprovalNotFound, RunNotFound
from statemachine.store import Approval, ApprovalQuery


class ApprovalIdConverter(BaseConverter):
    """Any path segment but `count`: `/approvals/count` is served (and advertised) as itself."""

    regex = r"(?!count(?:/|$))[^/]+"


bp = Blueprint("approvals", __name__)
bp.record_once(lambda state: state.app.url_map.converters.setdefault("approval_id",
                                                                     ApprovalIdConverter))

LIST_QUERY = ApprovalsQuerySchema()
COUNT_QUERY = ApprovalCountQuerySchema()
RESOLVE_BODY = ResolveApprovalSchema()


@bp.get("/approvals")
@requires("approvals:read")
def list_approvals() -> Response:
    query = LIST_QUERY.load(request.args)
    limit, page = query.pop("limit"), query.pop("page")
    owner = identity().owner
    if owner is not None:
        if query["user_id"] not in (None, owner):
            return jsonify(_page([], 0, page, limit))
        query["user_id"] = owner
    items, total = agentos().store.list_approvals(
        ApprovalQuery(**query, limit=limit, offset=(page - 1) * limit))
    return jsonify(_page([_public(a) for a in items], total, page, limit))


@bp.get("/approvals/count")
@requires("approvals:read")
def count_approvals() -> Response:
    query = COUNT_QUERY.load(request.args)
    owner = identity().owner
    user_id = owner if owner is not None else query["user_id"]
    return jsonify({"count": agentos().store.count_pending_approvals(user_id)})


@bp.get("/approvals/<approval_id:approval_id>")
@requires("approvals:read")
def get_approval(approval_id: str) -> Response:
    return jsonify(_public(_visible(approval_id)))


@bp.get("/approvals/<approval_id:approval_id>/status")
@requires("approvals:read")
def get_approval_status(approval_id: str) -> Response:
    return jsonify(approval_status(_visible(approval_id)))


@bp.post("/approvals/<approval_id:approval_id>/resolve")
@requires("approvals:write", approver=True)
def resolve_approval(approval_id: str) -> Response:
    body = RESOLVE_BODY.load(_json_body())
    check_not_own_run(identity(), _visible(approval_id).doc.get("user_id"))
    approval = agentos().service.resolve_approval(
        approval_id, body["status"], body["resolution_data"], identity().subject)
    return jsonify(_public(approval))


@bp.delete("/approvals/<approval_id:approval_id>")
@requires("approvals:write", approver=True)
def delete_approval(approval_id: str) -> Response:
    _visible(approval_id)
    agentos().service.delete_approval(approval_id)
    return Response(status=204)


def _json_body() -> object:
    try:
        request.get_data(cache=True).decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, NOT_UTF8_BODY) from None
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        raise ApiError(422, "Validation error", errors={
            "_schema": [TOO_DEEP]}) from None
    if body is None:
        raise ApiError(422, "Validation error",
                       errors={"_schema": ["The body must be a JSON object."]})
    where = lone_surrogate_at(body, "body")
    if where is not None:
        raise ApiError(400, f"{where.removeprefix('body.')} holds a lone surrogate, "
                            "which is not text")
    return body


def _visible(approval_id: str) -> Approval:
    """The approval, if the caller may see its run (a stranger gets the same 404)."""
    approval = agentos().store.get_approval(approval_id)
    owner = identity().owner
    if owner is not None and approval.doc.get("user_id") != owner:
        raise ApprovalNotFound(approval_id)
    return approval


def _public(approval: Approval) -> dict:
    try:
        run_status = agentos().store.get_run(approval.run_id).state.wire_status
    except RunNotFound:
        run_status = None
    return approval_object(approval, run_status)


def _page(data: list, total: int, page: int, limit: int) -> dict:
    return {"data": data, "meta": {"page": page, "limit": limit,
                                   "total_pages": math.ceil(total / limit) if total else 0,
                                   "total_count": total}}
