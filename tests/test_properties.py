"""Stateful property tests: any sequence of requests, on each store, leaves every run sound.

A hypothesis state machine drives the Flask test client of an app on a fresh store: it
creates runs of the demo agents (stream or not), continues them with the decisions their
pause asks for (or one short), with tools that cannot parse, with calls the run does not
wait on, at the wrong address; cancels; resolves approvals (approved or rejected, sometimes
twice); deletes them; reads runs and resumes their streams. Every answer is read to its end,
so between steps every run is at rest. After every step:

- no answer is a 5xx, and every 4xx has the contract's error shape and the expected status;
- a 4xx leaves the run (and the approval) byte-identical, GET before and after;
- a run is continued at most once per pause: its RunContinued events are exactly the
  continues answered 200, never more than its RunPaused events, and each demo tool call is
  executed at most once (DEMO_TOOL_LOG);
- a run's events have ids 1..n without a gap, and the last one is its status' terminal event;
- every status is one of the contract's table, every tool object has its keys and types;
- the admin guard is never passed while an approval is pending: such a continue is a 403,
  and `deploy_app` only ever runs after an admin approved it.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from app import create_app
from app.schemas import MAX_JSON_DEPTH, strict_json
from app.views.runs import TOOL_LIST_LIMIT
from statemachine.redis_store import RedisRunStore
from statemachine.sqlite_store import SqliteRunStore
from statemachine.states import WIRE_STATUSES
from tests.conftest import STORE_KINDS
from tests.contract import TOOL_KEYS

SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None, derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.too_slow,
                                                          HealthCheck.filter_too_much])
AGENT_IDS = ["chat-agent", "confirm-agent", "external-agent", "input-agent", "approval-agent",
             "multi-agent"]
AT_REST = {"PAUSED": "RunPaused", "COMPLETED": "RunCompleted", "CANCELLED": "RunCancelled"}
TERMINAL = {"RunPaused", "RunCompleted", "RunError", "RunCancelled"}
ENDED = {"COMPLETED": "completed", "CANCELLED": "cancelled", "ERROR": "errored"}
WAITING_FLAGS = ("requires_confirmation", "requires_user_input", "external_execution_required")
WAITING_FOR_APPROVAL = "This run requires admin approval before it can be continued"
BAD_TOOLS_PREFIXES = ("Invalid JSON in tools field", "Invalid structure or content for tools: ")
NONE = type(None)
TOOL_TYPES: dict[str, tuple[type, ...]] = {
    "tool_call_id": (str,), "tool_name": (str,), "tool_args": (dict,),
    "tool_call_error": (bool, NONE), "result": (str, NONE), "metrics": (dict, NONE),
    "child_run_id": (str, NONE), "stop_after_tool_call": (bool,), "created_at": (int,),
    "requires_confirmation": (bool, NONE), "confirmed": (bool, NONE),
    "confirmation_note": (str, NONE), "requires_user_input": (bool, NONE),
    "user_input_schema": (list, NONE), "user_feedback_schema": (list, NONE),
    "answered": (bool, NONE), "external_execution_required": (bool, NONE),
    "external_execution_silent": (bool, NONE), "approval_type": (str, NONE),
    "approval_id": (str, NONE),
}
assert set(TOOL_TYPES) == TOOL_KEYS


# -- what a client may send -------------------------------------------------------------------


def _parses(text: str) -> bool:
    try:
        strict_json(text)
    except (ValueError, RecursionError):
        return False
    return True


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
SCALAR = (st.none() | st.booleans() | st.integers()
          | st.floats(allow_nan=False, allow_infinity=False) | TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
NOT_A_STRING = (st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                | st.lists(SCALAR, max_size=2))
NOT_A_BOOL = st.integers() | TEXT | st.lists(SCALAR, max_size=2) | st.dictionaries(TEXT, SCALAR,
                                                                                   max_size=2)


def _one_tool(obj: dict) -> str:
    return json.dumps([obj])


# A `tools` field refused with a 400 before the run is even read, whatever its state.
BAD_TOOLS = st.one_of(
    TEXT.filter(lambda text: text.strip() != "" and not _parses(text)),
    (SCALAR | st.dictionaries(TEXT, JSON, max_size=3)).map(json.dumps),
    st.lists(SCALAR | st.lists(JSON, max_size=2), min_size=1, max_size=3).map(json.dumps),
    st.one_of(st.just({}), (st.none() | NOT_A_STRING).map(lambda v: {"tool_call_id": v}),
              st.just({"tool_call_id": ""}), st.just({"tool_call_id": "c" * 256})).map(_one_tool),
    st.tuples(st.sampled_from(["confirmed", "requires_confirmation", "answered"]), NOT_A_BOOL)
    .map(lambda kv: _one_tool({"tool_call_id": "call_1_1", kv[0]: kv[1]})),
    st.tuples(st.sampled_from(["result", "confirmation_note", "tool_name"]), NOT_A_STRING)
    .map(lambda kv: _one_tool({"tool_call_id": "call_1_1", kv[0]: kv[1]})),
    (st.integers() | TEXT | st.lists(SCALAR, min_size=1, max_size=2))
    .map(lambda v: _one_tool({"tool_call_id": "call_1_1", "user_input_schema": v})),
    st.integers(MAX_JSON_DEPTH + 1, 3000).map(lambda n: "[" * n + "]" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"])
    .map(lambda number: f'[{{"tool_call_id": "call_1_1", "tool_args": {{"x": {number}}}}}]'),
    st.just(json.dumps([{"tool_call_id": "call_1_1"}] * (TOOL_LIST_LIMIT + 1))),
)

RESOLUTION_DATA = st.none() | st.fixed_dictionaries({}, optional={
    "note": JSON, "values": JSON, "result": JSON, "extra": JSON})


# -- reading answers --------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def frames(self) -> list[tuple[int, str, dict]]:
        """(id, event, data) of each event of an event stream (lines end only at "\\n")."""
        frames = []
        for block in self.body.decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.split("\n")
                          if line and not line.startswith(":"))
            if fields:
                frames.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
        return frames


def waiting(run: dict) -> list[dict]:
    return [obj for obj in run["tools"] if any(obj.get(flag) for flag in WAITING_FLAGS)]


def decision(obj: dict, confirmed: bool, text: str) -> dict:
    """What a client sends to resolve the paused call `obj`."""
    if obj.get("requires_confirmation"):
        return {"tool_call_id": obj["tool_call_id"], "confirmed": confirmed,
                "confirmation_note": text}
    if obj.get("external_execution_required"):
        return {"tool_call_id": obj["tool_call_id"], "result": text}
    fields = [{"name": f["name"], "value": text} for f in obj["user_input_schema"]
              if f.get("value") is None]
    return {"tool_call_id": obj["tool_call_id"], "user_input_schema": fields}


# -- the machine ------------------------------------------------------------------------------


class RunMachine(RuleBasedStateMachine):
    """One app on one fresh store; `open_store` and `tool_log` are set per store kind."""

    open_store: Any = None
    tool_log: Path = Path()

    def __init__(self) -> None:
        super().__init__()
        self.store, self.close_store = self.open_store()
        self.app = create_app({"STORE": self.store, "STREAM_MAX_SECONDS": 20,
                               "SWEEP_INTERVAL_SECONDS": 60})
        self.client = self.app.test_client()
        self.runs: list[str] = []
        self.agent_of: dict[str, str] = {}
        self.continued: Counter[str] = Counter()
        self.approvals: list[str] = []
        self.run_of_approval: dict[str, str] = {}
        self.approved: set[str] = set()
        self.touched: set[str] = set()
        self.status: dict[str, str | None] = {}  # last seen, of runs and of approvals

    def teardown(self) -> None:
        self.app.extensions["agentos"].executor.shutdown(wait=True)
        self.close_store()

    # -- requests -----------------------------------------------------------------------

    def call(self, method: str, url: str, **kwargs: Any) -> Answer:
        """One request, read to its end: never a 5xx, every error in the contract's shape."""
        response = self.client.open(url, method=method, **kwargs)
        try:
            answer = Answer(response.status_code, response.content_type, response.get_data())
        finally:
            response.close()
        assert answer.status < 500, (method, url, answer.body[:500])
        if answer.status >= 400:
            body = answer.json
            assert isinstance(body["detail"], str) and isinstance(body["error_code"], str)
        return answer

    def run_url(self, run_id: str) -> str:
        return f"/agents/{self.agent_of[run_id]}/runs/{run_id}"

    def read_run(self, run_id: str) -> Answer:
        answer = self.call("GET", self.run_url(run_id))
        assert answer.status == 200
        return answer

    def approval_status(self, approval_id: str) -> str | None:
        answer = self.call("GET", f"/approvals/{approval_id}")
        assert answer.status in (200, 404)
        self.status[approval_id] = answer.json["status"] if answer.status == 200 else None
        return self.status[approval_id]

    def pending_approval(self, run: dict) -> bool:
        return any(self.approval_status(obj["approval_id"]) == "pending"
                   for obj in waiting(run) if obj.get("approval_id"))

    def resolved_approval(self, run: dict) -> bool:
        return any(self.approval_status(obj["approval_id"]) in ("approved", "rejected")
                   for obj in waiting(run) if obj.get("approval_id"))

    def refused_unchanged(self, urls: list[str], send) -> Answer:
        """`send()` answers; a 4xx must leave every url byte-identical."""
        before = [self.call("GET", url).body for url in urls]
        answer = send()
        if answer.status >= 400:
            assert [self.call("GET", url).body for url in urls] == before, answer.json
        return answer

    def send_continue(self, run_id: str, tools: str, stream: bool, **form: Any) -> Answer:
        data = {"tools": tools, "stream": "true" if stream else "false", **form}
        return self.refused_unchanged([self.run_url(run_id)], lambda: self.call(
            "POST", f"{self.run_url(run_id)}/continue", data=data))

    def after_continue(self, run_id: str, before: dict, answer: Answer, expected: int) -> None:
        """Check a continue's answer against the status expected from the run before it."""
        assert answer.status == expected, (expected, answer.body[:500])
        if expected == 409:
            assert answer.json == {"detail": f"run is already {ENDED[before['status']]}",
                                   "error_code": "RUN_NOT_PAUSED", "status": before["status"]}
        elif expected == 403:
            assert answer.json == {"detail": WAITING_FOR_APPROVAL,
                                   "error_code": "APPROVAL_PENDING"}
        elif expected == 200:
            self.continued[run_id] += 1
            self.check_answer(run_id, answer, first_id=len(before["events"]) + 1)
        self.touched.add(run_id)

    def expected_continue(self, before: dict) -> int | None:
        """409 or 403 when the state decides; None when the tools decide."""
        if before["status"] != "PAUSED":
            return 409
        if self.pending_approval(before):
            return 403
        return None

    def check_answer(self, run_id: str, answer: Answer, first_id: int) -> None:
        """A 200 of create or continue: a stream from `first_id` to a terminal event, or the
        run object at rest."""
        if answer.content_type.startswith("text/event-stream"):
            frames = answer.frames()
            assert [f[0] for f in frames] == list(range(first_id, first_id + len(frames)))
            assert frames[-1][1] in TERMINAL and {f[2]["run_id"] for f in frames} == {run_id}
        else:
            assert answer.json["run_id"] == run_id and answer.json["status"] in AT_REST

    def discover(self, run_id: str) -> None:
        """Remember the approvals a run's tool objects name."""
        for obj in self.read_run(run_id).json["tools"]:
            approval_id = obj.get("approval_id")
            if approval_id and approval_id not in self.run_of_approval:
                self.approvals.append(approval_id)
                self.run_of_approval[approval_id] = run_id

    def pick_run(self, data) -> str:
        """A run, three times in four a paused one (if any): that is where bugs would be."""
        paused = [r for r in self.runs if self.status.get(r) == "PAUSED"]
        return data.draw(st.sampled_from(paused if paused and data.draw(st.integers(0, 3))
                                         else self.runs))

    def pick_approval(self, data) -> str:
        """An approval, three times in four a pending one (if any)."""
        pending = [a for a in self.approvals if self.status.get(a) == "pending"]
        return data.draw(st.sampled_from(pending if pending and data.draw(st.integers(0, 3))
                                         else self.approvals))

    # -- rules --------------------------------------------------------------------------

    @initialize(agent_id=st.sampled_from(["approval-agent", "multi-agent"]), stream=st.booleans())
    def start_with_an_admin_pause(self, agent_id: str, stream: bool) -> None:
        """Every sequence starts with a run on its way to an approval, so approvals exist."""
        self.create(agent_id, stream, "first")

    @rule(agent_id=st.sampled_from(AGENT_IDS), stream=st.booleans(),
          message=TEXT.filter(lambda text: text != ""))
    def create(self, agent_id: str, stream: bool, message: str) -> None:
        answer = self.call("POST", f"/agents/{agent_id}/runs",
                           data={"message": message, "stream": str(stream).lower()})
        assert answer.status == 200, answer.body[:500]
        run_id = answer.frames()[0][2]["run_id"] if stream else answer.json["run_id"]
        self.runs.append(run_id)
        self.agent_of[run_id] = agent_id
        self.check_answer(run_id, answer, first_id=1)
        self.discover(run_id)
        self.touched.add(run_id)

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), stream=st.booleans(), confirmed=st.booleans(), text=TEXT,
          short=st.booleans(), echo=st.booleans(),
          admin=st.sampled_from([None, "approved", "rejected"]), resolution_data=RESOLUTION_DATA)
    def continue_with_decisions(self, data, stream: bool, confirmed: bool, text: str,
                                short: bool, echo: bool, admin: str | None,
                                resolution_data: dict | None) -> None:
        """Decide every paused call (or all but one); `echo` sends whole tool objects back;
        `admin` first resolves the run's approvals."""
        run_id = self.pick_run(data)
        for obj in waiting(self.read_run(run_id).json) if admin else []:
            if obj.get("approval_id") and self.approval_status(obj["approval_id"]) == "pending":
                self.resolve_approval(obj["approval_id"], admin, resolution_data)
        before = self.read_run(run_id).json
        calls = [obj for obj in waiting(before) if not obj.get("approval_id")]
        tools = [{**obj, **decision(obj, confirmed, text)} if echo else decision(obj, confirmed,
                                                                                  text)
                 for obj in calls]
        short = short and bool(tools)
        if short:
            tools.pop(data.draw(st.integers(0, len(tools) - 1)))
        expected = self.expected_continue(before)
        if expected is None:
            resolvable = not short and (tools or self.resolved_approval(before))
            expected = 200 if resolvable else 400
        answer = self.send_continue(run_id, json.dumps(tools), stream)
        self.after_continue(run_id, before, answer, expected)
        if expected == 200:
            self.discover(run_id)

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), tools=BAD_TOOLS, stream=st.booleans())
    def continue_with_garbage(self, data, tools: str, stream: bool) -> None:
        """Tools that cannot parse or are mistyped: a 400 whatever the run's state."""
        run_id = self.pick_run(data)
        answer = self.send_continue(run_id, tools, stream)
        assert answer.status == 400, (tools[:200], answer.body[:500])
        assert answer.json["detail"].startswith(BAD_TOOLS_PREFIXES)
        assert answer.json["error_code"] == "BAD_REQUEST"
        self.touched.add(run_id)

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), stream=st.booleans(),
          kind=st.sampled_from(["unknown call", "resolved call", "empty", "blank"]))
    def continue_with_wrong_calls(self, data, stream: bool, kind: str) -> None:
        """Well-formed tools that name no paused call, or none at all."""
        run_id = self.pick_run(data)
        before = self.read_run(run_id).json
        done = [obj["tool_call_id"] for obj in before["tools"] if obj not in waiting(before)]
        if kind == "unknown call":
            tools = json.dumps([{"tool_call_id": f"call-{uuid.uuid4().hex}", "confirmed": True}])
        elif kind == "resolved call" and done:
            tools = json.dumps([{"tool_call_id": data.draw(st.sampled_from(done)),
                                 "confirmed": True, "result": "r"}])
        else:
            tools = "[]" if kind == "empty" else " "
        expected = self.expected_continue(before)
        if expected is None:
            empty = tools in ("[]", " ")
            expected = 200 if empty and self.resolved_approval(before) else 400
        answer = self.send_continue(run_id, tools, stream)
        self.after_continue(run_id, before, answer, expected)
        if expected == 200:
            self.discover(run_id)

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), action=st.sampled_from(["continue", "cancel"]),
          kind=st.sampled_from(["unknown run", "other agent", "unknown agent", "other session",
                                "bad form"]))
    def act_at_the_wrong_address(self, data, action: str, kind: str) -> None:
        """404 (or 422) for a run that is not where the request says: nothing changes."""
        run_id = self.pick_run(data)
        agent_id, target, form = self.agent_of[run_id], run_id, {}
        expected = (404, "Run not found")
        if kind == "unknown run":
            target = str(uuid.uuid4())
        elif kind == "other agent":
            agent_id = data.draw(st.sampled_from([a for a in AGENT_IDS if a != agent_id]))
        elif kind == "unknown agent":
            agent_id, expected = f"agent-{uuid.uuid4().hex}", (404, "Agent not found")
        elif kind == "other session" and action == "continue":
            form = {"session_id": str(uuid.uuid4())}
        else:
            form, expected = {"stream": "maybe"}, (422, "Validation error")
            action = "continue"
        url = f"/agents/{agent_id}/runs/{target}/{action}"
        answer = self.refused_unchanged([self.run_url(run_id)],
                                        lambda: self.call("POST", url, data=form))
        assert (answer.status, answer.json["detail"]) == expected, answer.body[:500]

    @precondition(lambda self: self.runs)
    @rule(data=st.data())
    def cancel(self, data) -> None:
        run_id = data.draw(st.sampled_from(self.runs))  # any run: paused ones stay for others
        before = self.read_run(run_id).json
        answer = self.refused_unchanged([self.run_url(run_id)], lambda: self.call(
            "POST", f"{self.run_url(run_id)}/cancel"))
        if before["status"] == "PAUSED":
            assert (answer.status, answer.json) == (200, {})
            assert self.read_run(run_id).json["status"] == "CANCELLED"
        else:
            assert answer.status == 409
            assert answer.json == {"detail": f"run is already {ENDED[before['status']]}",
                                   "error_code": "CONFLICT", "status": before["status"]}
        self.touched.add(run_id)

    @precondition(lambda self: self.approvals)
    @rule(data=st.data(), status=st.sampled_from(["approved", "rejected"]),
          resolution_data=RESOLUTION_DATA)
    def resolve(self, data, status: str, resolution_data: dict | None) -> None:
        self.resolve_approval(self.pick_approval(data), status, resolution_data)

    def resolve_approval(self, approval_id: str, status: str, resolution_data: dict | None):
        """An admin's decision: 200 while pending, 409 once decided, 404 once deleted."""
        run_id = self.run_of_approval[approval_id]
        current = self.approval_status(approval_id)
        url = f"/approvals/{approval_id}"
        urls = [self.run_url(run_id)] + ([url] if current else [])
        answer = self.refused_unchanged(urls, lambda: self.call(
            "POST", f"{url}/resolve", json={"status": status, "resolution_data": resolution_data}))
        if current is None:
            assert (answer.status, answer.json["detail"]) == (404, "Approval not found")
        elif current != "pending":
            assert answer.status == 409, answer.body[:500]
            assert answer.json["detail"] == (f"Approval is already '{current}' and cannot be "
                                             "resolved")
        else:
            assert answer.status == 200, answer.body[:500]
            assert (answer.json["status"], answer.json["resolution_data"]) == (status,
                                                                               resolution_data)
            if status == "approved":
                self.approved.add(approval_id)
        self.touched.add(run_id)

    @precondition(lambda self: self.approvals)
    @rule(data=st.data())
    def delete_approval(self, data) -> None:
        approval_id = self.pick_approval(data)
        run_id = self.run_of_approval[approval_id]
        current = self.approval_status(approval_id)
        run = self.read_run(run_id).json
        awaited = run["status"] == "PAUSED" and any(
            obj.get("approval_id") == approval_id for obj in waiting(run))
        url = f"/approvals/{approval_id}"
        urls = [self.run_url(run_id)] + ([url] if current else [])
        answer = self.refused_unchanged(urls, lambda: self.call("DELETE", url))
        if current is None:
            assert (answer.status, answer.json["detail"]) == (404, "Approval not found")
        elif current == "pending" or awaited:
            assert answer.status == 409, answer.body[:500]
        else:
            assert answer.status == 204, answer.body[:500]
            assert self.approval_status(approval_id) is None
        self.touched.add(run_id)

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), extra=st.integers(0, 3))
    def resume_stream(self, data, extra: int) -> None:
        """A resumed stream replays every stored event after Last-Event-ID, across pauses,
        then (only while the run executes) the live ones up to the next terminal event."""
        run_id = self.pick_run(data)
        stored = len(self.read_run(run_id).json["events"])
        after = data.draw(st.integers(0, stored + extra))
        answer = self.call("GET", f"{self.run_url(run_id)}/events",
                           headers={"Last-Event-ID": str(after)})
        assert answer.status == 200
        events = self.read_run(run_id).json["events"]
        expected = []
        for seq in range(after + 1, len(events) + 1):
            expected.append((seq, events[seq - 1]["event"]))
            if seq > stored and events[seq - 1]["event"] in TERMINAL:
                break
        assert [(f[0], f[1]) for f in answer.frames()] == expected

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def touched_runs_are_sound(self) -> None:
        for run_id in sorted(self.touched):
            self.check_run(run_id)
        self.touched.clear()

    @invariant()
    def pending_count_is_true(self) -> None:
        if not self.approvals:
            return
        pending = sum(self.approval_status(a) == "pending" for a in self.approvals)
        assert self.call("GET", "/approvals/count").json == {"count": pending}

    def check_run(self, run_id: str) -> None:
        run = self.read_run(run_id).json
        assert run["status"] in WIRE_STATUSES and run["status"] in AT_REST, run["status"]
        self.status[run_id] = run["status"]
        stored = self.store.read_events(run_id)
        assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
        names = Counter(e.name for e in stored)
        assert len(run["events"]) == len(stored)
        assert stored[-1].name == AT_REST[run["status"]]
        assert names["RunContinued"] == self.continued[run_id] <= names["RunPaused"]
        for obj in run["tools"]:
            check_tool_object(obj)
        if self.pending_approval(run):
            assert run["status"] == "PAUSED"
        self.check_executions(run_id, run)

    def check_executions(self, run_id: str, run: dict) -> None:
        """Each call executed at most once; `deploy_app` only after an admin approved it."""
        lines = [line.split() for line in self.tool_log.read_text().splitlines()] \
            if self.tool_log.exists() else []
        calls = Counter(call_id for run, call_id, _ in lines if run == run_id)
        assert all(count == 1 for count in calls.values()), calls
        by_id = {obj["tool_call_id"]: obj for obj in run["tools"]}
        for call_id in calls:
            approval_id = by_id[call_id].get("approval_id")
            assert approval_id is None or approval_id in self.approved, call_id


