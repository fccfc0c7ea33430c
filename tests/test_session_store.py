"""The store's session methods, one suite run against both stores (the `store` fixture)."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from statemachine.errors import (
    RunNotFound,
    SessionExists,
    SessionNotFound,
    SessionOwnedElsewhere,
    StaleRun,
)
from statemachine.keys import shard_of
from statemachine.redis_store import RUN_HINT_GRACE_SECONDS, RedisRunStore
from statemachine.states import RunState
from statemachine.store import (
    RunRemoval,
    SessionLink,
    SessionQuery,
    StoredSession,
)
from tests.conftest import ALL_STORE_KINDS
from tests.test_store_contract import advance, ev, new_run, paused_with_approvals


@pytest.fixture(params=ALL_STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Sessions hold on SQLite, one Redis server and a Redis Cluster alike."""
    return request.param

T0 = 1_700_000_000.0


def linked(store, session_id: str = "s1", message: str = "hello", *, agent_id: str = "agent-a",
           user_id: str | None = None, exclusive: bool = False, now: float | None = None):
    """A new run created with a link to `session_id`; the run as stored."""
    now = time.time() if now is None else now
    run = new_run(agent_id=agent_id, session_id=session_id, user_id=user_id, created_at=now)
    store.create_run(run, [ev("RunStarted")], session=SessionLink(
        session_id, agent_id, user_id, message, now, exclusive))
    return store.get_run(run.run_id)


def session(session_id: str, at: float, **fields) -> StoredSession:
    return StoredSession(session_id=session_id, agent_id=fields.pop("agent_id", "agent-a"),
                         user_id=fields.pop("user_id", None), created_at=at, updated_at=at,
                         **fields)


def page(store, **query) -> tuple[list[str], int]:
    found, total = store.list_sessions(SessionQuery(**query))
    return [s.session_id for s in found], total


def test_the_first_run_makes_the_session_and_later_runs_join_it(store):
    first = linked(store, message="first words", user_id="u1", now=T0)
    second = linked(store, message="later words", user_id="u1", now=T0 + 5)
    found = store.get_session("s1")
    assert (found.agent_id, found.user_id, found.first_message) == ("agent-a", "u1",
                                                                    "first words")
    assert found.display_name == "first words" and found.name is None
    assert (found.created_at, found.updated_at) == (T0, T0 + 5)
    assert [r.run_id for r in store.session_runs("s1")] == [first.run_id, second.run_id]
    assert [r.run_id for r in store.session_runs("s1", limit=1)] == [second.run_id]


def test_an_exclusive_run_cannot_join_another_users_session(store):
    linked(store, user_id="alice", now=T0)
    run = new_run(session_id="s1", user_id="bob")
    with pytest.raises(SessionOwnedElsewhere):
        store.create_run(run, [], session=SessionLink("s1", "agent-a", "bob", "hi", T0 + 1,
                                                       True))
    with pytest.raises(RunNotFound):
        store.get_run(run.run_id)
    linked(store, user_id="bob", now=T0 + 2)  # without exclusive: a label, not an owner
    assert len(store.session_runs("s1")) == 2
    assert store.get_session("s1").user_id == "alice"


def test_create_get_and_update(store):
    store.create_session(session("x", T0, name="Named", metadata={"a": 1},
                                 session_state={"k": [1]}))
    with pytest.raises(SessionExists):
        store.create_session(session("x", T0 + 1))
    with pytest.raises(SessionNotFound):
        store.get_session("missing")
    found = store.get_session("x")
    assert (found.name, found.metadata, found.session_state) == ("Named", {"a": 1},
                                                                  {"k": [1]})
    updated = store.update_session("x", {"name": "Other", "session_state": {"k": 2}}, T0 + 9)
    assert (updated.name, updated.session_state, updated.metadata) == ("Other", {"k": 2},
                                                                        {"a": 1})
    assert updated.updated_at == T0 + 9 and updated.created_at == T0
    assert store.update_session("x", {}, T0 + 1).updated_at == T0 + 9  # never backwards
    with pytest.raises(SessionNotFound):
        store.update_session("missing", {"name": "n"}, T0)


