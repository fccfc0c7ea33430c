"""Session endpoints, as Agno 2.5.6's session router names them: thin views.

Ownership is the run rule: a JWT user's `sub` overrides any `user_id` it sends, and it sees,
changes and deletes only its own sessions (anything else is `Session not found`).
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify, request

from app.auth import identity, requires
from app.context import agentos
from app.errors import ApiError
from app.representation import session_detail, session_page, session_run
from app.runtime.sessions import HISTORY_RUNS_LIMIT, NewSession, SessionAccess
from app.schemas import (
    TOO_DEEP,
    CreateSessionSchema,
    DeleteSessionsSchema,
    RenameSessionSchema,
    SessionQuerySchema,
    SessionRunsQuerySchema,
    SessionsQuerySchema,
    UpdateSessionSchema,
)
from statemachine.errors import SessionNotFound
from statemachine.store import RunStore, SessionQuery, StoredEvent, StoredRun, StoredSession

bp = Blueprint("sessions", __name__)

LIST_QUERY = SessionsQuerySchema()
ONE_QUERY = SessionQuerySchema()
RUNS_QUERY = SessionRunsQuerySchema()
CREATE_BODY = CreateSessionSchema()
UPDATE_BODY = UpdateSessionSchema()
RENAME_BODY = RenameSessionSchema()
DELETE_BODY = DeleteSessionsSchema()


@bp.get("/sessions")
@requires("sessions:read")
def list_sessions() -> Response:
    started = time.perf_counter()
    query = LIST_QUERY.load(request.args)
    check_db(query)
    user_id, mismatch = _user_filter(query["user_id"])
    page, limit = query["page"], query["limit"]
    if mismatch or query["type"] != "agent":
        return jsonify(session_page([], 0, page, limit, 0.0))
    sessions, total = agentos().sessions.list(SessionQuery(
        agent_id=query["component_id"], user_id=user_id, name_contains=query["session_name"],
        sort_by=query["sort_by"], descending=query["sort_order"] == "desc", limit=limit,
        offset=(page - 1) * limit))
    elapsed = (time.perf_counter() - started) * 1000
    return jsonify(session_page(sessions, total, page, limit, elapsed))


@bp.post("/sessions")
@requires("sessions:write")
def create_session() -> Response:
    query = ONE_QUERY.load(request.args)
    check_db(query)
    _agent_type(query)
    body = CREATE_BODY.load(json_body(optional=True))
    owner = identity().owner
    session = agentos().sessions.create(NewSession(
        session_id=body["session_id"], session_name=body["session_name"],
        session_state=body["session_state"], metadata=body["metadata"],
        user_id=owner or body["user_id"], agent_id=body["agent_id"]))
    response = jsonify(detail(session))
    response.status_code = 201
    return response


@bp.get("/sessions/<session_id>")
@requires("sessions:read")
def get_session(session_id: str) -> Response:
    query = ONE_QUERY.load(request.args)
    access = agent_session(session_id, query)
    return jsonify(detail(agentos().sessions.visible(access)))


@bp.patch("/sessions/<session_id>")
@requires("sessions:write")
def update_session(session_id: str) -> Response:
    query = ONE_QUERY.load(request.args)
    access = agent_session(session_id, query)
    body = UPDATE_BODY.load(json_body())
    changes = {"name" if key == "session_name" else key: value
               for key, value in body.items() if key != "summary" and value is not None}
    return jsonify(detail(agentos().sessions.update(access, changes)))


@bp.post("/sessions/<session_id>/rename")
@requires("sessions:write")
def rename_session(session_id: str) -> Response:
    query = ONE_QUERY.load(request.args)
    access = agent_session(session_id, query)
    body = RENAME_BODY.load(json_body())
    return jsonify(detail(agentos().sessions.update(access, {"name": body["session_name"]})))


@bp.get("/sessions/<session_id>/runs")
@requires("sessions:read")
def get_session_runs(session_id: str) -> Response:
    query = RUNS_QUERY.load(request.args)
    access = agent_session(session_id, query)
    store = agentos().store
    runs = [run for run in agentos().sessions.session_runs(access)
            if _within(run.created_at, query["created_after"], query["created_before"])]
    return jsonify([session_run(run, every_event(store, run)) for run in runs])


@bp.get("/sessions/<session_id>/runs/<run_id>")
@requires("sessions:read")
def get_session_run(session_id: str, run_id: str) -> Response:
    query = ONE_QUERY.load(request.args)
    access = agent_session(session_id, query)
    run = agentos().sessions.session_run(access, run_id)
    return jsonify(session_run(run, every_event(agentos().store, run)))


@bp.delete("/sessions/<session_id>")
@requires("sessions:delete")
def delete_session(session_id: str) -> Response:
    query = ONE_QUERY.load(request.args)
    check_db(query)
    agentos().sessions.delete(session_access(session_id, query))
    return Response(status=204)


@bp.delete("/sessions")
@requires("sessions:delete")
def delete_sessions() -> Response:
    query = ONE_QUERY.load(request.args)
    check_db(query)
    body = DELETE_BODY.load(json_body())
    user_id, mismatch = _user_filter(query["user_id"])
    if not mismatch:
        agentos().sessions.delete_many(body["session_ids"], identity().owner, user_id)
    return Response(status=204)


# -- helpers ----------------------------------------------------------------------------------


def every_event(store: RunStore, run: StoredRun) -> list[StoredEvent]:
    """All of the run's events as it was read (never a truncated prefix)."""
    return store.read_events(run.run_id, 0, max(run.last_seq, 1))


