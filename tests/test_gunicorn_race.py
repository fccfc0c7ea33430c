"""The slow one: two simultaneous continues of each of 100 paused runs on real gunicorn.

gunicorn runs 4 worker processes on one Redis (a private key prefix, removed afterwards). Each
pair of continues is released by its own barrier; exactly one wins (200) and one is refused
(409), streamed or not, and the demo tool log proves that every confirmed tool ran once.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.servers import Gunicorn

pytestmark = [pytest.mark.slow, pytest.mark.redis]

RUNS = 100
STREAMED = 20  # pairs where both continues ask for an event stream
THREADS = 16
WAIT = 30  # seconds: the bound on every barrier and request
LOSER_DETAILS = {"run is already continued", "run is already completed"}


class Sessions:
    """One requests.Session per thread, all closed at the end."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._all.append(session)
        return session

    def close(self) -> None:
        for session in self._all:
            session.close()


@pytest.fixture
def tool_log(tmp_path: Path) -> Path:
    return tmp_path / "demo-tools.log"


@pytest.fixture
def server(redis_url: str, redis_prefix: str, tool_log: Path):
    gunicorn = Gunicorn(env={"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": redis_prefix,
                             "DEMO_TOOL_LOG": str(tool_log)}, workers=4)
    try:
        yield gunicorn.start()
    finally:
        gunicorn.stop()  # also when it failed to start: its log file is closed


@pytest.fixture
def sessions():
    pool = Sessions()
    yield pool
    pool.close()


def create_paused(sessions: Sessions, base: str, index: int) -> dict:
    response = sessions.get().post(f"{base}/agents/confirm-agent/runs", timeout=WAIT,
                                   data={"message": f"race {index}", "stream": "false"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "PAUSED"
    return response.json()


def contend(sessions: Sessions, base: str, run: dict, stream: bool,
            barrier: threading.Barrier) -> tuple[int, str, str]:
    """One continue, sent when its partner is ready too; (status, content type, whole body)."""
    session = sessions.get()
    url = f"{base}/agents/confirm-agent/runs/{run['run_id']}/continue"
    data = {"tools": json.dumps([dict(run["tools"][0], confirmed=True)]),
            "stream": "true" if stream else "false"}
    barrier.wait(WAIT)
    with session.post(url, data=data, timeout=WAIT, stream=stream) as response:
        return response.status_code, response.headers["Content-Type"], response.text


def last_event(body: str) -> dict:
    data = [line for line in body.splitlines() if line.startswith("data: ")]
    return json.loads(data[-1].removeprefix("data: "))


def check_pair(run: dict, outcomes: list[tuple[int, str, str]], stream: bool) -> None:
    """Exactly one winner, whose answer is the completed run, and one 409 loser."""
    by_status = {status: (content_type, body) for status, content_type, body in outcomes}
    assert sorted(status for status, _, _ in outcomes) == [200, 409], (run["run_id"], outcomes)
    content_type, body = by_status[200]
    if stream:
        assert content_type == "text/event-stream; charset=utf-8"
        done = last_event(body)
        assert done["event"] == "RunCompleted"
    else:
        done = json.loads(body)
        assert done["status"] == "COMPLETED"
    assert done["content"] == "Done: sent to a@example.com"
    refused = json.loads(by_status[409][1])
    assert refused["error_code"] == "RUN_NOT_PAUSED"
    assert refused["detail"] in LOSER_DETAILS


def test_two_simultaneous_continues_execute_the_tool_once(server, sessions, tool_log):
    base = server.url
    with ThreadPoolExecutor(THREADS) as pool:
        runs = list(pool.map(lambda i: create_paused(sessions, base, i), range(RUNS)))
        pairs = []
        for index, run in enumerate(runs):
            barrier, stream = threading.Barrier(2), index < STREAMED
            pairs.append((run, stream, [pool.submit(contend, sessions, base, run, stream, barrier)
                                        for _ in range(2)]))
        for run, stream, futures in pairs:
            check_pair(run, [future.result(WAIT) for future in futures], stream)

    lines = [line.split() for line in tool_log.read_text().splitlines()]
    assert Counter(run_id for run_id, _, _ in lines) == Counter(r["run_id"] for r in runs)
    assert {(call_id, name) for _, call_id, name in lines} == {("call_1_1", "send_email")}

    listed = sessions.get().get(f"{base}/agents/confirm-agent/runs", timeout=WAIT,
                                params={"status": "COMPLETED", "limit": 1000}).json()
    assert {r["run_id"] for r in listed} == {r["run_id"] for r in runs}
