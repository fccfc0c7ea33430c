"""POST /agents/{agent_id}/runs/{run_id}/continue (contract 5.1), on both stores.

Every row of the check table with its exact answer, the order of the checks, the 400 sentences
of section 4, each pause kind resolved over HTTP, and the invariant that a refused continue
leaves the run exactly as it was (a correct continue then succeeds).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from app.runtime.agent import Agent
from app.runtime.demo import demo_agents, send_email
from app.runtime.models import ModelError
from app.runtime.models.scripted import PlannedCall, ScriptedModel

KEY = "continue-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HOLD_SECONDS = 10
WAITING_FOR_APPROVAL = "This run requires admin approval before it can be continued"
INVALID_TOOLS = "Invalid structure or content for tools: "

# The decision that resolves the one paused call of each single-tool demo agent, and the answer
# the agent then gives for the message "Paris".
DECISIONS: dict[str, dict[str, Any]] = {
    "confirm-agent": {"confirmed": True},
    "external-agent": {"result": "sunny"},
    "input-agent": {"user_input_schema": [{"name": "passenger", "value": "Alice"}]},
}
ANSWERS = {
    "confirm-agent": "Done: sent to a@example.com",
    "external-agent": "Weather: sunny",
    "input-agent": "Booked: Alice to Paris",
}


def _held(gate: threading.Event):
    """send_email, then "Done"; every model turn first waits for `gate` (bounded)."""

    def script(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
        assert gate.wait(HOLD_SECONDS), "the test never opened the gate"
        if any(m["role"] == "tool" for m in messages):
            return "Done"
        return [PlannedCall("send_email", {"to": "a@example.com", "subject": "held"})]

    return script


def _provider_down(messages: list[dict[str, Any]]) -> str:
    raise ModelError("model provider is down")


def continue_agents(gate: threading.Event) -> list[Agent]:
    """The demo agents, one whose model turns wait for `gate`, and one that always fails."""
    return [
        *demo_agents(),
        Agent(id="held-agent", model=ScriptedModel(_held(gate)), tools=[send_email]),
        Agent(id="broken-agent", model=ScriptedModel(_provider_down), tools=[]),
    ]


@pytest.fixture
def gate() -> threading.Event:
    """Closed at first: held-agent's model turns wait until the test opens it."""
    return threading.Event()


@pytest.fixture
def app_config(gate: threading.Event) -> dict:
    return {"AGENTS": continue_agents(gate)}


@pytest.fixture
def held(gate: threading.Event, app):
    """The gate, opened when the test ends, so held runs finish before the app stops."""
    yield gate
    gate.set()


# -- helpers ----------------------------------------------------------------------------------


def create(client, agent_id: str, message: str = "Paris", headers=None, **fields) -> dict:
    """A run created with stream=false: the run object once it paused or ended."""
    response = client.post(f"/agents/{agent_id}/runs", headers=headers,
                           data={"message": message, "stream": "false", **fields})
    assert response.status_code == 200, response.json
    return response.json


def post_continue(client, run: dict, tools: Any = None, *, agent_id: str | None = None,
                  headers=None, **fields):
    """POST a continue; `tools` is JSON-encoded unless it is already a string."""
    data = {"stream": "false", **fields}
    if tools is not None:
        data["tools"] = tools if isinstance(tools, str) else json.dumps(tools)
    url = f"/agents/{agent_id or run['agent_id']}/runs/{run['run_id']}/continue"
    return client.post(url, data=data, headers=headers)


def get_run(client, run: dict, headers=None) -> dict:
    response = client.get(f"/agents/{run['agent_id']}/runs/{run['run_id']}", headers=headers)
    assert response.status_code == 200, response.json
    return response.json


def decided(run: dict, **decision: Any) -> list[dict]:
    """The run's first tool object with the client's decision merged in."""
    return [dict(run["tools"][0], **decision)]


def refused(client, run: dict, status: int, detail: str, code: str, tools: Any = None,
            *, get_headers=None, **kwargs) -> dict:
    """A continue refused with this answer, and the run exactly as it was before.

    A `detail` ending in ": " is a prefix: the contract leaves what follows it free.
    """
    before = get_run(client, run, headers=get_headers)
    response = post_continue(client, run, tools, **kwargs)
    body = response.json
    assert (response.status_code, body["error_code"]) == (status, code), body
    if detail.endswith(": "):
        assert body["detail"].startswith(detail), body
    else:
        assert body["detail"] == detail
    assert get_run(client, run, headers=get_headers) == before
    return body


