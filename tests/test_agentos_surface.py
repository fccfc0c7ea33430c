"""The rest of the AgentOS surface (contract section 11) in process: CORS, /config, agents,
teams and workflows, requirements, empty values, the reference's scopes, idempotent create,
and the three corrections (whole-history `/events`, untruncated run events, approvals).

Agno's own client against a live gunicorn is in `test_agno_client.py`.
"""

from __future__ import annotations

import json

import pytest

from app.cors import DEFAULT_ORIGINS
from tests.test_approvals import assert_error, bearer, make_token
from tests.test_streams import parse

EXTRA_ORIGIN = "http://127.0.0.1:3000"
REFUSED_ORIGIN = "https://evil.example"
HS_SECRET = "surface-test-hs256-secret-long-enough-0123456789"
JWT_CONFIG = {"JWT_VERIFICATION_KEY": HS_SECRET, "JWT_ALGORITHM": "HS256"}


def create(client, agent_id: str = "chat-agent", headers=None, **form) -> dict:
    answer = client.post(f"/agents/{agent_id}/runs", headers=headers,
                         data={"message": "hi", "stream": "false", **form})
    assert answer.status_code == 200, answer.json
    return answer.json


def token(sub: str, *scopes: str) -> dict[str, str]:
    return bearer(make_token(HS_SECRET, sub, list(scopes)))


# -- CORS --------------------------------------------------------------------------------------