def check_tool_object(obj: dict) -> None:
    """Every key of the contract's tool object, each with its type."""
    assert set(obj) == TOOL_KEYS, set(obj) ^ TOOL_KEYS
    for key, types in TOOL_TYPES.items():
        assert isinstance(obj[key], types), (key, obj[key])
    assert sum(obj[flag] is True for flag in WAITING_FLAGS) <= 1, obj


# -- one test per store -----------------------------------------------------------------------


def sqlite_opener(directory: Path):
    def open_store():
        store = SqliteRunStore(str(directory / f"{uuid.uuid4().hex}.db"))
        return store, store.close

    return open_store


def redis_opener(url: str):
    def open_store():
        prefix = f"agentos-props-{uuid.uuid4().hex[:12]}"
        store = RedisRunStore(url, prefix=prefix)

        def close() -> None:
            store.close()
            client = redis.Redis.from_url(url)
            try:
                keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                if keys:
                    client.delete(*keys)
            finally:
                client.close()

        return store, close

    return open_store


@pytest.mark.parametrize("store_kind", STORE_KINDS)
def test_any_sequence_of_requests_keeps_runs_sound(store_kind, request, tmp_path, monkeypatch):
    tool_log = tmp_path / "tools.log"
    monkeypatch.setenv("DEMO_TOOL_LOG", str(tool_log))
    opener = sqlite_opener(tmp_path) if store_kind == "sqlite" else redis_opener(
        request.getfixturevalue("redis_url"))
    machine = type(f"RunMachine_{store_kind}", (RunMachine,),
                   {"open_store": staticmethod(opener), "tool_log": tool_log})
    run_state_machine_as_test(machine, settings=SETTINGS)


