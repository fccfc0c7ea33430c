"""Sessions over HTTP (contract section 11), on both stores: made by runs and by POST,
listed, paged, sorted, filtered, renamed, patched, and deleted with their runs; ownership in
JWT mode; one pass through a live gunicorn on Redis.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import jwt
import pytest
import requests

from app.runtime.agent import Agent
from app.runtime.demo import demo_agents, send_email
from app.runtime.models.scripted import PlannedCall, ScriptedModel
from statemachine.store import Commit
from tests.servers import Gunicorn, wait_until

SECRET = "sessions-test-secret-of-at-least-32-bytes"
SESSION_KEYS = {"session_id", "session_name", "session_state", "created_at", "updated_at"}
META_KEYS = {"page", "limit", "total_pages", "total_count", "search_time_ms"}
HOLD_SECONDS = 20


def _held(gate: threading.Event):
    """A model turn that waits for `gate` (bounded), so the run stays executing."""

    def script(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
        assert gate.wait(HOLD_SECONDS), "the test never opened the gate"
        return "held done"

    return script


@pytest.fixture
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture
def app_config(gate: threading.Event) -> dict:
    held = Agent(id="held-agent", model=ScriptedModel(_held(gate)), tools=[send_email])
    return {"AGENTS": [*demo_agents(), held]}


@pytest.fixture
def held(gate: threading.Event, app):
    yield gate
    gate.set()


def run(client, agent_id: str = "chat-agent", message: str = "hello", headers=None,
        **fields) -> dict:
    response = client.post(f"/agents/{agent_id}/runs", headers=headers,
                           data={"message": message, "stream": "false", **fields})
    assert response.status_code == 200, response.json
    return response.json


def new_session(client, headers=None, **body) -> dict:
    response = client.post("/sessions", json=body, headers=headers)
    assert response.status_code == 201, response.json
    return response.json


def listed(client, query: str = "", headers=None) -> dict:
    response = client.get(f"/sessions{query}", headers=headers)
    assert response.status_code == 200, response.json
    return response.json


def ids(page: dict) -> list[str]:
    return [s["session_id"] for s in page["data"]]


# -- made by runs -----------------------------------------------------------------------------


def test_the_first_run_makes_the_session_and_names_it(client):
    first = run(client, message="What tools do you have?")
    second = run(client, message="And now?", session_id=first["session_id"])
    page = listed(client)
    assert ids(page) == [first["session_id"]]
    item = page["data"][0]
    assert set(item) == SESSION_KEYS
    assert item["session_name"] == "What tools do you have?"
    assert item["created_at"].endswith("Z") and item["session_state"] == {}
    assert set(page["meta"]) == META_KEYS and page["meta"]["total_count"] == 1

    detail = client.get(f"/sessions/{first['session_id']}").json
    assert detail["agent_session_id"] == detail["session_id"] == first["session_id"]
    assert detail["agent_id"] == "chat-agent"
    assert [m["content"] for m in detail["chat_history"]] == [
        "What tools do you have?", "Echo: What tools do you have?", "And now?",
        "Echo: And now?"]
    assert detail["total_tokens"] == detail["metrics"]["total_tokens"] > 0

    runs = client.get(f"/sessions/{first['session_id']}/runs").json
    assert [r["run_id"] for r in runs] == [first["run_id"], second["run_id"]]
    assert runs[0]["run_input"] == "What tools do you have?"
    assert runs[0]["status"] == "COMPLETED" and runs[0]["content"].startswith("Echo:")
    assert runs[0]["run_response_format"] == "text"
    assert runs[0]["events"][0]["event"] == "RunStarted"
    one = client.get(f"/sessions/{first['session_id']}/runs/{second['run_id']}").json
    assert one["run_id"] == second["run_id"] and one["run_input"] == "And now?"


def test_a_run_of_another_session_is_not_found_through_this_one(client):
    a, b = run(client), run(client)
    answer = client.get(f"/sessions/{a['session_id']}/runs/{b['run_id']}")
    assert answer.status_code == 404 and answer.json["detail"] == "Run not found"
    answer = client.get("/sessions/nope/runs")
    assert answer.status_code == 404 and answer.json == {"detail": "Session not found",
                                                         "error_code": "NOT_FOUND"}


def test_a_run_joins_a_session_made_by_post(client):
    session = new_session(client, session_id="chat-1", agent_id="chat-agent")
    assert session["session_name"] == ""
    run(client, message="first words", session_id="chat-1")
    assert client.get("/sessions/chat-1").json["session_name"] == "first words"
    named = new_session(client, session_name="Mine")
    run(client, message="ignored for the name", session_id=named["session_id"])
    assert client.get(f"/sessions/{named['session_id']}").json["session_name"] == "Mine"


# -- listing ----------------------------------------------------------------------------------


def test_paging_and_sorting(client):
    made = [new_session(client, session_name=f"s{i}")["session_id"] for i in range(5)]
    newest_first = made[::-1]
    pages = [listed(client, f"?limit=2&page={p}") for p in (1, 2, 3, 4)]
    assert [ids(p) for p in pages] == [newest_first[:2], newest_first[2:4], newest_first[4:], []]
    assert pages[0]["meta"] == {**pages[0]["meta"], "page": 1, "limit": 2, "total_pages": 3,
                                "total_count": 5}
    assert ids(listed(client, "?sort_order=asc")) == made
    client.post(f"/sessions/{made[0]}/rename", json={"session_name": "touched"})
    assert ids(listed(client, "?sort_by=updated_at"))[0] == made[0]
    assert ids(listed(client, "?sort_by=updated_at&sort_order=asc"))[-1] == made[0]
    assert ids(listed(client, "?sort_by=created_at"))[-1] == made[0]


def test_filters(client):
    a = new_session(client, session_name="Trip to Oslo", agent_id="chat-agent",
                    user_id="u1")["session_id"]
    b = new_session(client, session_name="Budget", agent_id="confirm-agent",
                    user_id="u1")["session_id"]
    c = new_session(client, session_name="oslo again", agent_id="chat-agent",
                    user_id="u2")["session_id"]
    assert set(ids(listed(client, "?component_id=chat-agent"))) == {a, c}
    assert set(ids(listed(client, "?user_id=u1"))) == {a, b}
    assert ids(listed(client, "?user_id=u1&component_id=chat-agent")) == [a]
    by_name = listed(client, "?session_name=OSLO")
    assert set(ids(by_name)) == {a, c} and by_name["meta"]["total_count"] == 2
    assert ids(listed(client, "?session_name=oslo&limit=1&sort_order=asc")) == [a]
    assert listed(client, "?type=team")["data"] == []
    assert len(ids(listed(client, "?user_id=&component_id=&session_name="))) == 3
    assert listed(client, "?db_id=agentos-db")["meta"]["total_count"] == 3
    assert client.get("/sessions?db_id=other").status_code == 404


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "page=0", "sort_by=name",
                                   "sort_order=up", "type=crew", "limit=x"])
def test_bad_listing_queries_are_422(client, query):
    answer = client.get(f"/sessions?{query}")
    assert answer.status_code == 422, answer.json
    assert answer.json["error_code"] == "VALIDATION_ERROR"


def test_limit_1000_is_allowed(client):
    new_session(client)
    assert listed(client, "?limit=1000")["meta"]["limit"] == 1000


# -- create, rename, patch --------------------------------------------------------------------


def test_create_refuses_what_it_cannot_keep(client):
    new_session(client, session_id="taken")
    answer = client.post("/sessions", json={"session_id": "taken"})
    assert answer.status_code == 409 and answer.json["error_code"] == "CONFLICT"
    for body in ({"session_id": "a/b"}, {"session_state": [1]}, {"session_name": ""}, [1]):
        answer = client.post("/sessions", json=body)
        assert answer.status_code == 422, (body, answer.json)
    assert client.post("/sessions", json={"agent_id": "nobody"}).status_code == 404
    assert client.post("/sessions?type=team", json={}).status_code == 422
    empty = client.post("/sessions")
    assert empty.status_code == 201 and empty.json["session_name"] == ""
    assert listed(client)["meta"]["total_count"] == 2


def test_rename_and_patch(client):
    sid = run(client, message="original")["session_id"]
    renamed = client.post(f"/sessions/{sid}/rename", json={"session_name": "New name"})
    assert renamed.status_code == 200 and renamed.json["session_name"] == "New name"
    patched = client.patch(f"/sessions/{sid}", json={"session_state": {"step": 2},
                                                      "metadata": {"tag": "x"}})
    assert patched.status_code == 200
    assert patched.json["session_state"] == {"step": 2}
    assert patched.json["metadata"] == {"tag": "x"}
    assert patched.json["session_name"] == "New name"
    again = client.patch(f"/sessions/{sid}", json={"session_name": "Third"}).json
    assert again["session_state"] == {"step": 2} and again["session_name"] == "Third"
    assert listed(client)["data"][0]["session_state"] == {"step": 2}
    assert client.post(f"/sessions/{sid}/rename", json={}).status_code == 422
    assert client.post(f"/sessions/{sid}/rename", json={"session_name": ""}).status_code == 422
    assert client.patch(f"/sessions/{sid}", json={"summary": {"s": 1}}).status_code == 422
    assert client.patch("/sessions/missing", json={}).status_code == 404
    assert client.post("/sessions/missing/rename",
                       json={"session_name": "x"}).status_code == 404


# -- delete -----------------------------------------------------------------------------------


def test_delete_cancels_a_paused_run_and_expires_its_approval(client):
    paused = run(client, "approval-agent", "web")
    assert paused["status"] == "PAUSED"
    approval_id = paused["tools"][0]["approval_id"]
    assert client.get(f"/approvals/{approval_id}").json["status"] == "pending"
    done = run(client, message="also here", session_id=paused["session_id"])
    answer = client.delete(f"/sessions/{paused['session_id']}")
    assert answer.status_code == 204 and answer.data == b""
    for r in (paused, done):
        assert client.get(f"/agents/{r['agent_id']}/runs/{r['run_id']}").status_code == 404
    approval = client.get(f"/approvals/{approval_id}").json
    assert approval["status"] == "expired" and approval["run_status"] is None
    assert client.get("/approvals/count").json == {"count": 0}
    assert client.get(f"/sessions/{paused['session_id']}").status_code == 404
    assert listed(client)["data"] == []
    assert client.delete(f"/sessions/{paused['session_id']}").status_code == 404


def test_delete_with_a_run_executing_is_409_and_changes_nothing(client, held):
    paused = run(client, "confirm-agent", "hi")
    executing = client.post("/agents/held-agent/runs", data={
        "message": "wait", "stream": "true", "session_id": paused["session_id"]})
    assert executing.status_code == 200
    answer = client.delete(f"/sessions/{paused['session_id']}")
    assert answer.status_code == 409 and answer.json["error_code"] == "CONFLICT"
    again = client.delete("/sessions", json={"session_ids": [paused["session_id"]]})
    assert again.status_code == 409
    still = client.get(f"/agents/confirm-agent/runs/{paused['run_id']}").json
    assert still["status"] == "PAUSED"
    held.set()
    runs = client.get(f"/sessions/{paused['session_id']}/runs").json
    wait_until(lambda: client.get(f"/agents/held-agent/runs/{runs[-1]['run_id']}").json[
        "status"] == "COMPLETED", 10, what="the held run to finish")
    assert client.delete(f"/sessions/{paused['session_id']}").status_code == 204


def test_delete_many(client):
    keep = new_session(client)["session_id"]
    gone = [run(client)["session_id"], new_session(client)["session_id"]]
    answer = client.delete("/sessions", json={"session_ids": [*gone, "unknown"],
                                              "session_types": ["agent"] * 3})
    assert answer.status_code == 204
    assert ids(listed(client)) == [keep]
    for body in ({}, {"session_ids": []}, {"session_ids": ["a"], "session_types": []}):
        assert client.delete("/sessions", json=body).status_code == 422


# -- ownership (JWT) --------------------------------------------------------------------------


def token(sub: str, scopes: list[str]) -> dict:
    claims = {"sub": sub, "scopes": scopes, "exp": int(time.time()) + 600}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


USER = ["agents:run", "agents:read", "sessions:read", "sessions:write", "sessions:delete"]


@pytest.mark.parametrize("app_config", [{"JWT_VERIFICATION_KEY": SECRET,
                                         "JWT_ALGORITHM": "HS256"}])
def test_a_user_sees_and_deletes_only_its_own_sessions(client):
    alice, bob, boss = token("alice", USER), token("bob", USER), token("boss", ["admin"])
    mine = run(client, headers=alice, message="alice's")["session_id"]
    made = new_session(client, headers=alice, user_id="bob")
    assert made["user_id"] == "alice"
    assert set(ids(listed(client, headers=alice))) == {mine, made["session_id"]}
    assert listed(client, headers=bob)["data"] == []
    assert listed(client, "?user_id=alice", headers=bob)["data"] == []
    assert len(ids(listed(client, headers=boss))) == 2
    for method, path in (("get", f"/sessions/{mine}"), ("get", f"/sessions/{mine}/runs"),
                         ("patch", f"/sessions/{mine}"), ("delete", f"/sessions/{mine}"),
                         ("post", f"/sessions/{mine}/rename")):
        answer = getattr(client, method)(path, headers=bob, json={"session_name": "x"})
        assert answer.status_code == 404, (method, path, answer.json)
    assert client.get(f"/sessions/{mine}?user_id=bob", headers=alice).status_code == 404
    assert client.delete("/sessions", json={"session_ids": [mine]},
                         headers=bob).status_code == 204
    answer = client.post("/agents/chat-agent/runs", headers=bob,
                         data={"message": "join", "stream": "false", "session_id": mine})
    assert answer.status_code == 409
    assert len(client.get(f"/sessions/{mine}/runs", headers=alice).json) == 1
    reader = token("carol", ["sessions:read"])
    assert client.post("/sessions", json={}, headers=reader).status_code == 403
    assert client.delete(f"/sessions/{mine}", headers=reader).status_code == 403
    assert client.get("/sessions", headers=token("dave", ["agents:read"])).status_code == 403
    assert client.delete(f"/sessions/{mine}", headers=alice).status_code == 204


# -- live gunicorn on Redis -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.redis
def test_sessions_through_gunicorn_on_redis(redis_url, redis_prefix):
    server = Gunicorn(env={"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": redis_prefix},
                      workers=2, threads=4)
    server.start()
    try:
        base = server.url
        paused = requests.post(f"{base}/agents/approval-agent/runs", timeout=10,
                               data={"message": "site", "stream": "false"}).json()
        sid = paused["session_id"]
        for i in range(3):
            requests.post(f"{base}/agents/chat-agent/runs", timeout=10,
                          data={"message": f"m{i}", "stream": "false", "session_id": sid})
        page = requests.get(f"{base}/sessions", params={"component_id": "approval-agent"},
                            timeout=10).json()
        assert ids(page) == [sid] and page["data"][0]["session_name"] == "site"
        runs = requests.get(f"{base}/sessions/{sid}/runs", timeout=10).json()
        assert [r["run_input"] for r in runs] == ["site", "m0", "m1", "m2"]
        assert requests.delete(f"{base}/sessions/{sid}", timeout=10).status_code == 204
        approval = requests.get(f"{base}/approvals/{paused['tools'][0]['approval_id']}",
                                timeout=10).json()
        assert approval["status"] == "expired"
        assert requests.get(f"{base}/sessions", timeout=10).json()["data"] == []
    finally:
        server.stop()


def test_every_session_route_is_in_the_document(app, client):
    document = client.get("/openapi.json").json
    routes = {(rule.rule.replace("<", "{").replace(">", "}"), method.lower())
              for rule in app.url_map.iter_rules() if rule.rule.startswith("/sessions")
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes and all(method in document["paths"].get(path, {})
                          for path, method in routes), routes
    ops = {op["operationId"] for path, item in document["paths"].items()
           if path.startswith("/sessions") for op in item.values()}
    assert ops == {"get_sessions", "create_session", "delete_sessions", "get_session_by_id",
                   "update_session", "delete_session", "rename_session", "get_session_runs",
                   "get_session_run"}


def test_session_runs_take_the_reference_time_window(client):
    first = run(client)
    sid = first["session_id"]
    run(client, session_id=sid)
    now = int(time.time())
    assert len(client.get(f"/sessions/{sid}/runs?created_after={now - 60}").json) == 2
    assert client.get(f"/sessions/{sid}/runs?created_after={now + 60}").json == []
    assert client.get(f"/sessions/{sid}/runs?created_before={now - 60}").json == []
    assert client.get(f"/sessions/{sid}/runs?created_before=x").status_code == 422


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_a_session_run_shows_every_event(client, store):
    made = run(client)
    stored = store.get_run(made["run_id"])
    filler = [{"event": "RunContent", "content": "x"} for _ in range(1100)]
    store.commit(Commit(run_id=stored.run_id, expected_version=stored.version,
                        state=stored.state, doc=stored.doc, now=time.time(), events=filler,
                        retain_seconds=3600))
    one = client.get(f"/sessions/{made['session_id']}/runs/{made['run_id']}").json
    assert len(one["events"]) == stored.last_seq + 1100
    assert len(client.get(f"/sessions/{made['session_id']}/runs").json[0]["events"]) == len(
        one["events"])
