"""Create, read, list and cancel runs; agents, health, root; the error shape; the run object.

Contract sections 1, 3, 5.2 to 5.7, on both stores.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import pytest

from app import create_app
from app.runtime.agent import Agent
from app.runtime.demo import book_flight, demo_agents, deploy_app, get_weather, send_email
from app.runtime.models.scripted import PlannedCall, ScriptedModel
from statemachine.redis_store import RedisRunStore
from tests.contract import TOOL_KEYS
from tests.servers import free_port

KEY = "runs-test-key"
RUN_KEYS = {
    "run_id", "agent_id", "agent_name", "session_id", "user_id", "status", "content",
    "content_type", "model", "model_provider", "created_at", "updated_at", "input", "messages",
    "tools", "events", "metrics", "session_state",
}
AGENT_TOOL_KEYS = {"name", "description", "parameters", "requires_confirmation",
                   "requires_user_input", "external_execution", "requires_approval"}
PAUSE_ARGS = {
    "send_email": {"to": "a@example.com", "subject": "hi"},
    "get_weather": {"city": "Oslo"},
    "book_flight": {"destination": "Oslo"},
    "deploy_app": {"app": "web"},
}


def _calls_named_in_message(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
    """First turn: call every tool the user's message names, at once; then answer."""
    if any(m["role"] == "tool" for m in messages):
        return "ok"
    names = next(m["content"] for m in messages if m["role"] == "user").split()
    return [PlannedCall(name, PAUSE_ARGS[name]) for name in names]


@pytest.fixture
def app_config() -> dict:
    pause_agent = Agent(id="pause-agent", model=ScriptedModel(_calls_named_in_message),
                        tools=[send_email, get_weather, book_flight, deploy_app])
    return {"AGENTS": [*demo_agents(), pause_agent]}


def create(client, agent_id: str = "chat-agent", message: str = "hi", **fields) -> dict:
    response = client.post(f"/agents/{agent_id}/runs",
                           data={"message": message, "stream": "false", **fields})
    assert response.status_code == 200, response.json
    return response.json


def run_url(run: dict, suffix: str = "") -> str:
    return f"/agents/{run['agent_id']}/runs/{run['run_id']}{suffix}"


def cancel(client, run: dict):
    return client.post(run_url(run, "/cancel"))


def confirm(client, run: dict) -> dict:
    tools = [dict(run["tools"][0], confirmed=True)]
    response = client.post(run_url(run, "/continue"),
                           data={"tools": json.dumps(tools), "stream": "false"})
    assert response.status_code == 200, response.json
    return response.json


def assert_error(response, status: int, detail: str, code: str) -> None:
    assert response.status_code == status
    assert response.json == {"detail": detail, "error_code": code}


def nulls_outside_tool_objects(value: Any, path: str = "") -> list[str]:
    """Paths of null values, not looking inside tool objects (where nulls are kept)."""
    if isinstance(value, dict):
        if "tool_call_id" in value and "tool_args" in value:
            return []
        return [p for k, v in value.items()
                for p in ([f"{path}.{k}"] if v is None else nulls_outside_tool_objects(
                    v, f"{path}.{k}"))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in nulls_outside_tool_objects(
            v, f"{path}[{i}]")]
    return []


# -- 5.2 create -------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [{}, {"message": ""}, {"stream": "false"}],
                         ids=["missing", "empty", "only-stream"])
def test_a_message_is_required(client, data):
    response = client.post("/agents/chat-agent/runs", data=data)
    assert response.status_code == 422
    body = response.json
    assert (body["detail"], body["error_code"]) == ("Validation error", "VALIDATION_ERROR")
    assert list(body["errors"]) == ["message"]


def test_a_run_id_field_is_ignored(client):
    first = create(client, message="first")
    second = create(client, message="second", run_id=first["run_id"])
    assert second["run_id"] != first["run_id"]
    assert uuid.UUID(second["run_id"])
    again = client.get(run_url(first)).json
    assert (again["content"], again["input"]) == ("Echo: first", {"input_content": "first"})


def test_a_session_id_is_generated_when_absent(client):
    generated = create(client)["session_id"]
    assert uuid.UUID(generated).version == 4
    assert create(client, session_id="my-session")["session_id"] == "my-session"


def test_creating_a_run_of_an_unknown_agent_is_a_404(client):
    response = client.post("/agents/no-such-agent/runs", data={"message": "hi"})
    assert_error(response, 404, "Agent not found", "NOT_FOUND")


