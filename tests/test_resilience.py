"""Expiry, idempotent retries, cancel of an executing run and retention, on both stores."""

from __future__ import annotations

import json
import time

import pytest

from tests.indexes import index_mentions
from tests.servers import wait_until


@pytest.fixture
def app_config() -> dict:
    return {"PAUSE_TTL_SECONDS": 1, "SWEEP_INTERVAL_SECONDS": 0.2, "RUN_RETENTION_SECONDS": 1}


def create(client, agent: str, message: str = "hi") -> dict:
    answer = client.post(f"/agents/{agent}/runs", data={"message": message, "stream": "false"})
    assert answer.status_code == 200, answer.json
    return answer.json


def confirm_tools(run: dict, confirmed: bool = True) -> str:
    return json.dumps([{"tool_call_id": run["tools"][0]["tool_call_id"], "confirmed": confirmed}])


def get_run(client, agent: str, run_id: str):
    return client.get(f"/agents/{agent}/runs/{run_id}")


def event_names(client, run_id: str) -> list[str]:
    run = get_run(client, "confirm-agent", run_id).json
    return [e["event"] for e in run["events"]]


def sse_events(body: str) -> list[tuple[int, str, dict]]:
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "id" in lines:
            events.append((int(lines["id"]), lines["event"], json.loads(lines["data"])))
    return events


def test_pause_expires_into_cancelled(client):
    run = create(client, "approval-agent")
    approval_id = run["tools"][0]["approval_id"]
    expired = wait_until(
        lambda: (r := get_run(client, "approval-agent", run["run_id"]).json)["status"]
        == "CANCELLED" and r, timeout=10, what="the pause to expire")
    last = expired["events"][-1]
    assert last["event"] == "RunCancelled" and last["reason"] == "pause expired"
    resolve = client.post(f"/approvals/{approval_id}/resolve", json={"status": "approved"})
    assert resolve.status_code == 409
    assert resolve.json["detail"] == "Approval is already 'expired' and cannot be resolved"
    assert client.get("/approvals/count").json == {"count": 0}


def test_same_key_same_body_replays_the_first_outcome(client):
    run = create(client, "confirm-agent")
    url = f"/agents/confirm-agent/runs/{run['run_id']}/continue"
    form = {"tools": confirm_tools(run), "stream": "false"}
    headers = {"Idempotency-Key": "retry-1"}
    first = client.post(url, data=form, headers=headers)
    second = client.post(url, data=form, headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.json == first.json
    assert client.post(url, data=form).status_code == 409


def test_same_key_replays_the_same_stream_from_its_start(client):
    run = create(client, "confirm-agent")
    url = f"/agents/confirm-agent/runs/{run['run_id']}/continue"
    form = {"tools": confirm_tools(run), "stream": "true"}
    headers = {"Idempotency-Key": "retry-stream"}
    first = client.post(url, data=form, headers=headers).get_data(as_text=True)
    second = client.post(url, data=form, headers=headers).get_data(as_text=True)
    assert sse_events(first)[0][1] == "RunContinued"
    assert sse_events(second) == sse_events(first)


def test_same_key_with_another_body_is_422(client):
    run = create(client, "confirm-agent")
    url = f"/agents/confirm-agent/runs/{run['run_id']}/continue"
    headers = {"Idempotency-Key": "retry-2"}
    assert client.post(url, data={"tools": confirm_tools(run), "stream": "false"},
                       headers=headers).status_code == 200
    other = client.post(url, data={"tools": confirm_tools(run, False), "stream": "false"},
                        headers=headers)
    assert other.status_code == 422
    assert other.json["error_code"] == "VALIDATION_ERROR"
    assert "Idempotency-Key" in other.json["errors"]


def test_cancel_stops_an_executing_run_at_its_next_step(client, monkeypatch, tmp_path):
    log = tmp_path / "tools.log"
    monkeypatch.setenv("DEMO_TOOL_LOG", str(log))
    monkeypatch.setenv("DEMO_TOOL_LATENCY_MS", "600")
    run = create(client, "confirm-agent")
    url = f"/agents/confirm-agent/runs/{run['run_id']}/continue"
    answer = client.post(url, data={"tools": confirm_tools(run), "stream": "true"})
    assert answer.status_code == 200
    wait_until(lambda: "ToolCallStarted" in event_names(client, run["run_id"]), timeout=5,
               what="the tool to start")
    cancel = client.post(f"/agents/confirm-agent/runs/{run['run_id']}/cancel")
    assert cancel.status_code == 200 and cancel.json == {}
    events = sse_events(answer.get_data(as_text=True))
    assert events[-1][1] == "RunCancelled"
    wait_until(lambda: log.exists(), timeout=5, what="the tool to finish")
    time.sleep(0.2)
    final = get_run(client, "confirm-agent", run["run_id"]).json
    assert final["status"] == "CANCELLED"
    assert [e["event"] for e in final["events"]][-1] == "RunCancelled"
    assert "ToolCallCompleted" not in [e["event"] for e in final["events"]]
    again = client.post(f"/agents/confirm-agent/runs/{run['run_id']}/cancel")
    assert again.status_code == 409 and again.json["error_code"] == "CONFLICT"
    assert again.json["detail"] == "run is already cancelled"


def test_finished_runs_are_purged_after_retention(app, client):
    run = create(client, "chat-agent")
    assert run["status"] == "COMPLETED"
    wait_until(lambda: get_run(client, "chat-agent", run["run_id"]).status_code == 404,
               timeout=10, what="retention to purge the run")
    store = app.extensions["agentos"].store
    wait_until(lambda: index_mentions(store, run["run_id"]) == [], timeout=10,
               what="retention to remove every index entry of the run")
    assert client.get("/agents/chat-agent/runs").json == []


def test_a_quiet_stream_carries_pings(app, client, monkeypatch):
    app.extensions["agentos"].settings["STREAM_PING_SECONDS"] = 0.2
    monkeypatch.setenv("SCRIPTED_MODEL_LATENCY_MS", "700")
    body = client.post("/agents/chat-agent/runs", data={"message": "slow"}).get_data(as_text=True)
    assert ": ping\n\n" in body
    assert sse_events(body)[-1][1] == "RunCompleted"
