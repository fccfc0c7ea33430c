"""Contention and faults (issue 10, items 1, 2, 3 and 6), on both stores where they apply.

A cancel against a run that checkpoints as fast as it can; an execution that finishes while
a newer one of the same run is already executing; a sweep that read a run just before its
lease was renewed; a store that stalls while a tool runs; Redis at `maxmemory`.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from app import create_app
from app.runtime.agent import Agent
from app.runtime.executor import RunExecutor
from app.runtime.models import ContentDelta, ModelError, TurnUsage
from statemachine.errors import CancelRequested, StaleRun
from statemachine.redis_store import RedisRunStore
from statemachine.sqlite_store import SqliteRunStore
from statemachine.states import RunState
from statemachine.store import Commit, StoredRun
from tests.servers import RedisServer, no_redis, wait_until


class Chatterbox:
    """A model that streams `deltas` pieces of text, one every `pace` seconds: its run
    checkpoints every batch window for seconds (a fast model's deltas would be one batch)."""

    id = "chatterbox"
    provider = "test"

    def __init__(self, deltas: int, pace: float = 0.001) -> None:
        self.deltas = deltas
        self.pace = pace

    def stream_turn(self, messages, tools) -> Iterator:
        for i in range(self.deltas):
            time.sleep(self.pace)
            yield ContentDelta(f"{i} ")
        yield TurnUsage(1, self.deltas)


def service_of(app):
    return app.extensions["agentos"].service


def events_of(store, run_id: str) -> list[str]:
    """Every event name of the run, read page by page."""
    names, after = [], 0
    while page := store.read_events(run_id, after):
        names += [e.name for e in page]
        after = page[-1].seq
    return names


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone (it gets stopped, or filled to maxmemory)."""
    try:
        server = RedisServer().start()
    except FileNotFoundError:
        no_redis("Contention")
    yield server
    if server.process and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


# -- 1: a cancel wins against any number of checkpoints ---------------------------------------


@pytest.fixture
def app_config() -> dict:
    return {"AGENTS": [Agent(id="chatter", model=Chatterbox(3000))],
            "SWEEP_INTERVAL_SECONDS": 3600}


def test_a_cancel_wins_against_a_run_that_streams_without_pause(app, client, store):
    for _ in range(3):
        started = service_of(app).create_run("chatter", "go", None, None)
        wait_until(lambda s=started: len(store.read_events(s.run_id)) > 20, timeout=10,
                   what="the run to stream")
        answer = client.post(f"/agents/chatter/runs/{started.run_id}/cancel")
        assert (answer.status_code, answer.json) == (200, {})
        wait_until(lambda s=started: store.get_run(s.run_id).state.is_final, timeout=20,
                   what="the cancelled run to stop")
        run = store.get_run(started.run_id)
        names = events_of(store, started.run_id)
        assert run.state is RunState.CANCELLED, names[-3:]
        assert names[-1] == "RunCancelled" and "RunCompleted" not in names
        last = store.read_events(started.run_id, run.last_seq - 1)
        assert last[-1].data["reason"] == "cancelled by client"
        assert not run.cancel_requested


def test_a_cancel_loses_cleanly_to_a_final_state(app, client, store):
    started = service_of(app).create_run("chatter", "go", None, None)
    wait_until(lambda: store.get_run(started.run_id).state.is_final, timeout=60,
               what="the run to complete")
    answer = client.post(f"/agents/chatter/runs/{started.run_id}/cancel")
    assert (answer.status_code, answer.json["detail"]) == (409, "run is already completed")
    assert events_of(store, started.run_id)[-1] == "RunCompleted"


def executing_run(store, run_id: str, lease_until: float, owner: str = "w1") -> StoredRun:
    now = time.time()
    doc = {"run_id": run_id, "agent_id": "chatter", "agent_name": "chatter",
           "session_id": "s1", "tools": [], "messages": []}
    store.create_run(StoredRun(run_id=run_id, agent_id="chatter", session_id="s1",
                               user_id=None, state=RunState.RUNNING, version=1, created_at=now,
                               updated_at=now, doc=doc, lease_owner=owner,
                               lease_until=lease_until), [{"event": "RunStarted"}])
    return store.get_run(run_id)


def test_a_cancel_request_refuses_the_workers_commits_until_it_cancels(store):
    run = executing_run(store, "r-cancel", time.time() + 30)
    store.request_cancel("r-cancel", RunState.RUNNING, time.time())
    fresh = store.get_run("r-cancel")
    assert fresh.cancel_requested and fresh.version == run.version + 1
    checkpoint = Commit(run_id="r-cancel", expected_version=fresh.version,
                        state=RunState.RUNNING, doc=run.doc, now=time.time(),
                        events=[{"event": "RunContent"}], honour_cancel=True)
    with pytest.raises(CancelRequested):
        store.commit(checkpoint)
    with pytest.raises(StaleRun):  # a request only lands on the state it was decided on
        store.request_cancel("r-cancel", RunState.PAUSED, time.time())
    store.commit(Commit(run_id="r-cancel", expected_version=fresh.version,
                        state=RunState.CANCELLED, doc=run.doc, now=time.time(),
                        events=[{"event": "RunCancelled"}]))
    assert not store.get_run("r-cancel").cancel_requested


# -- 2: leases are compared where they are decided --------------------------------------------


def test_a_finishing_execution_keeps_a_newer_one_of_the_same_run_active(store):
    executor = RunExecutor(store, max_runs=4, lease_seconds=30, sweep_interval=3600)
    first_may_end, second_may_end = threading.Event(), threading.Event()
    try:
        executor.reserve()
        executor.submit("r1", lambda: first_may_end.wait(10))
        executor.reserve()
        executor.submit("r1", lambda: second_may_end.wait(10))
        first_may_end.set()
        # the first execution's `finally` has run once its slot is back (2 of 4 taken -> 1)
        wait_until(lambda: executor.free_slots == 3, timeout=5, what="the first to end")
        assert executor.active() == ["r1"]
        second_may_end.set()
        wait_until(lambda: executor.active() == [], timeout=5, what="both executions to end")
    finally:
        first_may_end.set()
        second_may_end.set()
        executor.shutdown(wait=True)


def test_a_sweep_that_read_before_a_renewal_does_not_end_the_run(app, store):
    stale = executing_run(store, "r-lease", time.time() - 1)
    store.renew_leases("w1", ["r-lease"], time.time() + 30)
    assert service_of(app)._settle(stale) is True  # it lost, and says: read again
    run = store.get_run("r-lease")
    assert run.state is RunState.RUNNING
    assert events_of(store, "r-lease") == ["RunStarted"]


def test_a_lapsed_lease_commit_is_refused_once_renewed(store):
    executing_run(store, "r-lapse", time.time() - 1)
    read = store.get_run("r-lapse")
    store.renew_leases("w1", ["r-lapse"], time.time() + 30)
    with pytest.raises(StaleRun):
        store.commit(Commit(run_id="r-lapse", expected_version=read.version,
                            state=RunState.ERRORED, doc=read.doc, now=time.time(),
                            lease_lapsed_by=time.time()))
    store.commit(Commit(run_id="r-lapse", expected_version=read.version,
                        state=RunState.ERRORED, doc=read.doc, now=time.time(),
                        lease_lapsed_by=time.time() + 60))
    assert store.get_run("r-lapse").state is RunState.ERRORED


def test_a_lost_worker_of_a_run_asked_to_cancel_ends_it_cancelled(app, store):
    executing_run(store, "r-lost", time.time() - 1)
    store.request_cancel("r-lost", RunState.RUNNING, time.time())
    service_of(app).sweep()
    assert store.get_run("r-lost").state is RunState.CANCELLED
    assert events_of(store, "r-lost")[-1] == "RunCancelled"


# -- 3: one failed write does not kill a run --------------------------------------------------


def confirm(client, run_id: str) -> dict:
    run = client.get(f"/agents/confirm-agent/runs/{run_id}").json
    return {"tools": json.dumps([{"tool_call_id": run["tools"][0]["tool_call_id"],
                                  "confirmed": True}])}


def continue_through_an_outage(store, outage, monkeypatch) -> tuple[list[str], StoredRun]:
    """Continue a confirm-agent run; while its tool runs, `outage()` takes the store away."""
    monkeypatch.setenv("DEMO_TOOL_LATENCY_MS", "800")
    app = create_app({"STORE": store, "SWEEP_INTERVAL_SECONDS": 3600,
                      "STREAM_MAX_SECONDS": 20, "STREAM_PING_SECONDS": 0.5})
    try:
        client = app.test_client()
        created = client.post("/agents/confirm-agent/runs", data={"message": "m",
                                                                  "stream": "false"}).json
        run_id = created["run_id"]
        body: list[bytes] = []
        reader = threading.Thread(target=lambda: body.append(client.post(
            f"/agents/confirm-agent/runs/{run_id}/continue",
            data={**confirm(client, run_id), "stream": "true"}).get_data()))
        reader.start()
        wait_until(lambda: "ToolCallStarted" in events_of(store, run_id), timeout=10,
                   what="the tool to start")
        outage()
        reader.join(30)
        assert not reader.is_alive()
        text = body[0].decode()
        names = [line[7:] for line in text.split("\n") if line.startswith("event: ")]
        return names, store.get_run(run_id)
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)


def test_a_sqlite_lock_during_a_tool_is_waited_out(tmp_path, monkeypatch):
    path = str(tmp_path / "stall.db")
    store = SqliteRunStore(path, busy_timeout=0.2)
    try:
        names, run = continue_through_an_outage(store, sqlite_lock(path, 2.5), monkeypatch)
    finally:
        store.close()
    assert names[-1] == "RunCompleted", names
    assert names.count("ToolCallCompleted") == 1
    assert run.state is RunState.COMPLETED


def test_a_redis_stall_during_a_tool_is_waited_out(private_redis, monkeypatch):
    store = RedisRunStore(private_redis.url, prefix="stall", socket_timeout=0.5)
    try:
        names, run = continue_through_an_outage(store, redis_stop(private_redis, 2.5),
                                                monkeypatch)
    finally:
        store.close()
    assert names[-1] == "RunCompleted", names
    assert names.count("ToolCallCompleted") == 1
    assert run.state is RunState.COMPLETED


class FailsOnSignal:
    """A model that waits for `go`, then fails: its error is written during an outage."""

    id = "failing"
    provider = "test"

    def __init__(self) -> None:
        self.go = threading.Event()

    def stream_turn(self, messages, tools) -> Iterator:
        self.go.wait(10)
        raise ModelError("the provider is down")
        yield  # a generator, like every model


def fail_through_an_outage(store, outage) -> StoredRun:
    """A run whose model fails while `outage()` holds the store: fail() must be retried."""
    model = FailsOnSignal()
    app = create_app({"STORE": store, "SWEEP_INTERVAL_SECONDS": 3600,
                      "AGENTS": [Agent(id="failing", model=model)]})
    try:
        started = service_of(app).create_run("failing", "go", None, None)
        wait_until(lambda: "ModelRequestStarted" in events_of(store, started.run_id),
                   timeout=10, what="the model turn to start")
        blocker = threading.Thread(target=outage)
        blocker.start()
        time.sleep(0.3)
        model.go.set()
        blocker.join(10)
        wait_until(lambda: store.get_run(started.run_id).state.is_final, timeout=15,
                   what="the error to be written")
        return store.get_run(started.run_id)
    finally:
        model.go.set()
        app.extensions["agentos"].executor.shutdown(wait=True)


def sqlite_lock(path: str, seconds: float):
    def outage() -> None:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        blocker.execute("COMMIT")
        blocker.close()
    return outage


def redis_stop(server: RedisServer, seconds: float):
    def outage() -> None:
        os.kill(server.process.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(server.process.pid, signal.SIGCONT)
    return outage


def assert_error_written_through(store, outage) -> None:
    """The run's RunError lands although `outage` refused its first attempts."""
    try:
        run = fail_through_an_outage(store, outage)
    finally:
        store.close()
    assert run.state is RunState.ERRORED and run.doc["content"] == "the provider is down"


def test_an_error_written_during_a_sqlite_lock_is_retried(tmp_path):
    path = str(tmp_path / "fail.db")
    assert_error_written_through(SqliteRunStore(path, busy_timeout=0.2), sqlite_lock(path, 1.5))


def test_an_error_written_during_a_redis_stall_is_retried(private_redis):
    assert_error_written_through(
        RedisRunStore(private_redis.url, prefix="fail", socket_timeout=0.5),
        redis_stop(private_redis, 1.5))


# -- 6: Redis at maxmemory --------------------------------------------------------------------


def test_redis_at_maxmemory_answers_503_and_changes_nothing(private_redis):
    store = RedisRunStore(private_redis.url, prefix="oom")
    app = create_app({"STORE": store, "SWEEP_INTERVAL_SECONDS": 3600})
    admin = redis.Redis.from_url(private_redis.url)
    try:
        client = app.test_client()
        run = client.post("/agents/confirm-agent/runs", data={"message": "m",
                                                              "stream": "false"}).json
        form = {**confirm(client, run["run_id"]), "stream": "false"}
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        for answer in (client.post("/agents/confirm-agent/runs", data={"message": "m"}),
                       client.post(f"/agents/confirm-agent/runs/{run['run_id']}/continue",
                                   data=form)):
            assert answer.status_code == 503, answer.get_data(as_text=True)
            assert answer.json["error_code"] == "SERVICE_UNAVAILABLE"
            assert answer.headers["Retry-After"] == "1"
        admin.config_set("maxmemory", 0)
        assert store.get_run(run["run_id"]).state is RunState.PAUSED
        done = client.post(f"/agents/confirm-agent/runs/{run['run_id']}/continue", data=form)
        assert done.status_code == 200 and done.json["status"] == "COMPLETED"
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        app.extensions["agentos"].executor.shutdown(wait=True)
        store.close()


# -- 1 again, as the attack ran it: gunicorn workers on Redis, streaming runs ------------------


def sse_names(response) -> Iterator[str]:
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            yield line[7:]


@pytest.mark.slow
def test_cancels_of_streaming_runs_on_gunicorn_and_redis_all_win(private_redis):
    import requests

    from tests.servers import Gunicorn

    server = Gunicorn(env={"REDIS_URL": private_redis.url, "REDIS_KEY_PREFIX": "cancel",
                           "SWEEP_INTERVAL_SECONDS": "0.5"}, workers=2).start()
    try:
        for _ in range(6):
            # 19,000 deltas (near the longest message): an unhindered run of them lasts about
            # 0.6 s here, so the cancel, sent after the 20th event, finds it still executing
            # on a loaded machine too (5,000 lasted 0.1 s, and a full suite once lost the race)
            with requests.post(f"{server.url}/agents/chat-agent/runs",
                               data={"message": "word " * 19_000}, stream=True,
                               timeout=30) as answer:
                names = sse_names(answer)
                assert next(names) == "RunStarted"
                run_id = answer.headers["Location"].split("/runs/")[1].split("/")[0]
                assert [next(names) for _ in range(20)][-1] == "RunContent"
                cancel = requests.post(f"{server.url}/agents/chat-agent/runs/{run_id}/cancel",
                                       timeout=10)
                assert (cancel.status_code, cancel.json()) == (200, {})
                rest = list(names)
            assert rest[-1] == "RunCancelled" and "RunCompleted" not in rest
            run = requests.get(f"{server.url}/agents/chat-agent/runs/{run_id}", timeout=10)
            assert run.json()["status"] == "CANCELLED"
    finally:
        server.stop()
