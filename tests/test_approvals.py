"""Admin approvals (contract section 6) through the Flask test client, on both stores.

Open mode unless a test says otherwise. Tool executions are counted through `DEMO_TOOL_LOG`,
so "the tool ran exactly once" and "the tool never ran" are facts, not guesses.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from app.representation import APPROVAL_KEYS
from app.runtime.agent import Agent
from app.runtime.models.scripted import PlannedCall, ScriptedModel, tool_results
from app.runtime.tools import tool

PENDING_DETAIL = "This run requires admin approval before it can be continued"
CONFIRMATION_PAUSE = "I have tools to execute, but I need confirmation."
HS_SECRET = "approvals-test-secret-that-is-long-enough-for-hs256"

# -- helpers shared with tests/test_auth.py -------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_token(key: Any, sub: str | None, scopes: list[str], *, algorithm: str = "HS256",
               expires_in: int | None = 3600, **claims: Any) -> str:
    """A JWT signed with `key`; `expires_in=None` leaves `exp` out."""
    payload: dict[str, Any] = {"scopes": scopes, **claims}
    if sub is not None:
        payload["sub"] = sub
    if expires_in is not None:
        payload["exp"] = int(time.time()) + expires_in
    return jwt.encode(payload, key, algorithm=algorithm)


def create_run(client, agent_id: str = "approval-agent", message: str = "web",
               headers: dict | None = None, **form: str) -> dict:
    """A run created with `stream=false`: the run object once it pauses or ends."""
    answer = client.post(f"/agents/{agent_id}/runs", headers=headers,
                         data={"message": message, "stream": "false", **form})
    assert answer.status_code == 200, answer.json
    return answer.json


def continue_run(client, run: dict, tools: list[dict] | None = None,
                 headers: dict | None = None):
    """A non-stream continue; `tools=None` sends an empty `tools` field."""
    data = {"tools": json.dumps(tools) if tools is not None else "", "stream": "false"}
    return client.post(f"/agents/{run['agent_id']}/runs/{run['run_id']}/continue",
                       data=data, headers=headers)


def get_run(client, run: dict, headers: dict | None = None) -> dict:
    answer = client.get(f"/agents/{run['agent_id']}/runs/{run['run_id']}", headers=headers)
    assert answer.status_code == 200, answer.json
    return answer.json


def resolve(client, approval_id: str, status: str = "approved", headers: dict | None = None,
            **body: Any):
    return client.post(f"/approvals/{approval_id}/resolve", json={"status": status, **body},
                       headers=headers)


def get_approval(client, approval_id: str, headers: dict | None = None) -> dict:
    answer = client.get(f"/approvals/{approval_id}", headers=headers)
    assert answer.status_code == 200, answer.json
    return answer.json


def approval_id_of(run: dict) -> str:
    """The approval of the run's one call waiting for an admin."""
    (call,) = [t for t in run["tools"] if t["approval_type"] == "required"
               and t["requires_confirmation"]]
    return call["approval_id"]


def decided(run: dict, confirmed: bool, **extra: Any) -> list[dict]:
    """The run's paused calls, as a client sends them back with `confirmed` set."""
    return [dict(t, confirmed=confirmed, **extra) for t in run["tools"]
            if t["requires_confirmation"]]


def assert_error(answer, status: int, detail: str, code: str) -> None:
    assert answer.status_code == status, answer.json
    assert answer.json["detail"] == detail
    assert answer.json["error_code"] == code


def read_lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def tool_log_reader(tmp_path, monkeypatch) -> Callable[[], list[str]]:
    """Point DEMO_TOOL_LOG at a fresh file; the reader returns its lines."""
    path = tmp_path / "tools.log"
    monkeypatch.setenv("DEMO_TOOL_LOG", str(path))
    return lambda: read_lines(path)


@pytest.fixture
def tool_log(tmp_path, monkeypatch) -> Callable[[], list[str]]:
    return tool_log_reader(tmp_path, monkeypatch)


@pytest.fixture
def paused(client) -> dict:
    """An approval-agent run paused on deploy_app(app="web"), its approval pending."""
    run = create_run(client)
    assert run["status"] == "PAUSED"
    return run


