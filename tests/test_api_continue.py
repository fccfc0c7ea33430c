"""POST /agents/{agent_id}/runs/{run_id}/continue (contract 5.1), on both stores.

Every row of the check table with its exact answer, the order of the checks, the 400 sentences
of section 4, each pause kind resolved over HTTP, and the invariant that a refused continue
leaves the run exactly as it was (a correct continue then succeeds).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.runtime.agent import Agent
from app.runtime.demo import demo_agents, send_email
from app.runtime.models import ModelError
from app.runtime.models.scripted import PlannedCall, ScriptedModel

KEY = "continue-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOW_MS = 400
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


def _email_then_done(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
    if any(m["role"] == "tool" for m in messages):
        return "Done"
    return [PlannedCall("send_email", {"to": "a@example.com", "subject": "slow"})]


def _provider_down(messages: list[dict[str, Any]]) -> str:
    raise ModelError("model provider is down")


def test_agents() -> list[Agent]:
    """The demo agents, a slow one (every model turn takes SLOW_MS) and a broken one."""
    return [
        *demo_agents(),
        Agent(id="slow-agent", model=ScriptedModel(_email_then_done, latency_ms=SLOW_MS),
              tools=[send_email]),
        Agent(id="broken-agent", model=ScriptedModel(_provider_down), tools=[]),
    ]


test_agents.__test__ = False  # a factory, not a test


@pytest.fixture
def app_config() -> dict:
    return {"AGENTS": test_agents()}


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


def refused(client, run: dict, status: int, detail: str | None, code: str, tools: Any = None,
            *, get_headers=None, **kwargs) -> dict:
    """A continue refused with this answer (any `detail` when None); the run is unchanged."""
    before = get_run(client, run, headers=get_headers)
    response = post_continue(client, run, tools, **kwargs)
    body = response.json
    assert (response.status_code, body["error_code"]) == (status, code), body
    if detail is not None:
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
    approval_id = run["tools"][0]["approval_id"]
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
        (400, INVALID_TOOLS + "tools must be a JSON array of tool objects", "BAD_REQUEST",
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
    body = refused(client, run, 400, None, "BAD_REQUEST", tools)
    assert body["detail"].startswith(INVALID_TOOLS)
    assert names in body["detail"]
    finish(client, run)