def finish(client, run: dict, **kwargs) -> dict:
    """The correct continue of a single-tool demo run succeeds with the agent's answer."""
    agent_id = run["agent_id"]
    response = post_continue(client, run, decided(run, **DECISIONS[agent_id]), **kwargs)
    assert response.status_code == 200, response.json
    assert response.json["status"] == "COMPLETED"
    assert response.json["content"] == ANSWERS[agent_id]
    return response.json


def resolve_approval(client, run: dict, status: str = "approved", headers=None) -> None:
    approval_id = next(t["approval_id"] for t in run["tools"]
                       if t["approval_id"] and t["requires_confirmation"])
    response = client.post(f"/approvals/{approval_id}/resolve", json={"status": status},
                           headers=headers)
    assert response.status_code == 200, response.json


# -- 1: credentials ---------------------------------------------------------------------------


@pytest.mark.parametrize("app_config", [{"OS_SECURITY_KEY": KEY}], ids=["security-key"])
@pytest.mark.parametrize(("headers", "detail"), [
    ({}, "Authorization header required"),
    ({"Authorization": f"Basic {KEY}"}, "Authorization header required"),
    ({"Authorization": "Bearer"}, "Authorization header required"),
    ({"Authorization": "Bearer wrong-key"}, "Invalid authentication token"),
], ids=["missing", "other-scheme", "empty-token", "wrong-key"])
def test_credentials_are_checked_first(client, headers, detail):
    run = create(client, "confirm-agent", headers=AUTH)
    refused(client, run, 401, detail, "UNAUTHENTICATED", decided(run, confirmed=True),
            headers=headers, get_headers=AUTH)
    # bad credentials and a bad form, bad tools, an unknown agent: still 401 first
    refused(client, run, 401, detail, "UNAUTHENTICATED", "{not json", headers=headers,
            get_headers=AUTH, stream="maybe", agent_id="no-such-agent")
    finish(client, run, headers=AUTH)


# -- the order of the checks ------------------------------------------------------------------


def test_each_check_answers_before_the_next(client):
    """Start with every check failing; fixing them one by one walks down the table."""
    run = create(client, "approval-agent")
    other_session = {"session_id": "not-" + run["session_id"]}
    ladder = [
        (422, "Validation error", "VALIDATION_ERROR",
         dict(tools="{not json", stream="maybe", agent_id="no-such-agent", **other_session)),
        (400, "Invalid JSON in tools field", "BAD_REQUEST",
         dict(tools="{not json", agent_id="no-such-agent", **other_session)),
        (400, INVALID_TOOLS, "BAD_REQUEST",
         dict(tools="{}", agent_id="no-such-agent", **other_session)),
        (404, "Agent not found", "NOT_FOUND",
         dict(tools=[{"tool_call_id": "unknown"}], agent_id="no-such-agent", **other_session)),
        (404, "Run not found", "NOT_FOUND",
         dict(tools=[{"tool_call_id": "unknown"}], **other_session)),
        (403, WAITING_FOR_APPROVAL, "APPROVAL_PENDING", dict(tools=[{"tool_call_id": "unknown"}])),
    ]
    for status, detail, code, kwargs in ladder:
        refused(client, run, status, detail, code, **kwargs)
    resolve_approval(client, run)
    refused(client, run, 400, "Tool call unknown is not part of this run", "BAD_REQUEST",
            [{"tool_call_id": "unknown"}])
    answer = post_continue(client, run, "")
    assert answer.status_code == 200, answer.json
    assert answer.json["content"] == "Deployed: deployed Paris"


def test_state_is_checked_before_the_tools(client):
    run = create(client, "chat-agent")
    body = refused(client, run, 409, "run is already completed", "RUN_NOT_PAUSED",
                   [{"tool_call_id": "unknown"}])
    assert body["status"] == "COMPLETED"
    refused(client, run, 404, "Run not found", "NOT_FOUND", [{"tool_call_id": "unknown"}],
            session_id="another-session")


