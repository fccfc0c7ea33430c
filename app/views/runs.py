"""Run endpoints: create, list, get, continue, cancel, and the resumable event stream."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from flask import Blueprint, Response, g, jsonify, request, url_for
from marshmallow import ValidationError

from app.auth import identity, requires
from app.context import agentos
from app.decoding import lone_surrogate_at
from app.errors import ApiError
from app.representation import run_object
from app.runtime.handoff import RunChannel
from app.runtime.service import Idempotency, RunAccess, Started
from app.schemas import (
    MAX_EVENT_ID,
    MAX_ID_LENGTH,
    MAX_JSON_DEPTH,
    ContinueFormSchema,
    CreateRunFormSchema,
    EventsQuerySchema,
    GetRunQuerySchema,
    ListRunsQuerySchema,
    ToolInputSchema,
    json_depth,
    strict_json,
)
from app.sse import HEADERS, MIMETYPE, follow, sse_body
from statemachine import deadline
from statemachine.states import states_for_wire_status
from statemachine.store import RunQuery, read_all_events

bp = Blueprint("runs", __name__)

CONTINUE_FORM = ContinueFormSchema()
CREATE_FORM = CreateRunFormSchema()
LIST_QUERY = ListRunsQuerySchema()
GET_QUERY = GetRunQuerySchema()
EVENTS_QUERY = EventsQuerySchema()
TOOL_INPUT = ToolInputSchema()
TOOL_LIST_LIMIT = 256


@bp.post("/agents/<agent_id>/runs")
@requires("agents:run")
def create_run(agent_id: str) -> Response:
    form = CREATE_FORM.load(request.form)
    caller = identity()
    user_id = caller.user_id or form["user_id"]
    started = agentos().service.create_run(agent_id, form["message"], form["session_id"],
                                           user_id, idempotency(form), caller.subject,
                                           exclusive=caller.owner is not None)
    g.run_id = started.run_id  # for the request's log line (issue 15)
    return run_answer(agent_id, started, form["stream"])


@bp.post("/agents/<agent_id>/runs/<run_id>/continue")
@requires("agents:run")
def continue_run(agent_id: str, run_id: str) -> Response:
    form = CONTINUE_FORM.load(request.form)
    tools = parse_tools(form["tools"])
    started = agentos().service.continue_run(access(agent_id, run_id, form), tools,
                                             idempotency(form), history=not form["stream"])
    return run_answer(agent_id, started, form["stream"])


@bp.post("/agents/<agent_id>/runs/<run_id>/cancel")
@requires("agents:run")
def cancel_run(agent_id: str, run_id: str) -> Response:
    agentos().service.cancel_run(access(agent_id, run_id, {}))
    return jsonify({})


@bp.get("/agents/<agent_id>/runs/<run_id>")
@requires("agents:read")
def get_run(agent_id: str, run_id: str) -> Response:
    query = GET_QUERY.load(request.args)
    run = agentos().service.visible_run(access(agent_id, run_id, query))
    return jsonify(run_object(run, read_all_events(agentos().store, run.run_id)))


@bp.get("/agents/<agent_id>/runs")
@requires("agents:read")
def list_runs(agent_id: str) -> Response:
    query = LIST_QUERY.load(request.args)
    owner = identity().owner
    states = states_for_wire_status(query["status"]) if query["status"] else None
    runs = agentos().service.list_runs(RunQuery(
        agent_id=agent_id, session_id=query["session_id"], user_id=owner or query["user_id"],
        states=states, limit=query["limit"], offset=(query["page"] - 1) * query["limit"]))
    if owner and query["user_id"] not in (None, owner):
        runs = []
    store = agentos().store
    return jsonify([run_object(run, read_all_events(store, run.run_id)) for run in runs])


@bp.get("/agents/<agent_id>/runs/<run_id>/events")
@requires("agents:read")
def run_events(agent_id: str, run_id: str) -> Response:
    query = EVENTS_QUERY.load(request.args)
    after = last_event_id(query["last_event_id"])
    run = agentos().service.visible_run(access(agent_id, run_id, {}))
    return stream_response(agent_id, run.run_id, after, history_until=run.last_seq)


def access(agent_id: str, run_id: str, form: dict[str, Any]) -> RunAccess:
    """Who may see the run: form/query filters plus the caller's ownership.

    A JWT user's `sub` overrides any `user_id` it sends: it sees exactly its own runs.
    """
    owner = identity().owner
    user_id = None if owner is not None else form.get("user_id")
    return RunAccess(agent_id=agent_id, run_id=run_id, session_id=form.get("session_id"),
                     user_id=user_id, owner=owner)


def idempotency(form: dict[str, Any]) -> Idempotency | None:
    """The request's Idempotency-Key with a fingerprint of everything the client sent."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_ID_LENGTH or not key.isprintable():
        raise ApiError(422, "Validation error", errors={
            "Idempotency-Key": [f"Must be 1 to {MAX_ID_LENGTH} printable characters."]})
    canonical = json.dumps(form, sort_keys=True, separators=(",", ":"))
    fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
    return Idempotency(key, fingerprint, agentos().settings["IDEMPOTENCY_TTL_SECONDS"])


