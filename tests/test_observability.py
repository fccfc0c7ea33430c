"""Request ids, the request log, lifecycle logs and /metrics: in-process and under gunicorn."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import Counter

import pytest
import requests

from app import create_app
from statemachine.redis_store import RedisRunStore
from statemachine.sqlite_store import SqliteRunStore
from tests.servers import Gunicorn, RedisServer, no_redis, wait_until


def test_a_sane_request_id_is_taken_and_echoed_and_any_other_is_replaced(client):
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers[
        "X-Request-ID"] == "abc-123"
    made = client.get("/health", headers={"X-Request-ID": "bad id\u00e9" * 3}).headers[
        "X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert client.get("/nowhere").headers["X-Request-ID"]


def test_one_request_line_per_request_with_route_status_and_ids(client, caplog):
    caplog.set_level(logging.INFO, logger="app")
    answer = client.post("/agents/chat-agent/runs", data={"message": "hi", "stream": "false"},
                         headers={"X-Request-ID": "req-create"})
    created = answer.get_json()
    answer.close()
    client.get(f"/agents/chat-agent/runs/{created['run_id']}",
               headers={"X-Request-ID": "req-read"}).close()
    lines = [r for r in caplog.records if r.name == "app.requests"]
    by_id = {r.request_id: r for r in lines}
    assert len(lines) == 2 and set(by_id) == {"req-create", "req-read"}
    assert by_id["req-create"].run_id == created["run_id"]
    read = by_id["req-read"]
    assert (read.method, read.route, read.status, read.agent_id, read.run_id) == (
        "GET", "/agents/<agent_id>/runs/<run_id>", 200, "chat-agent", created["run_id"])
    assert read.duration_ms >= 0
    ended = [r for r in caplog.records if r.name == "app.lifecycle"
             and getattr(r, "run_id", None) == created["run_id"]]
    assert [r.event for r in ended] == ["RunCompleted"]  # tied to the request by its run id


def test_a_lapsed_lease_settled_is_logged_and_counted_as_a_failure(app, client, store, caplog):
    from tests.test_store_contract import new_run

    caplog.set_level(logging.INFO, logger="app")
    run = new_run(agent_id="chat-agent", lease_owner="a-worker-that-died",
                  lease_until=time.time() - 1)
    run.doc.update(messages=[], tools=[], input={"input_content": "x"})
    store.create_run(run, [])
    answer = client.get(f"/agents/chat-agent/runs/{run.run_id}")
    assert answer.get_json()["status"] == "ERROR"
    answer.close()
    [line] = [r for r in caplog.records if r.name == "app.lifecycle"
              and getattr(r, "run_id", None) == run.run_id]
    assert line.getMessage() == "run errored: lapsed lease settled"
    assert (line.event, line.reason) == ("RunError", "WorkerLost")


@pytest.mark.parametrize("app_config", [{"METRICS_REQUIRE_AUTH": "1",
                                         "OS_SECURITY_KEY": "k"}])
def test_metrics_can_require_the_security_key(client):
    assert client.get("/metrics").status_code == 401
    answer = client.get("/metrics", headers={"Authorization": "Bearer k"})
    assert answer.status_code == 200
    assert "agentos_paused_runs" in answer.get_data(as_text=True)


def test_metrics_are_open_by_default_and_count_paused_runs(client):
    client.post("/agents/confirm-agent/runs", data={"message": "x", "stream": "false"})
    text = client.get("/metrics").get_data(as_text=True)
    assert re.search(r"^agentos_paused_runs 1\.0$", text, re.M)
    assert re.search(r"^agentos_pending_approvals 0\.0$", text, re.M)


@pytest.mark.slow
def test_a_store_outage_is_logged_once_when_seen_and_once_when_recovered(caplog, tmp_path):
    try:
        server = RedisServer().start()
    except FileNotFoundError:
        no_redis("Store outage log")
    store = RedisRunStore(server.url, prefix=f"t-{uuid.uuid4().hex[:8]}", socket_timeout=0.5)
    app = create_app({"STORE": store})
    client = app.test_client()
    caplog.set_level(logging.INFO, logger="app")
    try:
        assert client.get("/health?deep=1").status_code == 200
        server.halt()
        assert client.get("/health?deep=1").status_code == 503
        assert client.get("/health?deep=1").status_code == 503
        server.start()
        wait_until(lambda: client.get("/health?deep=1").status_code == 200, 10,
                   what="the store to answer again")
        text = client.get("/metrics").get_data(as_text=True)
    finally:
        app.extensions["agentos"].executor.shutdown()
        store.close()
        server.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "app.lifecycle"]
    assert len([m for m in said if m.startswith("store outage seen")]) == 1
    assert len([m for m in said if m.startswith("store recovered")]) == 1
    assert re.search(r'^agentos_store_errors_total\{operation="ping"\} [1-9]', text, re.M)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_under_load_one_json_log_line_per_request_and_counters_that_add_up(tmp_path):
    server = Gunicorn(env={"AGENTOS_DB": str(tmp_path / "runs.db"), "LOG_FORMAT": "json"},
                      workers=2).start()
    sent: Counter = Counter()
    try:
        with requests.Session() as http:
            for i in range(40):
                kind = ("create", "agents", "missing", "read")[i % 4]
                headers = {"X-Request-ID": f"load-{i}"}
                if kind == "create":
                    answer = http.post(f"{server.url}/agents/chat-agent/runs", headers=headers,
                                       data={"message": "hi", "stream": "false"}, timeout=10)
                elif kind == "agents":
                    answer = http.get(f"{server.url}/agents", headers=headers, timeout=10)
                elif kind == "missing":
                    answer = http.get(f"{server.url}/no/such/page", headers=headers, timeout=10)
                else:
                    answer = http.get(f"{server.url}/agents/chat-agent/runs", headers=headers,
                                      timeout=10)
                assert answer.headers["X-Request-ID"] == f"load-{i}"
                sent[kind] += 1
            lines = wait_until(lambda: _request_lines(server, 40), 10, what="40 log lines")
            text = http.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()
    assert Counter(line["request_id"] for line in lines) == {f"load-{i}": 1 for i in range(40)}
    assert all({"method", "route", "status", "duration_ms"} <= set(line) for line in lines)
    runs = "/agents/<agent_id>/runs"
    assert metric(text, "agentos_http_requests_total", method="POST", route=runs,
                  status="200") == sent["create"]
    assert metric(text, "agentos_http_requests_total", method="GET", route=runs) == sent["read"]
    assert metric(text, "agentos_http_requests_total", route="/agents") == sent["agents"]
    assert metric(text, "agentos_http_requests_total", route="<unmatched>",
                  status="404") == sent["missing"]
    assert metric(text, "agentos_http_request_duration_seconds_count", route=runs) == \
        sent["create"] + sent["read"]
    assert metric(text, "agentos_run_transitions_total", trigger="complete") == sent["create"]


def _request_lines(server: Gunicorn, at_least: int) -> list[dict] | None:
    lines = []
    for raw in server.log().splitlines():
        if raw.startswith("{"):
            line = json.loads(raw)
            if line.get("logger") == "app.requests" and \
                    str(line.get("request_id", "")).startswith("load-"):
                lines.append(line)
    return lines if len(lines) >= at_least else None


def test_the_console_and_its_assets_need_no_credentials_and_come_from_this_server(tmp_path):
    store = SqliteRunStore(str(tmp_path / "runs.db"))
    app = create_app({"STORE": store, "OS_SECURITY_KEY": "k", "OS_ADMIN_KEY": "a"})
    client = app.test_client()
    try:
        page = client.get("/console")
        assert page.status_code == 200 and page.content_type.startswith("text/html")
        html = page.get_data(as_text=True)
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and all(url.startswith("/static/") for url in assets)
        for url in assets:
            answer = client.get(url)
            assert answer.status_code == 200 and answer.get_data(), url
            answer.close()
        # the page holds no data: everything it shows comes from API calls that need the key
        assert client.get("/approvals").status_code == 401
    finally:
        app.extensions["agentos"].executor.shutdown()
        store.close()