def test_form_booleans(client):
    for words, content_type in [(("true", "TRUE", "1", "Yes", "on"), "text/event-stream"),
                                (("false", "False", "0", "no", "OFF"), "application/json")]:
        for word in words:
            response = client.post("/agents/chat-agent/runs",
                                   data={"message": "hi", "stream": word})
            assert (response.status_code, response.mimetype) == (200, content_type), word
            response.close()


@pytest.mark.parametrize("word", ["maybe", "2", "t r u e"])
def test_other_booleans_are_a_422(client, word):
    response = client.post("/agents/chat-agent/runs", data={"message": "hi", "stream": word})
    assert response.status_code == 422
    assert response.json["errors"] == {"stream": ["Not a valid boolean."]}


# -- 5.3 read and list ------------------------------------------------------------------------


def test_get_a_run_with_or_without_its_session(client):
    run = create(client, session_id="s-1")
    assert client.get(run_url(run)).json == run
    assert client.get(run_url(run), query_string={"session_id": "s-1"}).json == run
    assert_error(client.get(run_url(run), query_string={"session_id": "s-2"}), 404,
                 "Run not found", "NOT_FOUND")


@pytest.mark.parametrize("url", ["/agents/chat-agent/runs/no-such-run",
                                 "/agents/no-such-agent/runs/no-such-run"])
def test_get_an_unknown_run_is_a_404(client, url):
    assert_error(client.get(url), 404, "Run not found", "NOT_FOUND")


def test_a_run_is_not_found_under_another_agent(client):
    run = create(client)
    assert_error(client.get(f"/agents/confirm-agent/runs/{run['run_id']}"), 404,
                 "Run not found", "NOT_FOUND")


def test_list_runs_newest_first_with_filters(client):
    paused = create(client, "confirm-agent", session_id="s-1", user_id="u-1")
    completed = confirm(client, create(client, "confirm-agent", session_id="s-1",
                                       user_id="u-2"))
    cancelled = create(client, "confirm-agent", session_id="s-2", user_id="u-1")
    assert cancel(client, cancelled).status_code == 200
    create(client, "chat-agent", session_id="s-1", user_id="u-1")  # another agent's run
    cases = [
        ({}, [cancelled, completed, paused]),
        ({"session_id": "s-1"}, [completed, paused]),
        ({"user_id": "u-1"}, [cancelled, paused]),
        ({"session_id": "s-1", "user_id": "u-1"}, [paused]),
        ({"status": "PAUSED"}, [paused]),
        ({"status": "COMPLETED"}, [completed]),
        ({"status": "CANCELLED"}, [cancelled]),
        ({"status": "RUNNING"}, []),
        ({"limit": 2}, [cancelled, completed]),
        ({"limit": 2, "page": 2}, [paused]),
        ({"limit": 2, "page": 3}, []),
        ({"limit": 1000, "page": 1}, [cancelled, completed, paused]),
    ]
    for query, expected in cases:
        response = client.get("/agents/confirm-agent/runs", query_string=query)
        assert response.status_code == 200, query
        assert [r["run_id"] for r in response.json] == [r["run_id"] for r in expected], query
        assert all(set(r) == RUN_KEYS | ({"requirements"} if r["status"] == "PAUSED" else set())
                   for r in response.json)


@pytest.mark.parametrize("query", [{"limit": 0}, {"limit": 1001}, {"page": 0},
                                   {"limit": "ten"}, {"status": "ERRORED"}],
                         ids=["limit-0", "limit-1001", "page-0", "limit-text", "status"])
def test_list_runs_out_of_range_is_a_422(client, query):
    response = client.get("/agents/confirm-agent/runs", query_string=query)
    assert response.status_code == 422
    assert response.json["error_code"] == "VALIDATION_ERROR"
    assert list(response.json["errors"]) == list(query)


def test_list_runs_of_an_unknown_agent_is_a_404(client):
    assert_error(client.get("/agents/no-such-agent/runs"), 404, "Agent not found", "NOT_FOUND")


# -- 5.4 cancel -------------------------------------------------------------------------------