def deploy_lines(run: dict) -> list[str]:
    (call,) = run["tools"]
    return [f"{run['run_id']} {call['tool_call_id']} deploy_app"]


# -- the pause and the approval object ------------------------------------------------------


def test_pause_stores_a_pending_approval_with_every_key(client, paused):
    assert paused["content"] == CONFIRMATION_PAUSE
    (call,) = paused["tools"]
    assert call["tool_name"] == "deploy_app"
    assert call["requires_confirmation"] is True
    assert call["approval_type"] == "required"
    assert isinstance(call["approval_id"], str) and call["approval_id"]

    listing = client.get("/approvals")
    assert listing.status_code == 200
    assert listing.json["meta"] == {"page": 1, "limit": 100, "total_pages": 1, "total_count": 1}
    (approval,) = listing.json["data"]
    assert list(approval) == list(APPROVAL_KEYS)
    assert approval == {
        "id": call["approval_id"],
        "run_id": paused["run_id"],
        "session_id": paused["session_id"],
        "agent_id": "approval-agent",
        "user_id": None,
        "status": "pending",
        "approval_type": "required",
        "pause_type": "confirmation",
        "tool_name": "deploy_app",
        "tool_args": {"app": "web"},
        "resolution_data": None,
        "resolved_by": None,
        "resolved_at": None,
        "created_at": approval["created_at"],
        "updated_at": approval["updated_at"],
        "run_status": "PAUSED",
    }
    assert isinstance(approval["created_at"], int)
    assert get_approval(client, call["approval_id"]) == approval
    status = client.get(f"/approvals/{call['approval_id']}/status")
    assert status.json == {"approval_id": call["approval_id"], "status": "pending",
                           "run_id": paused["run_id"], "resolved_at": None,
                           "resolved_by": None}


@pytest.mark.parametrize("path", ["/approvals/nope", "/approvals/nope/status"])
def test_unknown_approval_reads_are_404(client, path):
    assert_error(client.get(path), 404, "Approval not found", "NOT_FOUND")


def test_unknown_approval_cannot_be_resolved_or_deleted(client):
    assert_error(resolve(client, "nope"), 404, "Approval not found", "NOT_FOUND")
    assert_error(client.delete("/approvals/nope"), 404, "Approval not found", "NOT_FOUND")


# -- listing, filters, paging, count --------------------------------------------------------


def _ids(answer) -> list[str]:
    assert answer.status_code == 200, answer.json
    return [a["id"] for a in answer.json["data"]]


def test_list_filters_pages_and_orders_newest_first(client):
    runs = [create_run(client, message=f"app{n}", user_id=user, session_id=session)
            for n, (user, session) in enumerate([("u1", "s1"), ("u2", "s2"), ("u1", "s3")])]
    ids = [approval_id_of(run) for run in runs]
    assert resolve(client, ids[1], "rejected").status_code == 200

    assert _ids(client.get("/approvals")) == ids[::-1]
    assert _ids(client.get("/approvals?status=pending")) == [ids[2], ids[0]]
    assert _ids(client.get("/approvals?status=rejected")) == [ids[1]]
    assert _ids(client.get("/approvals?status=approved")) == []
    assert _ids(client.get("/approvals?user_id=u1")) == [ids[2], ids[0]]
    assert _ids(client.get(f"/approvals?run_id={runs[1]['run_id']}")) == [ids[1]]
    assert _ids(client.get("/approvals?session_id=s3")) == [ids[2]]
    assert _ids(client.get("/approvals?agent_id=approval-agent")) == ids[::-1]
    assert _ids(client.get("/approvals?agent_id=chat-agent")) == []
    assert _ids(client.get("/approvals?user_id=u1&session_id=s2")) == []

    first = client.get("/approvals?limit=2&page=1")
    assert first.json["meta"] == {"page": 1, "limit": 2, "total_pages": 2, "total_count": 3}
    assert _ids(first) == [ids[2], ids[1]]
    second = client.get("/approvals?limit=2&page=2")
    assert second.json["meta"] == {"page": 2, "limit": 2, "total_pages": 2, "total_count": 3}
    assert _ids(second) == [ids[0]]
    assert _ids(client.get("/approvals?limit=2&page=3")) == []


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "page=0", "status=maybe"])
def test_list_rejects_bad_query(client, query):
    answer = client.get(f"/approvals?{query}")
    assert_error(answer, 422, "Validation error", "VALIDATION_ERROR")
    assert query.split("=")[0] in answer.json["errors"]


