"""The hot path (issue 12): what a continue costs the store, and what a delta costs it.

These count writes and round trips, never time: the figures themselves are `make bench`'s.
Every guarantee they trade on (exactly once, resumes, cancel) keeps its own tests elsewhere.
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any

import pytest
from flask import Flask
from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer
from redis.exceptions import DataError

from app import _Agentos, create_app
from app.runtime.agent import Agent
from app.runtime.models import ContentDelta, TurnUsage
from statemachine import lua, redis_store
from statemachine.redis_scripts import _send
from statemachine.reindex import reindex
from statemachine.states import RunState
from statemachine.store import Envelope
from tests.servers import wait_until


class RecordingStore:
    """The real store; it remembers every commit it was given."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.commits: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def commit(self, commit):
        self.commits.append(commit)
        return self._store.commit(commit)


class Talker:
    """A model that answers with `deltas` words, `pace` seconds apart."""

    id = "talker"
    provider = "test"

    def __init__(self, deltas: int, pace: float = 0.0) -> None:
        self.deltas, self.pace = deltas, pace

    def stream_turn(self, messages, tools):
        for i in range(self.deltas):
            if self.pace:
                time.sleep(self.pace)
            yield ContentDelta(f"w{i} ")
        yield TurnUsage(1, self.deltas)


def app_with(store, *agents: Agent):
    return create_app({"STORE": store, "AGENTS": list(agents) or None,
                       "SWEEP_INTERVAL_SECONDS": 3600})


@pytest.fixture
def recording(store):
    return RecordingStore(store)


def confirm_tools(run: dict) -> str:
    return json.dumps([{"tool_call_id": run["tools"][0]["tool_call_id"], "confirmed": True}])


def test_a_fast_turn_is_one_commit_and_a_checkpoint_keeps_the_stored_document(recording):
    app = app_with(recording, Agent(id="talker", model=Talker(200)))
    try:
        answer = app.test_client().post("/agents/talker/runs",
                                        data={"message": "go", "stream": "false"})
        assert answer.status_code == 200 and answer.json["status"] == "COMPLETED"
        assert len([e for e in answer.json["events"] if e["event"] == "RunContent"]) == 200
        assert len(recording.commits) == 1  # the whole turn, with the final state
        slow = Agent(id="slow", model=Talker(20, pace=0.03))
        app.extensions["agentos"].service.agents["slow"] = slow
        recording.commits.clear()
        answer = app.test_client().post("/agents/slow/runs",
                                        data={"message": "go", "stream": "false"})
        assert answer.json["status"] == "COMPLETED"
        checkpoints = recording.commits[:-1]
        assert len(checkpoints) >= 10  # each delta within its batch window
        assert all(c.doc is None and c.state is RunState.RUNNING for c in checkpoints[1:])
        assert recording.commits[-1].doc is not None
        run = recording.get_run(answer.json["run_id"])
        assert run.doc["content"] == "".join(f"w{i} " for i in range(20))
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)


def test_a_tool_runs_only_after_its_started_event_is_committed(store):
    app = app_with(store)
    client = app.test_client()
    try:
        run = client.post("/agents/confirm-agent/runs",
                          data={"message": "hi", "stream": "false"}).json
        seen: list[list[str]] = []
        tool = app.extensions["agentos"].agents["confirm-agent"].tool(
            run["tools"][0]["tool_name"])
        original = tool.function

        def spying(**arguments):
            seen.append([e.name for e in store.read_events(run["run_id"])])
            return original(**arguments)

        object.__setattr__(tool, "function", spying)
        try:
            done = client.post(f"/agents/confirm-agent/runs/{run['run_id']}/continue",
                               data={"tools": confirm_tools(run), "stream": "false"}).json
        finally:
            object.__setattr__(tool, "function", original)
        assert done["status"] == "COMPLETED"
        assert seen and seen[0][-2:] == ["RunContinued", "ToolCallStarted"]
        names = [e["event"] for e in done["events"]]
        assert names == [e.name for e in store.read_events(run["run_id"])]
        assert names.count("ToolCallStarted") == names.count("ToolCallCompleted") == 1
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)