def test_cancel_a_paused_run(client):
    run = create(client, "confirm-agent")
    response = cancel(client, run)
    assert (response.status_code, response.json) == (200, {})
    cancelled = client.get(run_url(run)).json
    assert cancelled["status"] == "CANCELLED"
    assert cancelled["events"][-1]["event"] == "RunCancelled"
    assert cancelled["events"][-1]["reason"] == "cancelled by client"
    response = cancel(client, run)
    assert response.status_code == 409
    assert (response.json["detail"], response.json["error_code"]) == (
        "run is already cancelled", "CONFLICT")


def test_cancel_a_completed_run_is_a_409(client):
    run = create(client)
    response = cancel(client, run)
    assert response.status_code == 409
    assert (response.json["detail"], response.json["error_code"]) == (
        "run is already completed", "CONFLICT")
    assert client.get(run_url(run)).json == run


def test_cancel_an_unknown_run_is_a_404(client):
    assert_error(client.post("/agents/chat-agent/runs/no-such-run/cancel"), 404,
                 "Run not found", "NOT_FOUND")


# -- 5.6 agents, health, root -----------------------------------------------------------------


def test_list_agents(client):
    agents = client.get("/agents").json
    assert [a["id"] for a in agents] == ["chat-agent", "confirm-agent", "external-agent",
                                         "input-agent", "approval-agent", "multi-agent",
                                         "pause-agent"]
    for agent in agents:
        assert set(agent) - {"description"} == {"id", "name", "db_id", "model", "tools"}
        assert set(agent["tools"]) == {"tools"}
        assert all(set(tool) == AGENT_TOOL_KEYS for tool in agent["tools"]["tools"])
        assert set(agent["model"]) == {"name", "model", "provider"}
    deploy = next(a for a in agents if a["id"] == "approval-agent")["tools"]["tools"][0]
    assert deploy["name"] == "deploy_app"
    assert (deploy["requires_confirmation"], deploy["requires_approval"]) == (True, True)
    assert deploy["parameters"] == {"type": "object", "properties": {"app": {"type": "string"}},
                                    "required": ["app"]}
    book = next(a for a in agents if a["id"] == "input-agent")["tools"]["tools"][0]
    assert (book["requires_user_input"], book["requires_confirmation"]) == (True, False)


def test_get_one_agent(client):
    agents = client.get("/agents").json
    assert client.get("/agents/external-agent").json == agents[2]
    assert_error(client.get("/agents/no-such-agent"), 404, "Agent not found", "NOT_FOUND")


@pytest.mark.parametrize("query", ["", "?deep=1"])
def test_health(client, query):
    response = client.get(f"/health{query}")
    assert response.status_code == 200
    assert set(response.json) == {"status", "instantiated_at"}
    assert response.json["status"] == "ok"
    assert datetime.fromisoformat(response.json["instantiated_at"])


def test_deep_health_is_a_503_when_the_store_is_unreachable():
    store = RedisRunStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5)
    app = create_app({"STORE": store})
    try:
        client = app.test_client()
        assert client.get("/health").status_code == 200
        response = client.get("/health?deep=1")
        assert response.status_code == 503
        assert response.json["error_code"] == "SERVICE_UNAVAILABLE"
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)
        store.close()


def test_root(client):
    body = client.get("/").json
    assert set(body) == {"name", "id", "version"}
    assert body["name"] == "AgentOS API"
    assert all(isinstance(value, str) and value for value in body.values())


@pytest.mark.parametrize("app_config", [{"OS_SECURITY_KEY": KEY}], ids=["security-key"])
def test_root_and_health_need_no_credentials(client):
    assert client.get("/").status_code == 200
    assert client.get("/health").status_code == 200
    assert_error(client.get("/agents"), 401, "Authorization header required", "UNAUTHENTICATED")
    assert client.get("/agents", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# -- section 1: the error shape ---------------------------------------------------------------


@pytest.mark.parametrize("url", ["/nope", "/agents/chat-agent/runs/x/y/z", "/approvalz"])
def test_an_unknown_route_is_a_404_in_the_error_shape(client, url):
    assert_error(client.get(url), 404, "Not Found", "NOT_FOUND")


@pytest.mark.parametrize(("method", "url", "allowed"), [
    ("delete", "/agents", {"GET"}),
    ("post", "/health", {"GET"}),
    ("get", "/agents/chat-agent/runs/x/continue", {"POST"}),
    ("put", "/agents/chat-agent/runs", {"GET", "POST"}),
])
def test_a_wrong_method_is_a_405_in_the_error_shape(client, method, url, allowed):
    response = getattr(client, method)(url)
    assert_error(response, 405, "Method Not Allowed", "METHOD_NOT_ALLOWED")
    assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}