def test_count_pending_approvals(client):
    assert client.get("/approvals/count").json == {"count": 0}
    runs = [create_run(client, user_id=user) for user in ("u1", "u1", "u2")]
    assert client.get("/approvals/count").json == {"count": 3}
    assert client.get("/approvals/count?user_id=u1").json == {"count": 2}
    assert client.get("/approvals/count?user_id=nobody").json == {"count": 0}
    assert resolve(client, approval_id_of(runs[0])).status_code == 200
    assert client.get("/approvals/count").json == {"count": 2}
    assert client.get("/approvals/count?user_id=u1").json == {"count": 1}


# -- resolving ------------------------------------------------------------------------------


def test_approved_then_empty_continue_runs_the_tool_once(client, paused, tool_log):
    approval_id = approval_id_of(paused)
    answer = resolve(client, approval_id)
    assert answer.status_code == 200, answer.json
    assert answer.json["status"] == "approved"
    assert answer.json["resolved_by"] == "anonymous"
    assert isinstance(answer.json["resolved_at"], int)
    assert answer.json["run_status"] == "PAUSED"
    assert tool_log() == []

    done = continue_run(client, paused)
    assert done.status_code == 200, done.json
    assert done.json["status"] == "COMPLETED"
    assert done.json["content"] == "Deployed: deployed web"
    (call,) = done.json["tools"]
    assert call["confirmed"] is True
    assert call["requires_confirmation"] is False
    assert call["result"] == "deployed web"
    assert tool_log() == deploy_lines(paused)
    assert get_approval(client, approval_id)["run_status"] == "COMPLETED"


@pytest.mark.parametrize(("body", "content"), [
    ({"resolution_data": {"note": "no"}}, "Not deployed: no"),
    ({}, "Not deployed: Rejected by an admin"),
])
def test_rejected_then_empty_continue_never_runs_the_tool(client, paused, tool_log, body,
                                                          content):
    approval_id = approval_id_of(paused)
    answer = resolve(client, approval_id, "rejected", **body)
    assert answer.status_code == 200, answer.json
    assert answer.json["status"] == "rejected"
    assert answer.json["resolution_data"] == body.get("resolution_data")

    done = continue_run(client, paused)
    assert done.status_code == 200, done.json
    assert done.json["status"] == "COMPLETED"
    assert done.json["content"] == content
    (call,) = done.json["tools"]
    assert call["confirmed"] is False
    assert call["tool_call_error"] is True
    assert tool_log() == []


@pytest.mark.parametrize("first", ["approved", "rejected"])
def test_second_resolve_is_409(client, paused, first):
    approval_id = approval_id_of(paused)
    assert resolve(client, approval_id, first).status_code == 200
    before = get_approval(client, approval_id)
    for second in ("approved", "rejected"):
        assert_error(resolve(client, approval_id, second), 409,
                     f"Approval is already '{first}' and cannot be resolved", "CONFLICT")
    assert get_approval(client, approval_id) == before


def test_resolve_with_an_unknown_status_is_422(client, paused):
    approval_id = approval_id_of(paused)
    answer = resolve(client, approval_id, "maybe")
    assert_error(answer, 422, "Validation error", "VALIDATION_ERROR")
    assert "status" in answer.json["errors"]
    assert get_approval(client, approval_id)["status"] == "pending"


@pytest.mark.parametrize("body", ['["approved"]', '"approved"', "null", "3", "{not json",
                                  '{"resolution_data": {}}', '{"status": "approved", '
                                  '"resolution_data": "note"}'])
