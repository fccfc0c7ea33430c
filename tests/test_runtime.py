"""The agent runtime driven directly through RunService (no HTTP), on both stores.

Each test starts or continues a run and follows the store until the run pauses or ends, then
checks the stored run and its event log against the contract (sections 3, 4, 8 and 10).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import groupby
from typing import Any

import pytest

from app.runtime.agent import Agent
from app.runtime.demo import demo_agents
from app.runtime.executor import RunExecutor
from app.runtime.models import ModelError
from app.runtime.models.scripted import (
    PlannedCall,
    ScriptedModel,
    latest_user_message,
    tool_results,
)
from app.runtime.resolution import ToolInputError
from app.runtime.service import RunAccess, RunService, Settings
from app.runtime.tools import tool
from statemachine.errors import ApprovalPending
from statemachine.states import RunState
from statemachine.store import StoredEvent, StoredRun
from tests.contract import TOOL_KEYS
from tests.servers import wait_until

# --- the event grammar of section 8, with consecutive RunContent deltas folded into one ----

TEXT_TURN = ["ModelRequestStarted", "RunContent", "ModelRequestCompleted"]
CALL_TURN = ["ModelRequestStarted", "ModelRequestCompleted"]
EXECUTED = ["ToolCallStarted", "ToolCallCompleted"]
PAUSED = ["RunContentCompleted", "RunPaused"]
COMPLETED = ["RunContentCompleted", "RunCompleted"]

WAITING_FLAGS = ("requires_confirmation", "requires_user_input", "external_execution_required")
PAUSE_SENTENCES = {
    ("confirm",): "I have tools to execute, but I need confirmation.",
    ("input",): "I have tools to execute, but I need user input.",
    ("external",): "I have tools to execute, but it needs external execution.",
    ("confirm", "input"): "I have tools to execute, but I need confirmation or user input.",
    ("confirm", "external"):
        "I have tools to execute, but I need confirmation or external execution.",
    ("input", "external"):
        "I have tools to execute, but I need user input or external execution.",
    ("confirm", "input", "external"):
        "I have tools to execute, but I need confirmation, user input or external execution.",
}
REJECTED = "Function call was rejected by the user"


# --- custom agents ----------------------------------------------------------------------------


@tool
def explode(reason: str) -> str:
    """Always fails."""
    raise RuntimeError(reason)


@tool
def ping() -> str:
    """Never pauses."""
    return "pong"


@tool(requires_confirmation=True)
def ask(topic: str) -> str:
    """Confirmation."""
    return f"asked {topic}"


@tool(requires_user_input=True, user_input_fields=["answer"])
def fill(answer: str) -> str:
    """User input."""
    return f"filled {answer}"


@tool(external_execution=True)
def fetch(url: str) -> str:
    """External execution."""
    return url


MIXED_CALLS = {
    "confirm": PlannedCall("ask", {"topic": "t"}),
    "input": PlannedCall("fill", {}),
    "external": PlannedCall("fetch", {"url": "u"}),
}


def _fragile(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
    result = tool_results(messages).get("explode")
    if result is None:
        return [PlannedCall("explode", {"reason": "boom"})]
    return f"Recovered (error={result['tool_call_error']}) from {result['content']}"


def _mixed(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
    if tool_results(messages):
        return "Handled"
    return [MIXED_CALLS[word] for word in latest_user_message(messages).split()]


def _broken(messages: list[dict[str, Any]]) -> str:
    raise ModelError("Model provider answered 503: overloaded")


def custom_agents() -> list[Agent]:
    def agent(agent_id: str, script, *tools) -> Agent:
        return Agent(id=agent_id, model=ScriptedModel(script), tools=list(tools))

    return [
        agent("fragile-agent", _fragile, explode),
        agent("looping-agent", lambda messages: [PlannedCall("ping")], ping),
        agent("broken-model-agent", _broken),
        agent("mixed-agent", _mixed, ask, fill, fetch),
    ]


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def service(store) -> Iterator[RunService]:
    """A RunService with its own executor over the test's store, serving demo + custom agents."""
    executor = RunExecutor(store, max_runs=4, lease_seconds=30,
                           sweep_interval=60)
    agents = {agent.id: agent for agent in [*demo_agents(), *custom_agents()]}
    yield RunService(store, agents, Settings(), executor)
    executor.shutdown(wait=True)