def test_a_500_never_carries_a_trace(app):
    def explode():
        raise RuntimeError("secret-token-123 in /srv/app/views.py line 7")

    app.add_url_rule("/explode", view_func=explode)
    response = app.test_client().get("/explode")
    assert_error(response, 500, "Internal server error", "INTERNAL_SERVER_ERROR")
    text = response.get_data(as_text=True)
    assert "secret" not in text and "Traceback" not in text and ".py" not in text


# -- 5.7 and 3: the run object and the tool object --------------------------------------------


def test_the_run_object(client):
    run = create(client, "confirm-agent", message="hello", user_id="u-1")
    assert set(run) == RUN_KEYS | {"requirements"}
    (requirement,) = run["requirements"]
    assert set(requirement) == {"id", "created_at", "tool_execution"}
    assert requirement["tool_execution"] == run["tools"][0]
    assert datetime.fromisoformat(requirement["created_at"])
    assert (run["agent_id"], run["agent_name"], run["user_id"]) == (
        "confirm-agent", "confirm-agent", "u-1")
    assert (run["content_type"], run["model"], run["model_provider"]) == (
        "str", "scripted-model", "Scripted")
    assert run["input"] == {"input_content": "hello"}
    assert run["session_state"] == {}
    assert all(isinstance(run[k], int) for k in ("created_at", "updated_at"))
    assert run["updated_at"] >= run["created_at"]
    assert [m["role"] for m in run["messages"]] == ["user", "assistant"]
    assert run["messages"][0] == {"role": "user", "content": "hello",
                                  "created_at": run["messages"][0]["created_at"]}
    assert run["messages"][1]["tool_calls"] == [{
        "id": "call_1_1", "name": "send_email",
        "arguments": {"to": "a@example.com", "subject": "hello"}}]
    assert [e["event"] for e in run["events"]][0] == "RunStarted"
    assert nulls_outside_tool_objects(run) == []


def test_null_keys_are_dropped_outside_tool_objects(client):
    run = create(client)
    assert set(run) == RUN_KEYS - {"user_id"}
    assert run["tools"] == []
    assert nulls_outside_tool_objects(run) == []


def test_the_tool_object_has_every_key(client):
    run = create(client, "confirm-agent", message="hello")
    tool = run["tools"][0]
    assert set(tool) == TOOL_KEYS
    assert tool == {
        "tool_call_id": "call_1_1", "tool_name": "send_email",
        "tool_args": {"to": "a@example.com", "subject": "hello"}, "tool_call_error": None,
        "result": None, "metrics": None, "child_run_id": None, "stop_after_tool_call": False,
        "created_at": tool["created_at"], "requires_confirmation": True, "confirmed": None,
        "confirmation_note": None, "requires_user_input": None, "user_input_schema": None,
        "user_feedback_schema": None, "answered": None, "external_execution_required": None,
        "external_execution_silent": None, "approval_type": None, "approval_id": None,
    }
    done = confirm(client, run)
    assert set(done["tools"][0]) == TOOL_KEYS
    tool_message = done["messages"][2]
    assert set(tool_message) == {"role", "content", "tool_call_id", "tool_name",
                                 "tool_call_error", "created_at"}
    assert (tool_message["role"], tool_message["tool_call_error"]) == ("tool", False)


@pytest.mark.parametrize(("tools", "sentence"), [
    ("send_email", "I need confirmation."),
    ("deploy_app", "I need confirmation."),
    ("book_flight", "I need user input."),
    ("get_weather", "it needs external execution."),
    ("send_email book_flight", "I need confirmation or user input."),
    ("deploy_app get_weather", "I need confirmation or external execution."),
    ("get_weather book_flight", "I need user input or external execution."),
    ("get_weather send_email book_flight", "I need confirmation, user input or external "
                                           "execution."),
])
def test_the_pause_content_names_every_kind_paused_now(client, tools, sentence):
    run = create(client, "pause-agent", message=tools)
    assert run["status"] == "PAUSED"
    assert run["content"] == f"I have tools to execute, but {sentence}"
    assert [t["tool_name"] for t in run["tools"]] == tools.split()
    assert all(set(t) == TOOL_KEYS for t in run["tools"])
