"""Runs that survive: real gunicorn processes, real sockets, a real Redis that goes away.

Each test starts its own servers, so nothing here depends on (or disturbs) a shared Redis.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import requests

from statemachine.redis_store import RedisRunStore
from tests.servers import Gunicorn, RedisServer, no_redis, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    try:
        server = RedisServer(persistent=True).start()
    except FileNotFoundError:
        no_redis("Redis failure")
    yield server
    server.stop()


@pytest.fixture
def serve():
    servers: list[Gunicorn] = []

    def start(env: dict[str, str], workers: int = 2) -> Gunicorn:
        server = Gunicorn(env={"SWEEP_INTERVAL_SECONDS": "0.5", **env}, workers=workers)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def create_paused(base: str, agent: str = "confirm-agent") -> dict:
    answer = requests.post(f"{base}/agents/{agent}/runs",
                           data={"message": "hi", "stream": "false"}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "PAUSED"
    return answer.json()


def confirm(run: dict) -> str:
    return json.dumps([{"tool_call_id": run["tools"][0]["tool_call_id"], "confirmed": True}])


def read_events(response: requests.Response) -> Iterator[tuple[int, str, dict]]:
    """Parse an SSE body as it arrives: (id, event, data) per event, pings skipped."""
    block: dict[str, str] = {}
    for line in response.iter_lines(decode_unicode=True):
        if line:
            if not line.startswith(":"):
                name, _, value = line.partition(": ")
                block[name] = value
            continue
        if "id" in block:
            yield int(block["id"]), block["event"], json.loads(block["data"])
        block = {}


def run_status(base: str, run: dict) -> str:
    answer = requests.get(f"{base}/agents/{run['agent_id']}/runs/{run['run_id']}", timeout=10)
    return answer.json()["status"]


def test_client_disconnect_does_not_stop_the_run(serve, tmp_path):
    server = serve({"AGENTOS_DB": str(tmp_path / "runs.db"), "DEMO_TOOL_LATENCY_MS": "1500"})
    run = create_paused(server.url)
    url = f"{server.url}/agents/confirm-agent/runs/{run['run_id']}/continue"
    with requests.post(url, data={"tools": confirm(run), "stream": "true"}, stream=True,
                       timeout=10) as answer:
        location = answer.headers["Location"]
        seen, name, _ = next(read_events(answer))
        assert name == "RunContinued"
    wait_until(lambda: run_status(server.url, run) == "COMPLETED", timeout=15,
               what="the run to complete without its client")
    with requests.get(f"{server.url}{location.split('?')[0]}",
                      headers={"Last-Event-ID": str(seen)}, stream=True, timeout=10) as rest:
        events = list(read_events(rest))
    assert [e[0] for e in events] == list(range(seen + 1, seen + 1 + len(events)))
    assert events[0][1] == "ToolCallStarted"
    assert events[-1][1] == "RunCompleted"
    assert events[-1][2]["content"] == "Done: sent to a@example.com"


def test_killed_worker_leaves_an_errored_run_and_is_replaced(serve, redis_server):
    prefix = "agentos-kill"
    server = serve({"REDIS_URL": redis_server.url, "REDIS_KEY_PREFIX": prefix,
                    "RUN_LEASE_SECONDS": "2", "DEMO_TOOL_LATENCY_MS": "4000"})
    doomed, bystander = create_paused(server.url), create_paused(server.url)
    url = f"{server.url}/agents/confirm-agent/runs/{doomed['run_id']}/continue"
    store = RedisRunStore(redis_server.url, prefix=prefix)
    try:
        with requests.post(url, data={"tools": confirm(doomed), "stream": "true"},
                           stream=True, timeout=10) as answer:
            events = read_events(answer)
            assert next(events)[1] == "RunContinued"
            assert next(events)[1] == "ToolCallStarted"
            owner_pid = int(store.get_run(doomed["run_id"]).lease_owner.split(":")[1])
            os.kill(owner_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: run_status(server.url, doomed) == "ERROR", timeout=8,
                   what="the lost run to be moved to ERROR")
        assert time.monotonic() - killed_at < 2 + 4
    finally:
        store.close()
    final = requests.get(f"{server.url}/agents/confirm-agent/runs/{doomed['run_id']}",
                         timeout=10).json()
    assert "lost" in final["content"]
    assert final["events"][-1]["event"] == "RunError"
    wait_until(lambda: len(server.worker_pids()) == 2 and owner_pid not in
               server.worker_pids(), timeout=20, what="gunicorn to replace the worker")
    url = f"{server.url}/agents/confirm-agent/runs/{bystander['run_id']}/continue"
    finished = requests.post(url, data={"tools": confirm(bystander), "stream": "false"},
                             timeout=20)
    assert finished.status_code == 200
    assert finished.json()["status"] == "COMPLETED"


def _load(base: str, paused: list[dict], stop: threading.Event, statuses: Counter,
          lock: threading.Lock) -> None:
    """Reads, creates and continues in a loop; records every status or transport failure."""
    session = requests.Session()
    step = 0
    while not stop.is_set():
        step += 1
        run_url = f"{base}/agents/confirm-agent/runs/{paused[step % len(paused)]['run_id']}"
        calls = [
            lambda: session.get(run_url, timeout=10),  # noqa: B023 - called at once
            lambda: session.post(f"{base}/agents/chat-agent/runs",
                                 data={"message": "x", "stream": "false"}, timeout=10),
            lambda: session.get(f"{base}/health?deep=1", timeout=10),
        ]
        try:
            code = calls[step % len(calls)]().status_code
        except requests.RequestException as exc:
            code = type(exc).__name__
        with lock:
            statuses[code] += 1
    session.close()


def test_redis_outage_answers_503_and_recovers_without_losing_runs(serve, redis_server):
    server = serve({"REDIS_URL": redis_server.url, "REDIS_KEY_PREFIX": "agentos-outage",
                    "STORE_TIMEOUT_SECONDS": "2"})
    paused = [create_paused(server.url) for _ in range(10)]
    stop, lock, statuses = threading.Event(), threading.Lock(), Counter()
    threads = [threading.Thread(target=_load, args=(server.url, paused, stop, statuses, lock))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    redis_server.halt()
    probe = requests.get(f"{server.url}/health?deep=1", timeout=10)  # seen whatever the load
    time.sleep(2.0)
    redis_server.start()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert probe.status_code == 503 and probe.json()["error_code"] == "SERVICE_UNAVAILABLE"
    assert set(statuses) <= {200, 503}, statuses
    for run in paused:
        assert run_status(server.url, run) == "PAUSED"
    url = f"{server.url}/agents/confirm-agent/runs/{paused[0]['run_id']}/continue"
    done = requests.post(url, data={"tools": confirm(paused[0]), "stream": "false"}, timeout=20)
    assert done.status_code == 200 and done.json()["status"] == "COMPLETED"