def settled(service: RunService, run_id: str) -> StoredRun:
    """The run once it has paused or ended (bounded wait on the store)."""

    def stopped() -> StoredRun | None:
        run = service.store.get_run(run_id)
        return None if run.state.is_executing else run

    return wait_until(stopped, 5, interval=0.01, what=f"run {run_id} to pause or end")


def start(service: RunService, agent_id: str, text: str) -> StoredRun:
    return settled(service, service.create_run(agent_id, text, None, None).run_id)


def resume(service: RunService, run: StoredRun, tools: list[dict[str, Any]]) -> StoredRun:
    service.continue_run(RunAccess(run.agent_id, run.run_id), tools)
    return settled(service, run.run_id)


def waiting(run: StoredRun) -> dict[str, dict[str, Any]]:
    """The paused calls, by tool name; each has exactly one waiting flag set (section 3)."""
    calls = {o["tool_name"]: o for o in run.doc["tools"]
             if any(o[flag] is True for flag in WAITING_FLAGS)}
    for obj in calls.values():
        assert [obj[flag] for flag in WAITING_FLAGS].count(True) == 1, obj
    return calls


def decided(run: StoredRun, **fields_by_name: dict[str, Any]) -> list[dict[str, Any]]:
    """What a client sends back: the paused tool objects, with its decisions filled in."""
    calls = waiting(run)
    return [{**calls[name], **fields} for name, fields in fields_by_name.items()]


def with_values(obj: dict[str, Any], **values: Any) -> dict[str, Any]:
    schema = [dict(f, value=values.get(f["name"], f["value"])) for f in obj["user_input_schema"]]
    return {"user_input_schema": schema}