def test_listing_pages_sorts_and_filters(store):
    specs = [("a", "agent-a", "u1"), ("b", "agent-b", "u1"), ("c", "agent-a", "u2"),
             ("d", "agent-a", None), ("e", "agent-b", None)]
    for offset, (sid, agent, user) in enumerate(specs):
        store.create_session(session(sid, T0 + offset, agent_id=agent, user_id=user,
                                     name=f"Trip {sid.upper()}" if sid in "ac" else sid))
    assert page(store) == (["e", "d", "c", "b", "a"], 5)
    assert page(store, limit=2, offset=2) == (["c", "b"], 5)
    assert page(store, descending=False, limit=2) == (["a", "b"], 5)
    assert page(store, agent_id="agent-a") == (["d", "c", "a"], 3)
    assert page(store, user_id="u1") == (["b", "a"], 2)
    assert page(store, agent_id="agent-a", user_id="u1") == (["a"], 1)
    assert page(store, name_contains="trip") == (["c", "a"], 2)
    assert page(store, name_contains="trip", limit=1, offset=1) == (["a"], 2)
    store.update_session("a", {"name": "Trip A again"}, T0 + 100)
    assert page(store, sort_by="updated_at", limit=2) == (["a", "e"], 5)
    assert page(store, sort_by="updated_at", agent_id="agent-a", user_id="u1") == (["a"], 1)
    assert page(store, agent_id="agent-z") == ([], 0)


def test_a_run_moves_its_session_up_by_updated_at(store):
    store.create_session(session("old", T0))
    store.create_session(session("new", T0 + 1))
    linked(store, "old", now=T0 + 2)
    assert page(store, sort_by="updated_at")[0] == ["old", "new"]
    assert page(store, sort_by="created_at")[0] == ["new", "old"]


def test_delete_expires_a_paused_runs_approvals_and_removes_everything(store):
    run, approval_ids = paused_with_approvals(store, session_id="s1")
    store.create_session(session("s1", T0))
    done = linked(store, "s1")
    advance(store, done, RunState.COMPLETED, ev("RunCompleted"))
    done = store.get_run(done.run_id)
    removals = [RunRemoval(done.run_id, done.agent_id, done.version),
                RunRemoval(run.run_id, run.agent_id, run.version, approval_ids, approval_ids)]
    if isinstance(store, RedisRunStore):  # a run made without a link joins by its hint
        store.redis.zadd(store.keys.session_runs("s1"), {run.run_id: T0})
    store.delete_session("s1", removals, time.time(), 3600)
    for gone in (run, done):
        with pytest.raises(RunNotFound):
            store.get_run(gone.run_id)
        assert store.read_events(gone.run_id) == []
    assert store.get_approval(approval_ids[0]).status == "expired"
    with pytest.raises(SessionNotFound):
        store.get_session("s1")
    assert page(store) == ([], 0)
    assert store.session_runs("s1") == []


def test_delete_with_a_stale_plan_deletes_nothing(store):
    run = linked(store, "s1")
    stale = [RunRemoval(run.run_id, run.agent_id, run.version)]
    advance(store, run, RunState.PAUSED, ev("RunPaused"))
    with pytest.raises(StaleRun):
        store.delete_session("s1", stale, time.time(), 3600)
    assert store.get_run(run.run_id).state is RunState.PAUSED
    assert store.get_session("s1").session_id == "s1"


def test_delete_refuses_a_session_that_gained_a_run(store):
    first = linked(store, "s1")
    linked(store, "s1")
    with pytest.raises(StaleRun):
        store.delete_session("s1", [RunRemoval(first.run_id, first.agent_id, first.version)],
                             time.time(), 3600)
    assert store.get_session("s1").session_id == "s1"
    with pytest.raises(SessionNotFound):
        store.delete_session("missing", [], time.time(), 3600)