@pytest.fixture
def redis_only(redis_url, redis_prefix):
    """A store on one Redis server (the round trips counted are that layout's)."""
    store = redis_store.RedisRunStore(redis_url, prefix=redis_prefix)
    yield store
    store.close()


def _continue_counting(creator, continuer, store, monkeypatch) -> int:
    """Create a confirm-agent run through `creator`, continue it through `continuer`; the
    round trips of the continue (its answer checked against the store)."""
    sent: list[int] = []
    run = creator.post("/agents/confirm-agent/runs",
                       data={"message": "hi", "stream": "false"}).json
    monkeypatch.setattr(redis_store, "on_round_trip", lambda: sent.append(1))
    done = continuer.post(f"/agents/confirm-agent/runs/{run['run_id']}/continue",
                          data={"tools": confirm_tools(run), "stream": "false"})
    monkeypatch.setattr(redis_store, "on_round_trip", lambda: None)
    assert done.status_code == 200 and done.json["status"] == "COMPLETED"
    stored = store.get_run(run["run_id"])
    assert done.json["events"] == [e.data for e in store.read_events(run["run_id"])]
    assert done.json["content"] == stored.doc["content"]
    return len(sent)


def test_a_continue_that_completes_costs_three_round_trips(redis_only, monkeypatch):
    """In a process that did not pause the run: a read, then the two commits."""
    creator, continuer = app_with(redis_only), app_with(redis_only)
    try:
        assert _continue_counting(creator.test_client(), continuer.test_client(),
                                  redis_only, monkeypatch) == 3
    finally:
        for app in (creator, continuer):
            app.extensions["agentos"].executor.shutdown(wait=True)


def test_a_continue_in_the_process_that_paused_the_run_costs_two_round_trips(redis_only,
                                                                             monkeypatch):
    """The run as its pause committed it was kept here: the continue's commit and the
    turn's commit, no read."""
    app = app_with(redis_only)
    client = app.test_client()
    try:
        assert _continue_counting(client, client, redis_only, monkeypatch) == 2
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)


def test_a_create_that_pauses_costs_two_round_trips_its_session_linked_inside(redis_only,
                                                                              monkeypatch):
    app = app_with(redis_only)
    client = app.test_client()
    sent: list[int] = []
    try:
        client.post("/agents/confirm-agent/runs", data={"message": "warm", "stream": "false"})
        monkeypatch.setattr(redis_store, "on_round_trip", lambda: sent.append(1))
        run = client.post("/agents/confirm-agent/runs",
                          data={"message": "hi", "stream": "false"}).json
        monkeypatch.setattr(redis_store, "on_round_trip", lambda: None)
        assert run["status"] == "PAUSED"
        assert len(sent) == 2  # the CREATE (which links the new session) and the pause
        session = redis_only.get_session(run["session_id"])
        assert (session.agent_id, session.first_message) == ("confirm-agent", "hi")
        assert redis_only.redis.zscore(redis_only.keys.session_runs(run["session_id"]),
                                       run["run_id"]) is not None
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)


def test_events_are_read_back_as_committed_with_or_without_their_envelope(redis_only):
    app = app_with(redis_only)
    try:
        run = app.test_client().post("/agents/confirm-agent/runs",
                                     data={"message": "hi", "stream": "false"}).json
        raws = redis_only.redis.lrange(redis_only.keys.events(run["run_id"]), 0, -1)
        assert all(raw.startswith("~") for raw in raws)  # kept once, in the run's hash
        assert [e.data for e in redis_only.read_events(run["run_id"])] == run["events"]
        assert list(run["events"][0])[:6] == ["created_at", "event", "agent_id", "agent_name",
                                              "run_id", "session_id"]
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)
    envelope = Envelope("a", "A", "r", "s")
    odd = {"created_at": 1, "event": "X", "agent_id": "a", "agent_name": "B", "run_id": "r",
           "session_id": "s"}
    assert envelope.strip(odd) is None  # another envelope is kept whole
    same = {**odd, "agent_name": "A", "tools": [1]}
    assert envelope.dress(envelope.strip(same)) == same
    assert list(envelope.dress(envelope.strip(same))) == list(same)


