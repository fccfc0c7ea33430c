"""A worker's clean stop loses no run, and a frozen Redis costs one request deadline.

Live gunicorn with the shipped settings (gevent) on a private Redis for each test, so freezing
or killing things never touches another test's server.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from statemachine.redis_store import RedisRunStore
from statemachine.states import RunState
from tests.servers import Gunicorn, RedisServer, no_redis, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    try:
        server = RedisServer().start()
    except FileNotFoundError:
        no_redis("Shutdown and deadline")
    yield server
    os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def _serve(redis_server: RedisServer, workers: int = 1, **env: str) -> tuple[Gunicorn, str]:
    prefix = f"stop{time.monotonic_ns()}"
    base = {"REDIS_URL": redis_server.url, "REDIS_KEY_PREFIX": prefix,
            "AGENTOS_AGENTS": "tests.load_agents:agents"}
    return Gunicorn({**base, **env}, workers=workers).start(), prefix


def _events(lines: Iterator[bytes], seen: list[dict]) -> None:
    for line in lines:
        if line.startswith(b"data: "):
            seen.append(json.loads(line[6:]))


def test_sigterm_during_a_long_tool_ends_the_run_with_worker_shutdown(redis_server):
    # A 2 s lease outlives the 4 s grace only if it is renewed while the tool blocks.
    server, prefix = _serve(redis_server, GUNICORN_GRACEFUL_TIMEOUT="4",
                            LONG_TOOL_SECONDS="60", RUN_LEASE_SECONDS="2")
    store = RedisRunStore(redis_server.url, prefix=prefix)
    try:
        paused = requests.post(f"{server.url}/agents/confirm-agent/runs", timeout=5,
                               data={"message": "keep", "stream": "false"}).json()
        before = store.get_run(paused["run_id"])
        keepalive = requests.Session()
        assert keepalive.get(f"{server.url}/health", timeout=5).status_code == 200
        answer = requests.post(f"{server.url}/agents/long-tool-agent/runs", stream=True,
                               data={"message": "go"}, timeout=30)
        seen: list[dict] = []
        reader = threading.Thread(target=_events, args=(answer.iter_lines(), seen),
                                  daemon=True)
        reader.start()
        wait_until(lambda: any(e["event"] == "ToolCallStarted" for e in seen), 10,
                   what="the long tool to start")
        run_id = seen[0]["run_id"]
        probe = time.monotonic()
        assert keepalive.get(f"{server.url}/health", timeout=5).status_code == 200
        assert time.monotonic() - probe < 1.0, "a blocking tool must not freeze its worker"
        stopped_at = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        time.sleep(0.5)
        refused = keepalive.post(f"{server.url}/agents/chat-agent/runs", timeout=5,
                                 data={"message": "late", "stream": "false"})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        reader.join(15)
        assert seen[-1]["event"] == "RunError" and seen[-1]["error_type"] == "WorkerShutdown"
        assert "shut down" in seen[-1]["content"]
        server.process.wait(15)
        assert time.monotonic() - stopped_at < 4 + 3
        run = store.get_run(run_id)
        assert run.state is RunState.ERRORED and run.lease_owner is None
        after = store.get_run(paused["run_id"])
        assert (after.state, after.version) == (RunState.PAUSED, before.version)
        assert store.runs_with_lapsed_lease(time.time() + 3600) == []
        assert run_id in server.log()
        # the signal handler starts the stop without blocking gevent's loop: nothing raised
        assert "Traceback" not in server.log(), server.log()
    finally:
        store.close()
        server.stop()


def test_frozen_redis_answers_every_request_within_the_deadline(redis_server):
    server, _ = _serve(redis_server, workers=2, STORE_TIMEOUT_SECONDS="2")
    try:
        paused = [[requests.post(f"{server.url}/agents/confirm-agent/runs", timeout=5,
                                 data={"message": f"m{i}", "stream": "false"}).json()["run_id"]
                   for i in range(6)] for _ in range(8)]
        reads = [runs[0] for runs in paused]
        outcomes: list[tuple[str, int, float]] = []
        stop = threading.Event()

        def client(index: int) -> None:
            session = requests.Session()
            while not stop.is_set():
                for what, call in _requests(server.url, paused[index], reads[index]):
                    if what == "continue" and not paused[index]:
                        continue
                    started = time.monotonic()
                    status = call(session).status_code
                    outcomes.append((what, status, time.monotonic() - started))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        time.sleep(5)
        os.kill(redis_server.process.pid, signal.SIGCONT)
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(15)
        assert {status for _, status, _ in outcomes} <= {200, 503}
        assert any(status == 503 for _, status, _ in outcomes)
        what, status, slowest = max(outcomes, key=lambda outcome: outcome[2])
        assert slowest < 2 + 1, f"an answer ({what}, {status}) took {slowest:.2f}s"
    finally:
        server.stop()


def _requests(url: str, run_ids: list[str], run_id: str):
    """One round of reads and writes; a continue takes a paused run of its own (never 409)."""
    tools = json.dumps([{"tool_call_id": "call_1_1", "confirmed": True}])

    def continue_one(s: requests.Session) -> requests.Response:
        return s.post(f"{url}/agents/confirm-agent/runs/{run_ids.pop()}/continue",
                      data={"tools": tools, "stream": "false"}, timeout=10)

    return [
        ("get", lambda s: s.get(f"{url}/agents/confirm-agent/runs/{run_id}", timeout=10)),
        ("list", lambda s: s.get(f"{url}/agents/confirm-agent/runs?limit=5", timeout=10)),
        ("create", lambda s: s.post(f"{url}/agents/chat-agent/runs", timeout=10,
                                    data={"message": "x", "stream": "false"})),
        ("continue", continue_one),
        ("deep health", lambda s: s.get(f"{url}/health?deep=1", timeout=10)),
    ]


def test_instances_on_one_host_never_share_a_control_socket(tmp_path):
    quiet = Gunicorn({"AGENTOS_DB": str(tmp_path / "a.db"), "LOG_LEVEL": "debug"},
                     workers=1).start()
    own = Gunicorn({"AGENTOS_DB": str(tmp_path / "b.db"),
                    "GUNICORN_CONTROL_SOCKET": str(tmp_path / "b.ctl")}, workers=1).start()
    try:
        assert "Control socket disabled" in quiet.log()
        wait_until(lambda: (tmp_path / "b.ctl").is_socket(), 5, what="b's own control socket")
    finally:
        quiet.stop()
        own.stop()