def _preflight(client, path: str, origin: str):
    return client.open(path, method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


@pytest.mark.parametrize("app_config", [{"OS_SECURITY_KEY": "sk-cors",
                                         "CORS_ORIGINS": f" {EXTRA_ORIGIN}/ ,"}], ids=["key"])
@pytest.mark.parametrize("origin", [*DEFAULT_ORIGINS, EXTRA_ORIGIN])
def test_allowed_origins_get_preflights_and_headers_even_on_errors(client, origin):
    for path in ("/agents/chat-agent/runs", "/approvals/x/resolve", "/config", "/sessions"):
        answer = _preflight(client, path, origin)
        assert answer.status_code in (200, 404), path
        assert answer.headers["Access-Control-Allow-Origin"] == origin
        assert answer.headers["Access-Control-Allow-Credentials"] == "true"
        assert "authorization" in answer.headers["Access-Control-Allow-Headers"].lower()
    answer = _preflight(client, "/agents/chat-agent/runs", origin)
    assert answer.status_code == 200
    assert "POST" in answer.headers["Access-Control-Allow-Methods"]
    for response, status in ((client.get("/agents", headers={"Origin": origin}), 401),
                             (client.get("/no/such/route", headers={"Origin": origin}), 404),
                             (client.put("/agents", headers={"Origin": origin}), 405),
                             (client.get("/health", headers={"Origin": origin}), 200)):
        assert response.status_code == status
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in response.headers["Vary"]


def test_other_origins_get_no_cors_headers(client):
    preflight = _preflight(client, "/agents/chat-agent/runs", REFUSED_ORIGIN)
    actual = client.get("/agents", headers={"Origin": REFUSED_ORIGIN})
    assert actual.status_code == 200
    for answer in (preflight, actual):
        assert not [h for h in answer.headers.keys() if h.startswith("Access-Control-")]


# -- /config, agents, teams, workflows, other routers -----------------------------------------


def test_config_names_the_agents_and_the_one_database(client):
    body = client.get("/config").json
    db_id = body["databases"][0]
    assert body["os_id"] and body["databases"] == [db_id]
    assert [a["id"] for a in body["agents"]][:2] == ["chat-agent", "confirm-agent"]
    assert all(a["db_id"] == db_id for a in body["agents"])
    assert (body["teams"], body["workflows"], body["interfaces"]) == ([], [], [])
    assert body["session"]["dbs"][0]["db_id"] == db_id
    assert client.get("/agents/chat-agent").json["db_id"] == db_id


def test_agent_tools_are_nested_with_their_flags(client):
    agent = client.get("/agents/approval-agent").json
    assert agent["model"] == {"name": "ScriptedModel", "model": "scripted-model",
                              "provider": "Scripted"}
    (deploy,) = agent["tools"]["tools"]
    assert (deploy["name"], deploy["requires_approval"], deploy["requires_confirmation"]) == (
        "deploy_app", True, True)


def test_teams_and_workflows_are_empty_and_other_routers_are_the_json_404(client):
    assert client.get("/teams").json == []
    assert client.get("/workflows").json == []
    for path in ("/memories", "/knowledge/content", "/eval-runs", "/traces", "/metrics/x",
                 "/teams/t1", "/workflows/w1/runs", "/models"):
        assert_error(client.get(path), 404, "Not Found", "NOT_FOUND")


# -- requirements ------------------------------------------------------------------------------


def test_a_paused_run_lists_one_requirement_per_waiting_call(client):
    run = create(client, "multi-agent", message="x")
    assert run["status"] == "PAUSED"
    ids = [r["tool_execution"]["tool_call_id"] for r in run["requirements"]]
    assert ids == [t["tool_call_id"] for t in run["tools"]]
    paused = run["events"][-1]
    assert paused["event"] == "RunPaused"
    assert paused["requirements"] == run["requirements"]
    url = f"/agents/multi-agent/runs/{run['run_id']}"
    assert client.get(url).json["requirements"] == run["requirements"]
    tools = [dict(run["tools"][0], confirmed=True), dict(run["tools"][1], result="sunny")]
    again = client.post(f"{url}/continue", data={"tools": json.dumps(tools), "stream": "false"})
    (deploy,) = again.json["requirements"]
    assert deploy["tool_execution"]["tool_name"] == "deploy_app"


def test_user_input_requirement_carries_its_schema(client):
    run = create(client, "input-agent", message="Paris")
    (requirement,) = run["requirements"]
    assert requirement["user_input_schema"] == run["tools"][0]["user_input_schema"]


# -- empty values, scopes ----------------------------------------------------------------------


def test_empty_form_and_query_values_mean_absent(client):
    run = create(client, session_id="", user_id="")
    assert run["session_id"] and "user_id" not in run
    url = f"/agents/chat-agent/runs/{run['run_id']}"
    assert client.get(f"{url}?session_id=").status_code == 200
    listed = client.get("/agents/chat-agent/runs?session_id=&user_id=&status=&limit=&page=")
    assert listed.status_code == 200 and [r["run_id"] for r in listed.json] == [run["run_id"]]
    assert client.get("/approvals?user_id=&limit=").json["meta"]["limit"] == 100
    assert_error(client.post("/agents/chat-agent/runs", data={"message": ""}), 422,
                 "Validation error", "VALIDATION_ERROR")


@pytest.mark.parametrize("app_config", [JWT_CONFIG], ids=["jwt"])
def test_the_references_own_scopes_are_accepted(client):
    admin = token("root", "agent_os:admin")
    run = create(client, headers=token("u1", "agents:run"))
    assert client.get(f"/agents/chat-agent/runs/{run['run_id']}", headers=admin).status_code == 200
    assert client.get("/config", headers=token("u1", "system:read")).status_code == 200
    assert_error(client.get("/config", headers=token("u1", "agents:read")), 403,
                 "Missing required scope: system:read", "FORBIDDEN")
    assert client.get("/teams", headers=token("u1")).status_code == 200


# -- idempotent create -------------------------------------------------------------------------


def test_a_create_retried_with_its_key_replays_the_first_run(client):
    key = {"Idempotency-Key": "create-1"}
    first = create(client, "confirm-agent", headers=key)
    again = create(client, "confirm-agent", headers=key)
    assert again["run_id"] == first["run_id"]
    assert [r["run_id"] for r in client.get("/agents/confirm-agent/runs").json] == [
        first["run_id"]]
    streamed = client.post("/agents/confirm-agent/runs", headers=key,
                           data={"message": "hi", "stream": "false"})
    assert streamed.json["run_id"] == first["run_id"]
    assert_error(client.post("/agents/confirm-agent/runs", headers=key,
                             data={"message": "other", "stream": "false"}), 422,
                 "Idempotency-Key was already used with a different request", "VALIDATION_ERROR")
    other = create(client, "confirm-agent", headers={"Idempotency-Key": "create-2"})
    assert other["run_id"] != first["run_id"]


def test_a_streamed_create_retried_with_its_key_replays_the_same_stream(client):
    key = {"Idempotency-Key": "create-stream"}
    first = client.post("/agents/chat-agent/runs", headers=key, data={"message": "hi"})
    again = client.post("/agents/chat-agent/runs", headers=key, data={"message": "hi"})
    assert first.get_data(as_text=True) == again.get_data(as_text=True)
    assert parse(first.get_data(as_text=True))[-1].event == "RunCompleted"


@pytest.mark.parametrize("app_config", [JWT_CONFIG], ids=["jwt"])
def test_two_users_with_the_same_key_get_two_runs(client):
    key = "shared-key"
    mine = create(client, headers={**token("u1", "agents:run"), "Idempotency-Key": key})
    theirs = create(client, headers={**token("u2", "agents:run"), "Idempotency-Key": key})
    assert mine["run_id"] != theirs["run_id"]
    assert theirs["user_id"] == "u2"


# -- the corrections ---------------------------------------------------------------------------


def test_a_replay_from_zero_spans_every_pause_and_the_run_object_is_whole(client):
    run = create(client, "multi-agent", message="x")
    url = f"/agents/multi-agent/runs/{run['run_id']}"
    tools = [dict(run["tools"][0], confirmed=True), dict(run["tools"][1], result="sunny")]
    paused = client.post(f"{url}/continue", data={"tools": json.dumps(tools), "stream": "false"})
    deploy = paused.json["tools"][-1]
    done = client.post(f"{url}/continue", data={"stream": "false", "tools": json.dumps(
        [dict(deploy, confirmed=True)])})
    assert done.status_code == 403  # the admin approval is pending
    approval = client.post(f"/approvals/{deploy['approval_id']}/resolve",
                           json={"status": "approved"})
    assert approval.status_code == 200
    done = client.post(f"{url}/continue", data={"stream": "false"})
    assert done.json["status"] == "COMPLETED"
    frames = parse(client.get(f"{url}/events").get_data(as_text=True))
    assert [f.id for f in frames] == list(range(1, len(done.json["events"]) + 1))
    assert [f.event for f in frames].count("RunPaused") == 2
    assert frames[-1].event == "RunCompleted"
    assert [f.data for f in frames] == done.json["events"]


def test_a_run_with_more_than_a_thousand_events_shows_them_all(client, store):
    run = create(client, "confirm-agent")
    stored = store.get_run(run["run_id"])
    from statemachine.store import Commit

    filler = [dict(run["events"][-1], event="RunContent", content=".") for _ in range(1100)]
    store.commit(Commit(run_id=stored.run_id, expected_version=stored.version,
                        state=stored.state, doc=stored.doc, now=stored.updated_at,
                        events=filler, paused_at=stored.paused_at))
    body = client.get(f"/agents/confirm-agent/runs/{run['run_id']}").json
    assert len(body["events"]) == len(run["events"]) + 1100
    listed = client.get("/agents/confirm-agent/runs").json[0]
    assert len(listed["events"]) == len(body["events"])