# -- 2 to 4: the form and the tools field -----------------------------------------------------


def test_a_form_field_that_is_not_a_boolean_is_a_422(client):
    run = create(client, "confirm-agent")
    body = refused(client, run, 422, "Validation error", "VALIDATION_ERROR",
                   decided(run, confirmed=True), stream="maybe")
    assert body["errors"] == {"stream": ["Not a valid boolean."]}
    finish(client, run)


def test_tools_that_are_not_json_are_a_400(client):
    run = create(client, "confirm-agent")
    refused(client, run, 400, "Invalid JSON in tools field", "BAD_REQUEST", "[{'confirmed': 1}")
    finish(client, run)


@pytest.mark.parametrize(("tools", "names"), [
    ({"tool_call_id": "call_1_1", "confirmed": True}, "array"),
    (["call_1_1"], "tools[0]"),
    ([{"confirmed": True}], "tool_call_id"),
    ([{"tool_call_id": 7, "confirmed": True}], "tool_call_id"),
    ([{"tool_call_id": "call_1_1", "confirmed": "yes"}], "confirmed"),
    ([{"tool_call_id": "call_1_1", "user_input_schema": "Alice"}], "user_input_schema"),
], ids=["not-an-array", "item-not-an-object", "no-tool-call-id", "id-not-a-string",
        "confirmed-as-string", "schema-not-a-list"])
def test_tools_of_the_wrong_structure_are_a_400(client, tools, names):
    run = create(client, "confirm-agent")
    body = refused(client, run, 400, INVALID_TOOLS, "BAD_REQUEST", tools)
    assert names in body["detail"]
    finish(client, run)


# -- 5 and 6: which agent, which run ----------------------------------------------------------


def test_an_unknown_agent_is_a_404(client):
    run = create(client, "confirm-agent")
    refused(client, run, 404, "Agent not found", "NOT_FOUND", decided(run, confirmed=True),
            agent_id="no-such-agent")
    finish(client, run)


@pytest.mark.parametrize("mismatch", [
    {"agent_id": "external-agent"},
    {"session_id": "another-session"},
    {"user_id": "mallory"},
], ids=["another-agents-path", "wrong-session", "wrong-user"])
def test_a_run_that_does_not_match_is_not_found(client, mismatch):
    run = create(client, "confirm-agent", user_id="alice", session_id="s-1")
    refused(client, run, 404, "Run not found", "NOT_FOUND", decided(run, confirmed=True),
            **mismatch)
    finish(client, run, session_id="s-1", user_id="alice")


def test_an_unknown_run_is_not_found(client):
    unknown = {"agent_id": "confirm-agent", "run_id": "no-such-run"}
    response = post_continue(client, unknown, [{"tool_call_id": "call_1_1", "confirmed": True}])
    assert response.status_code == 404
    assert response.json == {"detail": "Run not found", "error_code": "NOT_FOUND"}


# -- 7: only a PAUSED run continues -----------------------------------------------------------


def start_streaming(client, url: str, data: dict) -> str:
    """POST with stream=true and hang up at once (the run goes on executing); the run id."""
    response = client.post(url, data={**data, "stream": "true"})
    assert response.status_code == 200
    response.close()
    return response.headers["Location"].split("?")[0].split("/")[-2]


def running_run(client, gate: threading.Event) -> dict:
    """A run whose first model turn is held (the gate stays closed): RUNNING."""
    run_id = start_streaming(client, "/agents/held-agent/runs", {"message": "hi"})
    return {"agent_id": "held-agent", "run_id": run_id}


def continued_run(client, gate: threading.Event) -> dict:
    """A run that paused freely, then was continued into a held model turn: CONTINUED."""
    gate.set()
    run = create(client, "held-agent")
    gate.clear()
    start_streaming(client, f"/agents/held-agent/runs/{run['run_id']}/continue",
                    {"tools": json.dumps(decided(run, confirmed=True))})
    return run


def cancelled_run(client) -> dict:
    run = create(client, "confirm-agent")
    response = client.post(f"/agents/confirm-agent/runs/{run['run_id']}/cancel")
    assert response.status_code == 200, response.json
    return get_run(client, run)


def errored_run(client) -> dict:
    run = create(client, "broken-agent")
    assert (run["status"], run["content"]) == ("ERROR", "model provider is down")
    return run