def last_event_id(from_query: int | None) -> int:
    header = request.headers.get("Last-Event-ID")
    if header is None or not header.strip():
        return from_query or 0
    try:
        value = int(header.strip())
    except ValueError:
        raise ApiError(422, "Validation error",
                       errors={"Last-Event-ID": ["Not a valid integer."]}) from None
    if not 0 <= value <= MAX_EVENT_ID:
        raise ApiError(422, "Validation error", errors={"Last-Event-ID": [
            f"Must be greater than or equal to 0 and less than or equal to {MAX_EVENT_ID}."]})
    return value


def parse_tools(raw: str) -> list[dict[str, Any]]:
    """The `tools` form field as a list of typed tool objects, or a 400 saying why not."""
    if not raw.strip():
        return []
    try:
        value = strict_json(raw)
    except ValueError:
        raise ApiError(400, "Invalid JSON in tools field") from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(value, list):
        raise _bad_tools("tools must be a JSON array of tool objects")
    if json_depth(value) > MAX_JSON_DEPTH:
        raise _too_deep()
    if len(value) > TOOL_LIST_LIMIT:
        raise _bad_tools(f"at most {TOOL_LIST_LIMIT} tool objects are accepted")
    return [_tool_input(index, item) for index, item in enumerate(value)]


def _tool_input(index: int, item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise _bad_tools(f"tools[{index}] must be an object")
    try:
        loaded = TOOL_INPUT.load(item)
    except ValidationError as exc:
        field, messages = next(iter(sorted(exc.messages.items())))
        raise _bad_tools(f"tools[{index}].{field}: {_first_message(messages)}") from None
    where = lone_surrogate_at(item, f"tools[{index}]")
    if where is not None:
        raise _bad_tools(f"{where} holds a lone surrogate, which is not text")
    return loaded


def _first_message(messages: Any) -> str:
    while isinstance(messages, dict | list):
        messages = next(iter(messages.values())) if isinstance(messages, dict) else messages[0]
    return str(messages)


def _too_deep() -> ApiError:
    """Too deep for the parser or for the bound: one answer either way."""
    return _bad_tools(f"nesting deeper than {MAX_JSON_DEPTH} levels")


def _bad_tools(what: str) -> ApiError:
    return ApiError(400, f"Invalid structure or content for tools: {what}")


def run_answer(agent_id: str, started: Started, stream: bool) -> Response:
    """The stream from the run's first new event, or the run object once it stops."""
    if stream:
        return stream_response(agent_id, started.run_id, started.after, channel=started.channel)
    os = agentos()
    # A budget already spent (the commit landed, then a clean-up write met an outage and gave
    # up at the deadline) answers now: the wait would add a socket timeout of its own.
    deadline.check("store")
    with deadline.budget(None):  # waiting for the run is not store work: no request budget
        for _ in _follow(started.run_id, started.after, outages=False, channel=started.channel):
            pass
    handed = _handed_over(started)
    if handed is not None:
        return jsonify(handed)
    with deadline.budget(os.settings["STORE_TIMEOUT_SECONDS"]):
        run = os.store.get_run(started.run_id)
        return jsonify(run_object(run, read_all_events(os.store, run.run_id)))


def _handed_over(started: Started) -> dict[str, Any] | None:
    """The run object from what this process's execution handed over (its last commit and
    its events, after the history read with the request), or None to read the store."""
    channel = started.channel
    if channel is None or channel.final is None or started.history is None:
        return None
    return run_object(channel.final, started.history + channel.all_events())


def stream_response(agent_id: str, run_id: str, after: int, history_until: int = 0,
                    channel: RunChannel | None = None) -> Response:
    """An SSE response; status and headers are fixed before the first event is read.

    A resume (`/events`) replays every stored event up to `history_until`, across pauses;
    a create's or continue's stream ends at the first terminal event after `after`.
    """
    location = url_for("runs.run_events", agent_id=agent_id, run_id=run_id,
                       last_event_id=after)
    headers = {**HEADERS, "Location": location}
    return Response(sse_body(_follow(run_id, after, history_until, outages=True,
                                     channel=channel)),
                    status=200, content_type=MIMETYPE, headers=headers)


def _follow(run_id: str, after: int, history_until: int = 0, *, outages: bool,
            channel: RunChannel | None = None):
    """Follow the run; a stream waits a store outage out for a lease (its pings keep the
    client), while a `stream=false` answer is a 503 at once (it must answer in its budget)."""
    os = agentos()
    return follow(os.store, run_id, after, os.service.current_state,
                  ping_seconds=os.settings["STREAM_PING_SECONDS"],
                  max_seconds=os.settings["STREAM_MAX_SECONDS"], history_until=history_until,
                  outage_seconds=os.settings["RUN_LEASE_SECONDS"] if outages else 0.0,
                  channel=channel, channels=os.service.channels,
                  stall_seconds=os.settings["STORE_TIMEOUT_SECONDS"])