def paused_run(store) -> dict:
    """A confirm-agent run, created through the API and paused; the app is gone after."""
    app = app_with(store)
    try:
        return app.test_client().post("/agents/confirm-agent/runs",
                                      data={"message": "hi", "stream": "false"}).json
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)


def test_reindex_moves_a_run_of_the_layout_before_the_event_list(redis_only):
    run = paused_run(redis_only)
    client, keys, rid = redis_only.redis, redis_only.keys, run["run_id"]
    events = [e.data for e in redis_only.read_events(rid)]
    doc = client.get(keys.doc(rid))
    client.delete(keys.doc(rid), keys.events(rid), keys.bell(rid))  # as an old version kept it
    client.hdel(keys.run(rid), "agent_name")
    client.hset(keys.run(rid), "doc", doc)
    for seq, data in enumerate(events, start=1):
        client.xadd(keys.legacy_events(rid), {"e": json.dumps(data)}, id=f"0-{seq}")
    done = reindex(redis_only)
    assert done["runs_migrated"] == 1
    assert [e.data for e in redis_only.read_events(rid)] == events
    assert redis_only.get_run(rid).doc == json.loads(doc)
    assert not client.exists(keys.legacy_events(rid)) and not client.hexists(keys.run(rid), "doc")
    assert "runs_migrated" not in reindex(redis_only)


def test_a_paused_run_lets_its_bell_go(redis_only):
    run = paused_run(redis_only)
    bell = redis_only.keys.bell(run["run_id"])
    assert 0 < redis_only.redis.pttl(bell) <= lua.BELL_MS
    wait_until(lambda: not redis_only.redis.exists(bell), timeout=lua.BELL_MS / 1000 + 5,
               what="the bell to expire")
    assert redis_only.get_run(run["run_id"]).state is RunState.PAUSED


@pytest.mark.parametrize("elsewhere, sentence", [
    (lambda client, run: client.post(f"/agents/confirm-agent/runs/{run['run_id']}/continue",
                                     data={"tools": confirm_tools(run), "stream": "false"}),
     "run is already completed"),
    (lambda client, run: client.post(f"/agents/confirm-agent/runs/{run['run_id']}/cancel"),
     "run is already cancelled"),
])
def test_a_kept_pause_moved_by_another_process_is_decided_on_the_store(redis_only, elsewhere,
                                                                       sentence):
    """The process that paused the run keeps it; another one moves it (a continue, a
    cancel); the kept copy then loses its compare-and-set, and the store's state answers."""
    here, there = app_with(redis_only), app_with(redis_only)
    try:
        client = here.test_client()
        run = client.post("/agents/confirm-agent/runs",
                          data={"message": "hi", "stream": "false"}).json
        assert len(here.extensions["agentos"].service.channels.kept) == 1
        assert elsewhere(there.test_client(), run).status_code == 200
        wait_until(lambda: redis_only.get_run(run["run_id"]).state.is_final, timeout=10)
        before = [e.data for e in redis_only.read_events(run["run_id"])]
        late = client.post(f"/agents/confirm-agent/runs/{run['run_id']}/continue",
                           data={"tools": confirm_tools(run), "stream": "false"})
        assert (late.status_code, late.json["detail"]) == (409, sentence)
        assert [e.data for e in redis_only.read_events(run["run_id"])] == before
        assert [e["event"] for e in before].count("ToolCallStarted") <= 1
    finally:
        for app in (here, there):
            app.extensions["agentos"].executor.shutdown(wait=True)