# -- one property of an admin's decision -------------------------------------------------------


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(note=JSON)
def test_an_admin_note_of_any_json_type_is_a_string_note(client, note):
    """A rejection's `resolution_data.note` may be any JSON; the tool object keeps a string:
    the text itself, or the note as compact JSON (never a Python repr)."""
    run = client.post("/agents/approval-agent/runs", data={"message": "m", "stream": "false"}).json
    approval_id = run["tools"][0]["approval_id"]
    resolved = client.post(f"/approvals/{approval_id}/resolve",
                           json={"status": "rejected", "resolution_data": {"note": note}})
    assert resolved.status_code == 200, resolved.json
    answer = client.post(f"/agents/approval-agent/runs/{run['run_id']}/continue",
                         data={"stream": "false"})
    assert answer.status_code == 200, answer.json
    check_tool_object(answer.json["tools"][0])
    expected = "Rejected by an admin" if note is None or note == "" else (
        note if isinstance(note, str) else json.dumps(note, separators=(",", ":"),
                                                     ensure_ascii=False))
    assert answer.json["tools"][0]["confirmation_note"] == expected


# -- what every event and answer is made of ------------------------------------------------------

KEYS = st.sampled_from(["tool_call_id", "tool_args", "name", "field_type", "_internal", "_",
                        "", "content", "created_at"]) | TEXT
DOCUMENTS = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(KEYS, inner, max_size=5), max_leaves=24)


def _check_compacted(original: Any, result: Any) -> None:
    """`result` is `original` as `compact` must leave it (see its docstring)."""
    if isinstance(original, dict):
        assert type(result) is dict and result is not original
        public = {k: v for k, v in original.items() if not k.startswith("_")}
        if "tool_call_id" in original and "tool_args" in original:
            assert result == public  # nulls kept, nothing inside compacted
        elif "name" in original and "field_type" in original:
            assert result == original
        else:
            assert list(result) == [k for k, v in public.items() if v is not None]
            for key, value in result.items():
                _check_compacted(original[key], value)
    elif isinstance(original, list):
        assert type(result) is list and len(result) == len(original)
        for before, after in zip(original, result, strict=True):
            _check_compacted(before, after)
    else:
        assert result is original


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(document=DOCUMENTS)
def test_compact_drops_nulls_and_internal_keys_and_leaves_its_input_as_it_was(document):
    from copy import deepcopy

    from app.runtime.documents import compact

    before = deepcopy(document)
    _check_compacted(document, compact(document))
    assert document == before