def test_resolve_needs_a_json_object_body(client, paused, body):
    approval_id = approval_id_of(paused)
    answer = client.post(f"/approvals/{approval_id}/resolve", data=body,
                         content_type="application/json")
    assert_error(answer, 422, "Validation error", "VALIDATION_ERROR")
    assert get_approval(client, approval_id)["status"] == "pending"


# -- deleting -------------------------------------------------------------------------------


def test_pending_approval_cannot_be_deleted(client, paused, tool_log):
    approval_id = approval_id_of(paused)
    assert_error(client.delete(f"/approvals/{approval_id}"), 409,
                 "Approval is pending and cannot be deleted", "CONFLICT")
    assert get_approval(client, approval_id)["status"] == "pending"
    for tools in (None, decided(paused, True)):
        assert_error(continue_run(client, paused, tools), 403, PENDING_DETAIL,
                     "APPROVAL_PENDING")
    assert get_run(client, paused)["status"] == "PAUSED"
    assert tool_log() == []


@pytest.mark.parametrize("status, content", [("rejected", "Not deployed: Rejected by an admin"),
                                             ("approved", "Deployed: deployed web")])
def test_resolved_approval_deleted_before_the_continue_is_still_applied(client, paused,
                                                                       status, content):
    approval_id = approval_id_of(paused)
    assert resolve(client, approval_id, status).status_code == 200
    assert client.delete(f"/approvals/{approval_id}").status_code == 204
    assert_error(client.get(f"/approvals/{approval_id}"), 404, "Approval not found",
                 "NOT_FOUND")
    done = continue_run(client, paused, None)
    assert done.status_code == 200
    assert done.json["content"] == content


def test_resolved_approval_can_be_deleted(client, paused):
    approval_id = approval_id_of(paused)
    assert resolve(client, approval_id, "rejected").status_code == 200
    assert continue_run(client, paused, None).status_code == 200
    answer = client.delete(f"/approvals/{approval_id}")
    assert answer.status_code == 204
    assert answer.data == b""
    assert_error(client.get(f"/approvals/{approval_id}"), 404, "Approval not found",
                 "NOT_FOUND")
    assert_error(client.delete(f"/approvals/{approval_id}"), 404, "Approval not found",
                 "NOT_FOUND")
    assert _ids(client.get("/approvals")) == []


# -- the admin's decision wins ---------------------------------------------------------------


@pytest.mark.parametrize(("decision", "client_sends", "content", "runs"), [
    ("rejected", {"confirmed": True}, "Not deployed: Rejected by an admin", False),
    ("approved", {"confirmed": False, "confirmation_note": "client says no"},
     "Deployed: deployed web", True),
])
def test_admin_decision_wins_over_the_client(client, paused, tool_log, decision, client_sends,
                                             content, runs):
    assert resolve(client, approval_id_of(paused), decision).status_code == 200
    tools = [dict(t, **client_sends) for t in paused["tools"]]
    done = continue_run(client, paused, tools)
    assert done.status_code == 200, done.json
    assert done.json["content"] == content
    assert tool_log() == (deploy_lines(paused) if runs else [])


HS_CONFIG = {"JWT_VERIFICATION_KEY": HS_SECRET, "JWT_ALGORITHM": "HS256"}
CAROL = bearer(make_token(HS_SECRET, "carol", ["agents:run", "agents:read", "approvals:read",
                                               "approvals:write"]))


@pytest.mark.parametrize(("app_config", "headers", "resolved_by"), [
    ({}, {}, "anonymous"),
    ({"OS_SECURITY_KEY": "sk-user"}, bearer("sk-user"), "security-key"),
    ({"OS_SECURITY_KEY": "sk-user", "OS_ADMIN_KEY": "sk-admin"}, bearer("sk-admin"),
     "admin-key"),
    (HS_CONFIG, CAROL, "carol"),
], ids=["open", "security-key", "admin-key", "jwt"])
def test_resolved_by_is_the_callers_identity(client, headers, resolved_by):
    run = create_run(client, headers=headers)
    approval_id = approval_id_of(run)
    answer = resolve(client, approval_id, headers=headers, resolved_by="mallory")
    assert answer.status_code == 200, answer.json
    assert answer.json["resolved_by"] == resolved_by
    status = client.get(f"/approvals/{approval_id}/status", headers=headers)
    assert status.json["resolved_by"] == resolved_by
    assert status.json["status"] == "approved"