@pytest.mark.parametrize(("make_run", "word"), [(running_run, "running"),
                                                (continued_run, "continued")],
                         ids=["running", "continued"])
def test_an_executing_run_is_a_409(client, held, make_run, word):
    run = make_run(client, held)
    response = post_continue(client, run, [{"tool_call_id": "call_1_1", "confirmed": True}])
    assert response.status_code == 409
    assert response.json == {"detail": f"run is already {word}", "error_code": "RUN_NOT_PAUSED",
                             "status": "RUNNING"}


@pytest.mark.parametrize(("make_run", "word", "wire"), [
    (lambda client: create(client, "chat-agent"), "completed", "COMPLETED"),
    (errored_run, "errored", "ERROR"),
    (cancelled_run, "cancelled", "CANCELLED"),
], ids=["completed", "errored", "cancelled"])
def test_a_finished_run_is_a_409_and_stays_finished(client, make_run, word, wire):
    run = make_run(client)
    body = refused(client, run, 409, f"run is already {word}", "RUN_NOT_PAUSED",
                   [{"tool_call_id": "call_1_1", "confirmed": True}])
    assert body["status"] == wire


# -- 8: a pending admin approval --------------------------------------------------------------


def test_a_pending_approval_is_a_403_whatever_the_client_sends(client):
    run = create(client, "approval-agent")
    assert run["tools"][0]["approval_type"] == "required"
    for tools in (None, "", decided(run, confirmed=True), decided(run, confirmed=False)):
        body = refused(client, run, 403, WAITING_FOR_APPROVAL, "APPROVAL_PENDING", tools)
        assert set(body) == {"detail", "error_code"}
    resolve_approval(client, run, "rejected")
    answer = post_continue(client, run, decided(run, confirmed=True))
    assert answer.status_code == 200, answer.json
    assert answer.json["content"] == "Not deployed: Rejected by an admin"


# -- 9: the tools must resolve every paused call ----------------------------------------------


@pytest.mark.parametrize(("agent_id", "make_tools", "detail"), [
    ("confirm-agent", lambda run: [{"tool_call_id": "nope", "confirmed": True}],
     "Tool call nope is not part of this run"),
    ("confirm-agent", lambda run: decided(run),
     "Tool call call_1_1 (send_email) requires confirmed true or false"),
    ("confirm-agent", lambda run: [{"tool_call_id": "call_1_1"}],
     "Tool call call_1_1 (send_email) requires confirmed true or false"),
    ("external-agent", lambda run: decided(run),
     "Tool call call_1_1 (get_weather) requires a result from external execution"),
    ("input-agent", lambda run: decided(run),
     "Tool call call_1_1 (book_flight) requires a value for passenger"),
    ("input-agent", lambda run: decided(run, user_input_schema=[{"name": "passenger"}]),
     "Tool call call_1_1 (book_flight) requires a value for passenger"),
    ("confirm-agent", lambda run: "", "tools is required: the run is waiting for 1 tool call(s)"),
    ("confirm-agent", lambda run: [], "tools is required: the run is waiting for 1 tool call(s)"),
    ("external-agent", lambda run: None,
     "tools is required: the run is waiting for 1 tool call(s)"),
], ids=["unknown-id", "confirmation-null", "confirmation-absent", "external-no-result",
        "user-input-missing", "user-input-no-value", "empty-string", "empty-list", "absent"])
def test_unresolved_tools_are_a_400_naming_the_call(client, agent_id, make_tools, detail):
    run = create(client, agent_id)
    refused(client, run, 400, detail, "BAD_REQUEST", make_tools(run))
    finish(client, run)


# -- transport details ------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded",
                                          "multipart/form-data"])
def test_both_form_encodings_are_accepted(client, content_type):
    run = create(client, "confirm-agent")
    response = client.post(f"/agents/confirm-agent/runs/{run['run_id']}/continue",
                           content_type=content_type,
                           data={"tools": json.dumps(decided(run, confirmed=True)),
                                 "stream": "false"})
    assert response.request.content_type.startswith(content_type)
    assert response.status_code == 200, response.json
    assert response.json["content"] == ANSWERS["confirm-agent"]