def log_of(service: RunService, run: StoredRun) -> list[StoredEvent]:
    events = service.store.read_events(run.run_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    return events


def shape(events: list[StoredEvent]) -> list[str]:
    """Event names in order, each run of RunContent deltas folded into one name."""
    return [name for name, _ in groupby(e.name for e in events)]


def last(events: list[StoredEvent], name: str) -> dict[str, Any]:
    return next(e.data for e in reversed(events) if e.name == name)


def assert_log(service: RunService, run: StoredRun, expected: list[str]) -> list[StoredEvent]:
    """Seqs 1..n without gaps, names in section 8's order, the answer equal to its deltas."""
    events = log_of(service, run)
    assert shape(events) == expected
    if run.state is RunState.COMPLETED:
        turn = events[max(i for i, e in enumerate(events) if e.name == "ModelRequestStarted"):]
        assert "".join(e.data["content"] for e in turn if e.name == "RunContent") == \
            run.doc["content"]
        assert last(events, "RunCompleted")["content"] == run.doc["content"]
    if run.state is RunState.PAUSED:
        paused = last(events, "RunPaused")
        assert paused["content"] == run.doc["content"]
        assert paused["tools"] == list(waiting(run).values())
    for event in events:
        for obj in [event.data.get("tool"), *event.data.get("tools", [])]:
            assert obj is None or set(obj) == TOOL_KEYS
    return events


def tool_log(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# --- demo agents (contract section 10) --------------------------------------------------------


def test_chat_agent_echoes(service):
    run = start(service, "chat-agent", "hello there")
    assert (run.state, run.doc["content"]) == (RunState.COMPLETED, "Echo: hello there")
    events = assert_log(service, run, ["RunStarted", *TEXT_TURN, *COMPLETED])
    assert len([e for e in events if e.name == "RunContent"]) > 1  # streamed in deltas


def test_confirm_agent_runs_the_tool_once_confirmed(service, tmp_path, monkeypatch):
    monkeypatch.setenv("DEMO_TOOL_LOG", str(tmp_path / "tools.log"))
    run = start(service, "confirm-agent", "hi")
    assert run.state is RunState.PAUSED
    assert run.doc["content"] == "I have tools to execute, but I need confirmation."
    assert_log(service, run, ["RunStarted", *CALL_TURN, *PAUSED])
    assert tool_log(tmp_path / "tools.log") == []

    run = resume(service, run, decided(run, send_email={"confirmed": True}))
    assert (run.state, run.doc["content"]) == (RunState.COMPLETED, "Done: sent to a@example.com")
    (call,) = run.doc["tools"]
    assert call["tool_args"] == {"to": "a@example.com", "subject": "hi"}
    assert (call["requires_confirmation"], call["confirmed"], call["result"],
            call["tool_call_error"]) == (False, True, "sent to a@example.com", False)
    assert set(call["metrics"]) == {"start_time", "end_time", "duration"}
    events = assert_log(service, run, ["RunStarted", *CALL_TURN, *PAUSED, "RunContinued",
                                       *EXECUTED, *TEXT_TURN, *COMPLETED])
    assert last(events, "ToolCallCompleted")["content"] == "sent to a@example.com"
    assert tool_log(tmp_path / "tools.log") == [f"{run.run_id} {call['tool_call_id']} send_email"]


@pytest.mark.parametrize(("note", "expected"), [("not today", "not today"), (None, REJECTED)])
def test_confirm_agent_reports_a_rejection(service, tmp_path, monkeypatch, note, expected):
    monkeypatch.setenv("DEMO_TOOL_LOG", str(tmp_path / "tools.log"))
    run = start(service, "confirm-agent", "hi")
    rejection = {"confirmed": False, "confirmation_note": note}
    run = resume(service, run, decided(run, send_email=rejection))
    assert (run.state, run.doc["content"]) == (RunState.COMPLETED, f"Not sent: {expected}")
    (call,) = run.doc["tools"]
    assert (call["confirmed"], call["tool_call_error"], call["result"]) == (False, True, None)
    tool_message = run.doc["messages"][-2]
    assert (tool_message["role"], tool_message["content"], tool_message["tool_call_error"]) == (
        "tool", expected, True)
    assert_log(service, run, ["RunStarted", *CALL_TURN, *PAUSED, "RunContinued", *TEXT_TURN,
                              *COMPLETED])
    assert tool_log(tmp_path / "tools.log") == []


def test_external_agent_passes_the_client_result_to_the_model(service, tmp_path, monkeypatch):
    monkeypatch.setenv("DEMO_TOOL_LOG", str(tmp_path / "tools.log"))
    run = start(service, "external-agent", "Oslo")
    assert run.doc["content"] == "I have tools to execute, but it needs external execution."
    assert waiting(run)["get_weather"]["tool_args"] == {"city": "Oslo"}

    run = resume(service, run, decided(run, get_weather={"result": "rain, 12C"}))
    assert (run.state, run.doc["content"]) == (RunState.COMPLETED, "Weather: rain, 12C")
    (call,) = run.doc["tools"]
    assert (call["external_execution_required"], call["result"], call["tool_call_error"]) == (
        False, "rain, 12C", False)
    assert_log(service, run, ["RunStarted", *CALL_TURN, *PAUSED, "RunContinued", *TEXT_TURN,
                              *COMPLETED])
    assert tool_log(tmp_path / "tools.log") == []  # the client ran it, not the server


def test_input_agent_merges_the_passenger_into_the_call(service, tmp_path, monkeypatch):
    monkeypatch.setenv("DEMO_TOOL_LOG", str(tmp_path / "tools.log"))
    run = start(service, "input-agent", "Paris")
    assert run.doc["content"] == "I have tools to execute, but I need user input."
    call = waiting(run)["book_flight"]
    assert call["user_input_schema"] == [
        {"name": "passenger", "field_type": "str", "description": None, "value": None}]

    run = resume(service, run, decided(run, book_flight=with_values(call, passenger="Ada")))
    assert (run.state, run.doc["content"]) == (RunState.COMPLETED, "Booked: Ada to Paris")
    (call,) = run.doc["tools"]
    assert call["tool_args"] == {"destination": "Paris", "passenger": "Ada"}
    assert (call["answered"], call["requires_user_input"], call["result"]) == (
        True, False, "Ada to Paris")
    assert call["user_input_schema"][0]["value"] == "Ada"
    assert_log(service, run, ["RunStarted", *CALL_TURN, *PAUSED, "RunContinued", *EXECUTED,
                              *TEXT_TURN, *COMPLETED])
    assert tool_log(tmp_path / "tools.log") == [f"{run.run_id} {call['tool_call_id']} book_flight"]


@pytest.mark.parametrize(("status", "data", "expected"), [
    ("approved", None, "Deployed: deployed web"),
    ("rejected", {"note": "not on a Friday"}, "Not deployed: not on a Friday"),
    ("rejected", None, "Not deployed: Rejected by an admin"),
])
def test_approval_agent_applies_the_admin_decision(service, status, data, expected):
    run = start(service, "approval-agent", "web")
    assert (run.state, run.admin_pending) == (RunState.PAUSED, True)
    assert run.doc["content"] == "I have tools to execute, but I need confirmation."
    call = waiting(run)["deploy_app"]
    assert (call["approval_type"], call["requires_confirmation"]) == ("required", True)
    with pytest.raises(ApprovalPending):
        resume(service, run, decided(run, deploy_app={"confirmed": True}))

    approval = service.resolve_approval(call["approval_id"], status, data, "admin-key")
    assert (approval.status, approval.resolved_by) == (status, "admin-key")
    run = resume(service, run, [])
    assert (run.state, run.doc["content"]) == (RunState.COMPLETED, expected)
    assert run.doc["tools"][0]["tool_call_error"] is (status == "rejected")
    tools_ran = EXECUTED if status == "approved" else []
    assert_log(service, run, ["RunStarted", *CALL_TURN, *PAUSED, "RunContinued", *tools_ran,
                              *TEXT_TURN, *COMPLETED])


def _multi_first_pause(service: RunService) -> StoredRun:
    run = start(service, "multi-agent", "Rome")
    assert run.doc["content"] == \
        "I have tools to execute, but I need confirmation or external execution."
    assert list(waiting(run)) == ["send_email", "get_weather"]
    return run


@pytest.mark.parametrize("resolved", ["send_email", "get_weather"])
def test_multi_agent_refuses_a_continue_that_resolves_one_of_two_calls(service, resolved):
    run = _multi_first_pause(service)
    decisions = {"send_email": {"confirmed": True}, "get_weather": {"result": "hot"}}
    calls = waiting(run)
    open_call = calls["get_weather" if resolved == "send_email" else "send_email"]
    sentence = {
        "send_email": "requires confirmed true or false",
        "get_weather": "requires a result from external execution",
    }[open_call["tool_name"]]
    before, events_before = service.store.get_run(run.run_id), log_of(service, run)

    with pytest.raises(ToolInputError) as refused:
        service.continue_run(RunAccess(run.agent_id, run.run_id),
                             decided(run, **{resolved: decisions[resolved]}))
    assert refused.value.detail == \
        f"Tool call {open_call['tool_call_id']} ({open_call['tool_name']}) {sentence}"
    after = service.store.get_run(run.run_id)
    assert (after.version, after.state) == (before.version, RunState.PAUSED)
    assert after == before  # the same document, lease, guard and last event too
    assert log_of(service, run) == events_before


def test_multi_agent_pauses_twice_then_completes(service, tmp_path, monkeypatch):
    monkeypatch.setenv("DEMO_TOOL_LOG", str(tmp_path / "tools.log"))
    run = _multi_first_pause(service)
    assert len(last(log_of(service, run), "RunPaused")["tools"]) == 2

    run = resume(service, run, decided(run, send_email={"confirmed": True},
                                       get_weather={"result": "hot"}))
    assert (run.state, run.admin_pending) == (RunState.PAUSED, True)
    assert run.doc["content"] == "I have tools to execute, but I need confirmation."
    events = assert_log(service, run, ["RunStarted", *CALL_TURN, *PAUSED, "RunContinued",
                                       *EXECUTED, *CALL_TURN, *PAUSED])
    (deploy,) = last(events, "RunPaused")["tools"]
    assert (deploy["tool_name"], deploy["tool_args"]) == ("deploy_app", {"app": "Rome"})

    service.resolve_approval(deploy["approval_id"], "approved", None, "admin-key")
    run = resume(service, run, [])
    assert (run.state, run.doc["content"]) == (RunState.COMPLETED, "All done")
    assert_log(service, run, ["RunStarted", *CALL_TURN, *PAUSED, "RunContinued", *EXECUTED,
                              *CALL_TURN, *PAUSED, "RunContinued", *EXECUTED, *TEXT_TURN,
                              *COMPLETED])
    by_name = {o["tool_name"]: o for o in run.doc["tools"]}
    assert [by_name[n]["result"] for n in ("send_email", "get_weather", "deploy_app")] == [
        "sent to a@example.com", "hot", "deployed Rome"]
    assert tool_log(tmp_path / "tools.log") == [
        f"{run.run_id} {by_name[name]['tool_call_id']} {name}"
        for name in ("send_email", "deploy_app")]


def test_demo_tool_latency_delays_the_tool(service, monkeypatch):
    monkeypatch.setenv("DEMO_TOOL_LATENCY_MS", "300")
    run = start(service, "confirm-agent", "slow")
    run = resume(service, run, decided(run, send_email={"confirmed": True}))
    assert run.state is RunState.COMPLETED
    assert run.doc["tools"][0]["metrics"]["duration"] >= 0.3


# --- custom agents: failures, bounds, mixed pauses --------------------------------------------


def test_a_failing_tool_is_reported_to_the_model_and_the_run_goes_on(service):
    run = start(service, "fragile-agent", "go")
    assert (run.state, run.doc["content"]) == (
        RunState.COMPLETED, "Recovered (error=True) from RuntimeError: boom")
    (call,) = run.doc["tools"]
    assert (call["tool_call_error"], call["result"]) == (True, "RuntimeError: boom")
    events = assert_log(service, run, ["RunStarted", *CALL_TURN, "ToolCallStarted",
                                       "ToolCallError", *TEXT_TURN, *COMPLETED])
    failed = last(events, "ToolCallError")
    assert (failed["error"], failed["tool"]["tool_call_error"]) == ("RuntimeError: boom", True)


def test_the_turn_bound_ends_the_run_in_error(service):
    run = start(service, "looping-agent", "forever")
    content = "The agent stopped after 10 model turns without a final answer"
    assert (run.state, run.doc["content"]) == (RunState.ERRORED, content)
    events = assert_log(service, run, ["RunStarted", *(CALL_TURN + EXECUTED) * 10, "RunError"])
    assert last(events, "RunError")["content"] == content
    assert len(run.doc["tools"]) == 10


def test_a_model_error_ends_the_run_in_error_with_its_text(service):
    run = start(service, "broken-model-agent", "hi")
    content = "Model provider answered 503: overloaded"
    assert (run.state, run.doc["content"]) == (RunState.ERRORED, content)
    events = assert_log(service, run, ["RunStarted", "ModelRequestStarted", "RunError"])
    error = last(events, "RunError")
    assert (error["content"], error["error_type"]) == (content, "ModelProviderError")


@pytest.mark.parametrize("kinds", list(PAUSE_SENTENCES), ids="+".join)
def test_the_pause_content_names_every_kind_paused_now(service, kinds):
    run = start(service, "mixed-agent", " ".join(kinds))
    assert (run.state, run.doc["content"]) == (RunState.PAUSED, PAUSE_SENTENCES[kinds])
    assert len(waiting(run)) == len(kinds)
    assert_log(service, run, ["RunStarted", *CALL_TURN, *PAUSED])


def test_a_mixed_pause_resolved_at_once(service):
    run = start(service, "mixed-agent", "confirm input external")
    calls = waiting(run)
    run = resume(service, run, decided(run, ask={"confirmed": True}, fetch={"result": "page"},
                                       fill=with_values(calls["fill"], answer="42")))
    assert (run.state, run.doc["content"]) == (RunState.COMPLETED, "Handled")
    assert [o["result"] for o in run.doc["tools"]] == ["asked t", "filled 42", "page"]
    assert_log(service, run, ["RunStarted", *CALL_TURN, *PAUSED, "RunContinued",
                              *EXECUTED * 2, *TEXT_TURN, *COMPLETED])
