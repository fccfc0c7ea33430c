"""Many open streams and slow clients on one instance, with the production worker settings.

gunicorn runs `gunicorn.conf.py` as shipped (gevent, 2 workers) on a private Redis. While
hundreds of streams wait on a slow model, or hundreds of uploads trickle in, a second client
probes `/health` and continues other runs: each answer must come within a second.
"""

from __future__ import annotations

import json
import resource
import threading
import time
import urllib.parse
from collections.abc import Iterator

import pytest
import requests

from tests.rawhttp import close_all, connect, pump, ramp, request_bytes
from tests.servers import Gunicorn, RedisServer, no_redis

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def _raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    try:
        server = RedisServer().start()
    except FileNotFoundError:
        no_redis("Capacity")
    yield server
    server.stop()


def serve(redis_server: RedisServer, **env: str) -> Gunicorn:
    """The shipped gunicorn settings (the worker class is not overridden) on Redis."""
    base = {"REDIS_URL": redis_server.url, "REDIS_KEY_PREFIX": f"cap{time.monotonic_ns()}",
            "AGENTOS_AGENTS": "tests.load_agents:agents"}
    return Gunicorn({**base, **env}, workers=2).start()


def paused_runs(url: str, count: int) -> list[str]:
    ids = []
    for index in range(count):
        answer = requests.post(f"{url}/agents/confirm-agent/runs",
                               data={"message": f"m{index}", "stream": "false"}, timeout=10)
        assert answer.json()["status"] == "PAUSED"
        ids.append(answer.json()["run_id"])
    return ids


class SecondClient(threading.Thread):
    """Probes /health and continues paused runs, timing every answer, until stopped."""

    def __init__(self, url: str, run_ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.url, self.run_ids = url, list(run_ids)
        self.health: list[float] = []
        self.continues: list[tuple[int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            started = time.monotonic()
            assert session.get(f"{self.url}/health", timeout=5).status_code == 200
            self.health.append(time.monotonic() - started)
            if self.run_ids:
                self._continue(session, self.run_ids.pop())
            self.stop.wait(0.25)

    def _continue(self, session: requests.Session, run_id: str) -> None:
        started = time.monotonic()
        answer = session.post(
            f"{self.url}/agents/confirm-agent/runs/{run_id}/continue", timeout=5,
            data={"stream": "false",
                  "tools": json.dumps([{"tool_call_id": "call_1_1", "confirmed": True}])})
        status = answer.json()["status"] if answer.status_code == 200 else answer.status_code
        self.continues.append((status, time.monotonic() - started))


def hold_streams(server: Gunicorn, count: int, model_seconds: float, ping: float) -> None:
    """`count` streamed creates on slow-agent, opened at 200 a second, each followed to
    RunCompleted; all of them are open at once for most of the model's think time."""
    _raise_open_files()
    second = SecondClient(server.url, paused_runs(server.url, 5))
    body = urllib.parse.urlencode({"message": "think"}).encode()
    payload = request_bytes("POST", "/agents/slow-agent/runs", body)
    streams: list = []
    second.start()
    try:
        pump(streams, until=lambda xs: all("RunCompleted" in x.events for x in xs),
             timeout=model_seconds + 40, feed=ramp(server.port, payload, count, 200))
    finally:
        second.stop.set()
        second.join(10)
        close_all(streams)
    assert len(streams) == count
    assert [x.status for x in streams] == [200] * count
    assert min(x.pings for x in streams) >= 1, "every stream carries : ping while it waits"
    assert all(x.events[-1] == "RunCompleted" for x in streams)
    last_open = max(x.headers_at for x in streams)
    first_done = min(x.closed_at or float("inf") for x in streams)
    assert last_open < first_done, "every stream was open at the same time"
    assert second.health and max(second.health) < 1.0, max(second.health)
    assert [s for s, _ in second.continues] == ["COMPLETED"] * 5


def test_150_streams_wait_on_a_slow_model_while_health_and_continues_answer(redis_server):
    # Leases of 2 s: the runs complete only if every worker renews its runs' leases meanwhile.
    server = serve(redis_server, SLOW_MODEL_MS="4000", STREAM_PING_SECONDS="1",
                   RUN_LEASE_SECONDS="2")
    try:
        hold_streams(server, 150, model_seconds=4, ping=1)
    finally:
        server.stop()


@pytest.mark.long
def test_1000_streams_wait_on_a_20s_model_while_health_and_continues_answer(redis_server):
    server = serve(redis_server, SLOW_MODEL_MS="20000", RUN_LEASE_SECONDS="6")
    try:
        hold_streams(server, 1000, model_seconds=20, ping=15)
    finally:
        server.stop()


def test_slow_uploads_get_408_within_the_bound_and_others_are_served(redis_server):
    _raise_open_files()
    server = serve(redis_server, REQUEST_TIMEOUT_SECONDS="2")
    try:
        run_id = paused_runs(server.url, 1)[0]
        head = request_bytes("POST", "/agents/chat-agent/runs", b"message=slow&stream=",
                             length=1000)
        slow = [connect(server.port, head) for _ in range(200)]
        second = SecondClient(server.url, [run_id])
        second.start()
        time.sleep(1.0)
        second.stop.set()
        second.join(10)
        pump(slow, until=lambda xs: all(x.closed_at for x in xs), timeout=10)
        close_all(slow)
        assert max(second.health) < 1.0 and second.continues == [
            ("COMPLETED", second.continues[0][1])] and second.continues[0][1] < 1.0
        for exchange in slow:
            assert exchange.status in (408, None)
            assert exchange.closed_at - exchange.opened < 2 + 1.0
        assert sum(x.status == 408 for x in slow) >= 190
        assert json.loads(slow[0].body)["error_code"] == "REQUEST_TIMEOUT"
        runs = requests.get(f"{server.url}/agents/chat-agent/runs", timeout=5).json()
        assert runs == []
    finally:
        server.stop()


def test_a_create_whose_client_hangs_up_half_way_makes_no_run(redis_server):
    server = serve(redis_server)
    try:
        body = urllib.parse.urlencode({"message": "half", "stream": "false"}).encode()
        for _ in range(5):
            exchange = connect(server.port, request_bytes(
                "POST", "/agents/chat-agent/runs", body[: len(body) // 2], length=len(body)))
            exchange.sock.close()
        whole = requests.post(f"{server.url}/agents/chat-agent/runs",
                              data={"message": "whole", "stream": "false"}, timeout=5)
        assert whole.status_code == 200
        time.sleep(0.5)
        runs = requests.get(f"{server.url}/agents/chat-agent/runs", timeout=5).json()
        assert [r["input"]["input_content"] for r in runs] == ["whole"]
    finally:
        server.stop()