@pytest.mark.redis
def test_redis_keeps_a_fresh_run_hint_and_drops_an_old_dead_one(request, tmp_path):
    store = RedisRunStore(request.getfixturevalue("redis_url"),
                          prefix=request.getfixturevalue("redis_prefix"))
    try:
        run = linked(store, "s1")
        index = store.keys.session_runs("s1")
        fresh, old = uuid.uuid4().hex, uuid.uuid4().hex
        store.redis.zadd(index, {fresh: time.time(),
                                 old: time.time() - RUN_HINT_GRACE_SECONDS - 1})
        assert [r.run_id for r in store.session_runs("s1")] == [run.run_id]
        assert set(store.redis.zrange(index, 0, -1)) == {run.run_id, fresh}
        ghost_index = store.keys.sessions(shard_of("ghost"), "created_at")
        store.redis.zadd(ghost_index, {"ghost": T0})
        assert page(store, limit=1) == (["s1"], 2)  # a hint counts until a read meets it
        assert page(store) == (["s1"], 1)
        assert store.redis.zscore(ghost_index, "ghost") is None
    finally:
        store.close()


def test_concurrent_first_runs_make_one_session_holding_every_run(store):
    from concurrent.futures import ThreadPoolExecutor

    def worker(index: int) -> list[str]:
        return [linked(store, "s-race", f"m{index}-{n}").run_id for n in range(5)]

    with ThreadPoolExecutor(8) as pool:
        made = [run_id for ids in pool.map(worker, range(8)) for run_id in ids]
    found = store.get_session("s-race")
    assert found.first_message.startswith("m")
    assert sorted(r.run_id for r in store.session_runs("s-race")) == sorted(made)
    assert page(store) == (["s-race"], 1)


def test_refused_writes_leave_the_updated_order_alone(store):
    linked(store, "a", user_id="alice", now=T0)
    store.create_session(session("b", T0 + 1))
    with pytest.raises(SessionExists):
        store.create_session(session("a", T0 + 5))
    with pytest.raises(SessionOwnedElsewhere):
        store.create_run(new_run(session_id="a", user_id="bob"), [], session=SessionLink(
            "a", "agent-a", "bob", "hi", T0 + 6, True))
    assert page(store, sort_by="updated_at") == (["b", "a"], 2)
    assert store.get_session("a").updated_at == T0


def test_a_session_made_without_an_agent_is_listed_by_its_first_runs_agent(store):
    store.create_session(session("early", T0, agent_id=None))
    store.create_session(session("later", T0 + 1, agent_id="agent-a"))
    linked(store, "early", now=T0 + 2)
    assert store.get_session("early").agent_id == "agent-a"
    assert page(store, agent_id="agent-a") == (["later", "early"], 2)
    assert page(store, agent_id="agent-a", sort_by="updated_at") == (["early", "later"], 2)


def test_a_deletion_announces_the_cancelled_run_in_the_same_step(store):
    store.outbox = True
    run, approval_ids = paused_with_approvals(store, session_id="s1")
    store.create_session(session("s1", T0))
    if isinstance(store, RedisRunStore):
        store.redis.zadd(store.keys.session_runs("s1"), {run.run_id: T0})
    now = time.time()
    for entry in store.claim_outbox(now, now + 30):  # the pause's own notifications
        store.settle_outbox(entry, delivered=True)
    cancelled = {"event": "RunCancelled", "run_id": run.run_id, "reason": "session deleted"}
    store.delete_session("s1", [RunRemoval(run.run_id, run.agent_id, run.version,
                                           approval_ids, approval_ids, RunState.CANCELLED,
                                           [cancelled])], now, 3600)
    claimed = store.claim_outbox(time.time(), time.time() + 30)
    assert [e.type for e in claimed] == ["run.cancelled"]
    data = json.loads(claimed[0].payload)["data"]
    assert (data["status"], data["reason"], data["run_id"]) == ("CANCELLED",
                                                                "session deleted", run.run_id)