# -- the approval follows its run -----------------------------------------------------------


def test_run_status_follows_the_run(client, paused):
    approval_id = approval_id_of(paused)
    assert get_approval(client, approval_id)["run_status"] == "PAUSED"
    cancel = client.post(f"/agents/approval-agent/runs/{paused['run_id']}/cancel")
    assert cancel.status_code == 200
    approval = get_approval(client, approval_id)
    assert approval["run_status"] == "CANCELLED"
    assert approval["status"] != "pending"
    assert client.get("/approvals/count").json == {"count": 0}
    assert resolve(client, approval_id).status_code == 409


def test_multi_agent_second_pause_waits_for_the_admin(client, tool_log):
    run = create_run(client, "multi-agent", "berlin")
    assert _ids(client.get(f"/approvals?run_id={run['run_id']}")) == []
    email, weather = run["tools"]
    second = continue_run(client, run, [dict(email, confirmed=True),
                                        dict(weather, result="rainy")])
    assert second.status_code == 200, second.json
    assert second.json["status"] == "PAUSED"
    deploy = second.json["tools"][-1]
    assert deploy["tool_name"] == "deploy_app"
    assert deploy["approval_type"] == "required"
    assert deploy["tool_args"] == {"app": "berlin"}
    assert _ids(client.get(f"/approvals?run_id={run['run_id']}")) == [deploy["approval_id"]]

    assert_error(continue_run(client, run), 403, PENDING_DETAIL, "APPROVAL_PENDING")
    assert resolve(client, deploy["approval_id"]).status_code == 200
    done = continue_run(client, run)
    assert done.status_code == 200, done.json
    assert done.json["status"] == "COMPLETED"
    assert done.json["content"] == "All done"
    assert [line.split()[2] for line in tool_log()] == ["send_email", "deploy_app"]


# -- one pause, one confirmation and one approval -------------------------------------------


@tool(requires_confirmation=True)
def notify(channel: str) -> str:
    """Post a notice (asks for confirmation)."""
    return f"notified {channel}"


@tool(requires_approval=True)
def launch(target: str) -> str:
    """Launch something (an admin must approve)."""
    return f"launched {target}"


def _mixed_script(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
    results = tool_results(messages)
    if not results:
        return [PlannedCall("notify", {"channel": "ops"}),
                PlannedCall("launch", {"target": "moon"})]
    return "Finished: " + ", ".join(results[name]["content"] for name in ("notify", "launch"))


MIXED = {"AGENTS": [Agent(id="mixed-agent", model=ScriptedModel(_mixed_script),
                          tools=[notify, launch])]}


@pytest.mark.parametrize("app_config", [MIXED], ids=["mixed-agent"])
def test_a_pause_with_a_confirmation_and_an_approval(client):
    run = create_run(client, "mixed-agent", "go")
    assert run["status"] == "PAUSED"
    assert run["content"] == CONFIRMATION_PAUSE
    confirm_call, approval_call = run["tools"]
    assert confirm_call["approval_id"] is None
    for tools in (None, decided(run, True), [dict(confirm_call, confirmed=True)]):
        assert_error(continue_run(client, run, tools), 403, PENDING_DETAIL, "APPROVAL_PENDING")

    assert resolve(client, approval_call["approval_id"]).status_code == 200
    assert_error(continue_run(client, run), 400,
                 f"Tool call {confirm_call['tool_call_id']} (notify) requires confirmed true "
                 "or false", "BAD_REQUEST")
    assert get_run(client, run)["status"] == "PAUSED"

    done = continue_run(client, run, [dict(confirm_call, confirmed=True)])
    assert done.status_code == 200, done.json
    assert done.json["status"] == "COMPLETED"
    assert done.json["content"] == "Finished: notified ops, launched moon"