def test_a_trailing_slash_is_tolerated(client):
    run = create(client, "confirm-agent")
    response = client.post(f"/agents/confirm-agent/runs/{run['run_id']}/continue/",
                           data={"tools": json.dumps(decided(run, confirmed=True)),
                                 "stream": "false"})
    assert response.status_code == 200, response.json
    assert response.json["content"] == ANSWERS["confirm-agent"]


# -- each pause kind through HTTP -------------------------------------------------------------


def test_a_confirmed_call_is_executed(client):
    run = create(client, "confirm-agent")
    assert run["content"] == "I have tools to execute, but I need confirmation."
    tool = finish(client, run)["tools"][0]
    assert (tool["confirmed"], tool["requires_confirmation"], tool["tool_call_error"]) == (
        True, False, False)
    assert tool["result"] == "sent to a@example.com"
    assert set(tool["metrics"]) == {"start_time", "end_time", "duration"}


@pytest.mark.parametrize(("note", "answer"), [
    ("not today", "Not sent: not today"),
    (None, "Not sent: Function call was rejected by the user"),
], ids=["with-note", "without-note"])
def test_a_rejected_call_is_not_executed(client, note, answer):
    run = create(client, "confirm-agent")
    response = post_continue(client, run, decided(run, confirmed=False, confirmation_note=note))
    assert response.status_code == 200, response.json
    done = response.json
    assert (done["status"], done["content"]) == ("COMPLETED", answer)
    tool = done["tools"][0]
    assert (tool["confirmed"], tool["tool_call_error"], tool["result"]) == (False, True, None)
    tool_message = next(m for m in done["messages"] if m["role"] == "tool")
    assert tool_message["content"] == answer.removeprefix("Not sent: ")
    assert tool_message["tool_call_error"] is True


def test_an_external_result_is_given_to_the_model(client):
    run = create(client, "external-agent", message="Oslo")
    assert run["content"] == "I have tools to execute, but it needs external execution."
    response = post_continue(client, run, decided(run, result="snow, -3 C"))
    assert response.status_code == 200, response.json
    assert response.json["content"] == "Weather: snow, -3 C"
    tool = response.json["tools"][0]
    assert (tool["result"], tool["external_execution_required"]) == ("snow, -3 C", False)


def test_user_input_is_merged_into_the_arguments(client):
    run = create(client, "input-agent")
    assert run["content"] == "I have tools to execute, but I need user input."
    assert run["tools"][0]["user_input_schema"] == [
        {"name": "passenger", "field_type": "str", "description": None, "value": None}]
    tool = finish(client, run)["tools"][0]
    assert tool["tool_args"] == {"destination": "Paris", "passenger": "Alice"}
    assert (tool["answered"], tool["requires_user_input"]) == (True, False)
    assert tool["result"] == "Alice to Paris"


def test_a_continue_can_lead_to_a_second_pause(client):
    run = create(client, "multi-agent")
    email, weather = run["tools"]
    refused(client, run, 400, "tools is required: the run is waiting for 2 tool call(s)",
            "BAD_REQUEST", "")
    refused(client, run, 400,
            "Tool call call_1_2 (get_weather) requires a result from external execution",
            "BAD_REQUEST", [dict(email, confirmed=True)])
    response = post_continue(client, run, [dict(email, confirmed=True),
                                           dict(weather, result="rain")])
    assert response.status_code == 200, response.json
    paused = response.json
    assert (paused["status"], paused["content"]) == (
        "PAUSED", "I have tools to execute, but I need confirmation.")
    waiting = [t for t in paused["tools"] if t["requires_confirmation"]]
    assert [(t["tool_call_id"], t["tool_name"]) for t in waiting] == [("call_2_1", "deploy_app")]
    refused(client, paused, 403, WAITING_FOR_APPROVAL, "APPROVAL_PENDING", "")
    resolve_approval(client, paused)
    refused(client, paused, 400, "Tool call call_1_1 (send_email) is not waiting for input",
            "BAD_REQUEST", [dict(email, confirmed=True)])
    done = post_continue(client, paused, "")
    assert done.status_code == 200, done.json
    assert (done.json["status"], done.json["content"]) == ("COMPLETED", "All done")
    assert done.json["tools"][2]["result"] == "deployed Paris"