def detail(session: StoredSession) -> dict[str, Any]:
    """The session with the chat history of its newest runs."""
    os = agentos()
    access = SessionAccess(session.session_id, identity().owner)
    runs = os.sessions.session_runs(access, HISTORY_RUNS_LIMIT)
    return session_detail(session, runs, os.agents.get(session.agent_id or ""))


def agent_session(session_id: str, query: dict[str, Any]) -> SessionAccess:
    """The access to one agent session named in a path, after the query's `db_id` and `type`."""
    check_db(query)
    access = session_access(session_id, query)
    _agent_type(query, access)
    return access


def session_access(session_id: str, query: dict[str, Any]) -> SessionAccess:
    """A JWT user's `sub` decides; a `user_id` filter of another user finds nothing."""
    owner = identity().owner
    if owner is not None and query["user_id"] not in (None, owner):
        raise SessionNotFound(session_id)
    return SessionAccess(session_id, owner, None if owner is not None else query["user_id"])


def _within(created_at: float, after: int | None, before: int | None) -> bool:
    """The reference's window on a run's `created_at` (epoch seconds, ends included)."""
    at = int(created_at)
    return (after is None or at >= after) and (before is None or at <= before)


def _user_filter(user_id: str | None) -> tuple[str | None, bool]:
    """The user to list for, and whether the caller asked for someone it may not see."""
    owner = identity().owner
    if owner is None:
        return user_id, False
    return owner, user_id not in (None, owner)


def _agent_type(query: dict[str, Any], access: SessionAccess | None = None) -> None:
    """Only agent sessions are served: another type names a session that is not here."""
    if query["type"] == "agent":
        return
    if access is not None:
        raise SessionNotFound(access.session_id)
    raise ApiError(422, "Validation error", errors={
        "type": ["Only agent sessions are served by this server."]})


def check_db(query: dict[str, Any]) -> None:
    """`db_id`, when given, must name this server's one store (the reference answers 404)."""
    if query["db_id"] not in (None, agentos().db_id):
        raise ApiError(404, f"Database with id '{query['db_id']}' not found")


def json_body(optional: bool = False) -> object:
    """The request's JSON body; an absent one is `{}` where the reference has a default."""
    if optional and not request.get_data(cache=True).strip():
        return {}
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        raise ApiError(422, "Validation error", errors={"_schema": [TOO_DEEP]}) from None
    if body is None:
        raise ApiError(422, "Validation error",
                       errors={"_schema": ["The body must be a JSON object."]})
    return body