def test_kept_pauses_are_bounded_in_runs_and_in_events_and_each_is_taken_once():
    from app.runtime.handoff import KeptPauses
    from statemachine.store import StoredRun

    kept = KeptPauses(limit=2)
    runs = [StoredRun(run_id=f"r{i}", agent_id="a", session_id="s", user_id=None,
                      state=RunState.PAUSED, version=2, created_at=0.0, updated_at=0.0,
                      doc={}) for i in range(3)]
    for run in runs:
        kept.keep(run, [], '{"messages":[]}')
    assert len(kept) == 2 and kept.take("r0") is None  # the oldest went first
    taken = kept.take("r1")
    assert taken is not None and taken.run is not runs[1]
    assert taken.run.doc == {"messages": []} and taken.run.version == 2
    assert kept.take("r1") is None

    few = KeptPauses(limit=10, events=3)
    few.keep(runs[0], [None, None], "{}")
    few.keep(runs[1], [None, None], "{}")  # 4 events in all: the oldest run goes
    few.keep(runs[2], [None] * 4, "{}")  # more than all the budget: not kept
    assert (few.take("r0"), few.take("r2")) == (None, None)
    assert few.take("r1") is not None and len(few) == 0


def test_a_kept_pause_held_by_its_approval_follows_the_admin_who_resolved_it_elsewhere(
        redis_only):
    """The copy kept where the run paused still says an approval is pending; the admin
    resolves it through another process. The continue here is not refused on the copy: the
    store, which holds the admin's decision, decides (and applies it)."""
    here, there = app_with(redis_only), app_with(redis_only)
    try:
        client = here.test_client()
        run = client.post("/agents/approval-agent/runs",
                          data={"message": "web", "stream": "false"}).json
        (call,) = run["tools"]
        assert len(here.extensions["agentos"].service.channels.kept) == 1
        resolved = there.test_client().post(f"/approvals/{call['approval_id']}/resolve",
                                            json={"status": "approved"})
        assert resolved.status_code == 200, resolved.json
        done = client.post(f"/agents/approval-agent/runs/{run['run_id']}/continue",
                           data={"tools": "", "stream": "false"})
        assert done.status_code == 200, done.json
        assert (done.json["status"], done.json["content"]) == ("COMPLETED",
                                                               "Deployed: deployed web")
        assert len(here.extensions["agentos"].service.channels.kept) == 0
    finally:
        for app in (here, there):
            app.extensions["agentos"].executor.shutdown(wait=True)


class _SentBytes:
    """A connection that keeps what it is asked to send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self.sent.extend(command)

    def send_command(self, *args: Any) -> None:
        encode = Encoder("utf-8", "strict", False).encode
        self.send_packed_command(PythonRespSerializer(6000, encode).pack(*args))


def test_a_script_call_is_packed_byte_for_byte_as_redis_py_packs_it():
    """hiredis packs the EVALSHA in one call; what Redis receives is what redis-py's own
    packer makes of the same arguments, and an argument it refuses is redis-py's to refuse."""
    args = ("EVALSHA", "f00d", 2, "run:1", b"\xffraw", 7, -3, 2**70, 0.1, 1e-300, "é", "")
    ours, theirs = _SentBytes(), _SentBytes()
    _send(ours, *args)
    theirs.send_command(*args)
    assert b"".join(ours.sent) == b"".join(theirs.sent)
    with pytest.raises(DataError):
        _send(_SentBytes(), "EVALSHA", "f00d", 0, True)


def test_flask_is_asked_once_whether_a_function_is_plain_and_forgets_one_made_per_request(
        monkeypatch):
    asked: list[str] = []  # names: the functions themselves would be kept alive here
    monkeypatch.setattr(Flask, "ensure_sync",
                        lambda self, func: asked.append(func.__name__) or func)
    flask_app = _Agentos("agentos-test")

    def view() -> str:
        return "ok"

    assert flask_app.ensure_sync(view) is view
    assert flask_app.ensure_sync(view) is view
    assert asked == ["view"]
    for _ in range(100):
        flask_app.ensure_sync(lambda: None)
    gc.collect()
    assert len(flask_app._plain) <= 2  # `view`, and at most the last closure if still alive
    unreferable = _NoWeakReference()
    assert flask_app.ensure_sync(unreferable) is unreferable  # asked each time
    assert flask_app.ensure_sync(unreferable) is unreferable
    assert asked.count("no_weak_reference") == 2


class _NoWeakReference:
    __slots__ = ()
    __name__ = "no_weak_reference"

    def __call__(self) -> None:
        return None
