"""The RunStore contract, one suite run against both stores through the `store` fixture."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from contextlib import closing

import pytest

from statemachine.errors import (
    ApprovalAlreadyResolved,
    ApprovalNotFound,
    ApprovalStillPending,
    RunNotFound,
    StaleRun,
    StoreUnavailable,
)
from statemachine.redis_store import RedisRunStore
from statemachine.sqlite_store import SqliteRunStore
from statemachine.states import RunState
from statemachine.store import (
    Approval,
    ApprovalQuery,
    Commit,
    CommitResult,
    Remember,
    RunQuery,
    StoredRun,
)
from tests.conftest import ALL_STORE_KINDS
from tests.indexes import index_mentions
from tests.servers import free_port, wait_until

AGENT = "agent-a"
RUNNING, PAUSED, CONTINUED = RunState.RUNNING, RunState.PAUSED, RunState.CONTINUED
COMPLETED, CANCELLED = RunState.COMPLETED, RunState.CANCELLED


@pytest.fixture(params=ALL_STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The contract holds on SQLite, one Redis server and a Redis Cluster alike."""
    return request.param


# -- helpers ------------------------------------------------------------------------------


def new_run(
    run_id: str | None = None,
    *,
    agent_id: str = AGENT,
    session_id: str = "s1",
    user_id: str | None = None,
    state: RunState = RUNNING,
    created_at: float | None = None,
    **lifecycle: float | str | None,
) -> StoredRun:
    """A StoredRun as the runtime would create it; `lifecycle` sets the lease/pause fields."""
    run_id = run_id or uuid.uuid4().hex
    now = time.time() if created_at is None else created_at
    doc = {"run_id": run_id, "agent_id": agent_id, "agent_name": "Agent A",
           "session_id": session_id}
    return StoredRun(run_id=run_id, agent_id=agent_id, session_id=session_id, user_id=user_id,
                     state=state, version=1, created_at=now, updated_at=now, doc=doc,
                     **lifecycle)


def ev(name: str, **fields) -> dict:
    return {"event": name, **fields}


def create(store, run: StoredRun | None = None, *events: dict) -> StoredRun:
    """Store `run` (a fresh one by default) with `events`; return it as read back."""
    run = run or new_run()
    store.create_run(run, list(events))
    return store.get_run(run.run_id)


def advance(store, run: StoredRun, state: RunState, *events: dict, **fields) -> CommitResult:
    """Commit `state` on top of the version `run` was read at, keeping its document."""
    fields.setdefault("now", time.time())
    fields.setdefault("doc", run.doc)
    return store.commit(Commit(run_id=run.run_id, expected_version=run.version, state=state,
                               events=list(events), **fields))


def approval(run: StoredRun, approval_id: str | None = None,
             created_at: float | None = None) -> Approval:
    approval_id = approval_id or uuid.uuid4().hex
    doc = {"id": approval_id, "run_id": run.run_id, "session_id": run.session_id,
           "agent_id": run.agent_id, "user_id": run.user_id,
           "approval_type": "required", "tool_name": "send",
           "created_at": int(created_at or time.time())}
    return Approval(approval_id=approval_id, run_id=run.run_id, status="pending", doc=doc)


def paused_with_approvals(store, count: int = 1, now: float | None = None,
                          **run_fields) -> tuple[StoredRun, list[str]]:
    """A run paused by a commit (at `now`) that creates `count` pending approvals."""
    now = time.time() if now is None else now
    run = create(store, new_run(**run_fields))
    approvals = [approval(run, created_at=now) for _ in range(count)]
    advance(store, run, PAUSED, ev("RunPaused"), approvals=approvals, now=now, paused_at=now)
    return store.get_run(run.run_id), [a.approval_id for a in approvals]


def resolved(store, approval_id: str, status: str = "approved") -> Approval:
    """The stored approval with a resolution filled in (not yet written)."""
    found = store.get_approval(approval_id)
    found.status = status
    found.resolution_data = {"note": "fine"}
    found.resolved_by = "admin"
    found.resolved_at = int(time.time())
    return found


def resolve(store, approval_id: str, status: str = "approved") -> CommitResult:
    pending = resolved(store, approval_id, status)
    version = store.get_run(pending.run_id).version
    return store.resolve_approval(pending, version, time.time())


def seqs(events) -> list[int]:
    return [e.seq for e in events]


def listed(store, **query) -> list[str]:
    return [r.run_id for r in store.list_runs(RunQuery(agent_id=AGENT, **query))]


def approvals_listed(store, **query) -> tuple[list[str], int]:
    found, total = store.list_approvals(ApprovalQuery(**query))
    return [a.approval_id for a in found], total


# -- create_run, get_run ------------------------------------------------------------------


def test_create_run_starts_at_version_one(store):
    run = new_run(user_id="u1", lease_owner="w1", lease_until=time.time() + 30)
    result = store.create_run(run, [ev("RunStarted"), ev("RunContent", content="a"),
                                    ev("RunContent", content="b")])
    assert result == CommitResult(version=1, seqs=[1, 2, 3])
    got = store.get_run(run.run_id)
    assert (got.agent_id, got.session_id, got.user_id) == (AGENT, "s1", "u1")
    assert (got.state, got.version, got.last_seq, got.doc) == (RUNNING, 1, 3, run.doc)
    assert (got.admin_pending, got.pending_approvals) == (False, 0)
    assert (got.lease_owner, got.lease_until, got.paused_at) == ("w1", run.lease_until, None)
    assert got.created_at == pytest.approx(run.created_at)
    events = store.read_events(run.run_id)
    assert seqs(events) == [1, 2, 3]
    assert [e.name for e in events] == ["RunStarted", "RunContent", "RunContent"]
    assert events[2].data == {"event": "RunContent", "content": "b"}


def test_create_run_with_a_taken_id_is_stale_and_changes_nothing(store):
    t0 = time.time()
    first = create(store, new_run("r1", created_at=t0), ev("RunStarted"))
    create(store, new_run("r2", created_at=t0 + 1))
    duplicate = new_run("r1", session_id="other", state=PAUSED, created_at=t0 + 2)
    with pytest.raises(StaleRun):
        store.create_run(duplicate, [ev("Intruder"), ev("Intruder")])
    assert store.get_run("r1") == first
    assert [e.name for e in store.read_events("r1")] == ["RunStarted"]
    assert listed(store) == ["r2", "r1"]


def test_get_run_of_an_unknown_run(store):
    with pytest.raises(RunNotFound):
        store.get_run("nope")


# -- commit -------------------------------------------------------------------------------


def test_commit_bumps_the_version_and_appends_events(store):
    run = create(store, None, ev("RunStarted"), ev("RunContent"))
    now = time.time() + 5
    doc = {**run.doc, "content": "paused here"}
    result = advance(store, run, PAUSED, ev("RunContentCompleted"), ev("RunPaused"),
                     doc=doc, now=now, paused_at=now)
    assert result == CommitResult(version=2, seqs=[3, 4])
    got = store.get_run(run.run_id)
    assert (got.state, got.version, got.last_seq, got.doc) == (PAUSED, 2, 4, doc)
    assert got.updated_at == pytest.approx(now)
    assert got.paused_at == pytest.approx(now)
    assert advance(store, got, CONTINUED) == CommitResult(version=3, seqs=[])
    got = store.get_run(run.run_id)
    assert advance(store, got, COMPLETED, ev("RunCompleted")) == CommitResult(4, [5])
    assert seqs(store.read_events(run.run_id)) == [1, 2, 3, 4, 5]


def test_commit_always_writes_the_lease_and_pause_fields(store):
    run = create(store, new_run(lease_owner="w1", lease_until=time.time() + 30))
    advance(store, run, PAUSED, paused_at=123.5)
    got = store.get_run(run.run_id)
    assert (got.lease_owner, got.lease_until, got.paused_at) == (None, None, 123.5)
    advance(store, got, CONTINUED, lease_owner="w2", lease_until=456.25)
    got = store.get_run(run.run_id)
    assert (got.lease_owner, got.lease_until, got.paused_at) == ("w2", 456.25, None)


@pytest.mark.parametrize("skew", [-1, 1])
def test_commit_at_a_stale_version_writes_nothing(store, skew):
    run = create(store, None, ev("RunStarted"))
    advance(store, run, RUNNING, ev("RunContent"))
    before = store.get_run(run.run_id)
    stale = before.version + skew
    intruder = approval(before)
    with pytest.raises(StaleRun):
        store.commit(Commit(
            run_id=run.run_id, expected_version=stale, state=PAUSED, now=time.time(),
            doc={**run.doc, "content": "lost"}, events=[ev("RunPaused")],
            approvals=[intruder], paused_at=time.time(), retain_seconds=60,
        ))
    assert store.get_run(run.run_id) == before
    assert seqs(store.read_events(run.run_id)) == [1, 2]
    with pytest.raises(ApprovalNotFound):
        store.get_approval(intruder.approval_id)
    assert approvals_listed(store) == ([], 0)
    assert store.count_pending_approvals() == 0


def test_commit_to_an_unknown_run(store):
    with pytest.raises(RunNotFound):
        advance(store, new_run("ghost"), PAUSED, ev("RunPaused"))


# -- events -------------------------------------------------------------------------------


def test_read_events_after_a_seq_and_with_a_limit(store):
    run = create(store, None, *(ev("E", n=n) for n in range(1, 6)))
    assert seqs(store.read_events(run.run_id, after=2)) == [3, 4, 5]
    assert seqs(store.read_events(run.run_id, limit=2)) == [1, 2]
    assert seqs(store.read_events(run.run_id, after=2, limit=2)) == [3, 4]
    assert [e.data["n"] for e in store.read_events(run.run_id, after=3)] == [4, 5]
    assert store.read_events(run.run_id, after=5) == []
    assert store.read_events("nope") == []


def test_wait_events_returns_what_is_already_there(store):
    run = create(store, None, ev("RunStarted"), ev("RunContent"))
    assert seqs(store.wait_events(run.run_id, after=1, timeout=5)) == [2]


def test_wait_events_wakes_up_when_another_thread_commits(store):
    run = create(store, None, ev("RunStarted"))
    writer = threading.Timer(0.3, advance, args=(store, run, PAUSED, ev("RunPaused")))
    started = time.monotonic()
    writer.start()
    try:
        events = store.wait_events(run.run_id, after=1, timeout=3)
    finally:
        writer.join(5)
    elapsed = time.monotonic() - started
    assert [(e.seq, e.name) for e in events] == [(2, "RunPaused")]
    assert 0.25 <= elapsed < 1.5


def test_wait_events_times_out_empty(store):
    run = create(store, None, ev("RunStarted"))
    started = time.monotonic()
    assert store.wait_events(run.run_id, after=1, timeout=0.3) == []
    assert 0.25 <= time.monotonic() - started < 1.5


# -- listing ------------------------------------------------------------------------------


@pytest.fixture
def five_runs(store) -> list[str]:
    """Five runs of AGENT, oldest first, plus one of another agent that never shows."""
    t0 = time.time()
    specs = [("s1", "u1", RUNNING), ("s1", "u2", PAUSED), ("s2", "u1", CONTINUED),
             ("s2", "u1", COMPLETED), ("s1", "u1", PAUSED)]
    ids = []
    for i, (session_id, user_id, state) in enumerate(specs):
        run = new_run(f"run-{i}", session_id=session_id, user_id=user_id, state=state,
                      created_at=t0 + i)
        ids.append(create(store, run).run_id)
    create(store, new_run("other", agent_id="agent-b", session_id="s1", created_at=t0 + 9))
    return ids


def test_list_runs_newest_first(store, five_runs):
    assert listed(store) == five_runs[::-1]


@pytest.mark.parametrize(("query", "positions"), [
    ({"session_id": "s1"}, [4, 1, 0]),
    ({"session_id": "s2"}, [3, 2]),
    ({"user_id": "u1"}, [4, 3, 2, 0]),
    ({"user_id": "u3"}, []),
    ({"states": frozenset({PAUSED})}, [4, 1]),
    ({"states": frozenset({RUNNING, CONTINUED})}, [2, 0]),
    ({"states": frozenset({CANCELLED})}, []),
    ({"session_id": "s1", "user_id": "u1", "states": frozenset({PAUSED})}, [4]),
])
def test_list_runs_filters(store, five_runs, query, positions):
    assert listed(store, **query) == [five_runs[i] for i in positions]


def test_list_runs_pages(store, five_runs):
    newest_first = five_runs[::-1]
    pages = [listed(store, limit=2, offset=offset) for offset in (0, 2, 4, 6)]
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:], []]
    assert listed(store, user_id="u1", limit=2, offset=1) == [five_runs[3], five_runs[2]]


# -- approvals ----------------------------------------------------------------------------


def test_a_commit_creates_pending_approvals(store):
    run, (first, second) = paused_with_approvals(store, 2, user_id="u1")
    assert (run.state, run.admin_pending, run.pending_approvals) == (PAUSED, True, 2)
    got = store.get_approval(first)
    assert (got.approval_id, got.run_id, got.status) == (first, run.run_id, "pending")
    assert got.doc == approval(run, first, created_at=got.doc["created_at"]).doc
    assert (got.resolution_data, got.resolved_by, got.resolved_at) == (None, None, None)
    assert store.get_approval(second).status == "pending"
    with pytest.raises(ApprovalNotFound):
        store.get_approval("nope")


def test_list_and_count_approvals(store):
    """Approvals list newest first (by the commit that created them), filtered and paged."""
    t0 = time.time()
    first, (a1,) = paused_with_approvals(store, now=t0, user_id="u1", session_id="s1")
    _, (a2,) = paused_with_approvals(store, now=t0 + 1, user_id="u1", session_id="s1")
    _, (b1,) = paused_with_approvals(store, now=t0 + 2, user_id="u2", session_id="s2",
                                     agent_id="agent-b")
    resolve(store, a1)
    assert approvals_listed(store) == ([b1, a2, a1], 3)
    assert approvals_listed(store, status="pending") == ([b1, a2], 2)
    assert approvals_listed(store, status="approved") == ([a1], 1)
    assert approvals_listed(store, user_id="u1") == ([a2, a1], 2)
    assert approvals_listed(store, agent_id="agent-b") == ([b1], 1)
    assert approvals_listed(store, run_id=first.run_id) == ([a1], 1)
    assert approvals_listed(store, session_id="s2") == ([b1], 1)
    assert approvals_listed(store, user_id="u1", status="pending") == ([a2], 1)
    assert approvals_listed(store, limit=1, offset=1) == ([a2], 3)
    assert approvals_listed(store, offset=3) == ([], 3)
    assert store.count_pending_approvals() == 2
    assert store.count_pending_approvals(user_id="u1") == 1
    assert store.count_pending_approvals(user_id="u3") == 0


def test_resolve_approval_releases_the_guard(store):
    run, (first, second) = paused_with_approvals(store, 2)
    assert resolve(store, first) == CommitResult(version=run.version + 1, seqs=[])
    got = store.get_run(run.run_id)
    assert (got.version, got.pending_approvals, got.admin_pending) == (run.version + 1, 1, True)
    assert (got.state, got.doc, got.last_seq) == (PAUSED, run.doc, run.last_seq)
    done = store.get_approval(first)
    assert (done.status, done.resolution_data, done.resolved_by) == (
        "approved", {"note": "fine"}, "admin")
    assert isinstance(done.resolved_at, int) and isinstance(done.updated_at, int)
    resolve(store, second, "rejected")
    got = store.get_run(run.run_id)
    assert (got.version, got.pending_approvals, got.admin_pending) == (run.version + 2, 0, False)
    assert store.get_approval(second).status == "rejected"


def test_resolve_approval_twice(store):
    _, (approval_id,) = paused_with_approvals(store)
    resolve(store, approval_id)
    with pytest.raises(ApprovalAlreadyResolved) as caught:
        resolve(store, approval_id, "rejected")
    assert caught.value.status == "approved"
    assert store.get_approval(approval_id).status == "approved"


def test_resolve_approval_at_a_stale_version(store):
    run, (approval_id,) = paused_with_approvals(store)
    with pytest.raises(StaleRun):
        store.resolve_approval(resolved(store, approval_id), run.version - 1, time.time())
    assert store.get_run(run.run_id) == run
    assert store.get_approval(approval_id).status == "pending"


def test_resolve_approval_writes_the_runs_document_in_the_same_step(store):
    run, (approval_id,) = paused_with_approvals(store)
    decided = {**run.doc, "_decisions": {approval_id: {"status": "approved"}}}
    with pytest.raises(StaleRun):
        store.resolve_approval(resolved(store, approval_id), run.version - 1, time.time(),
                               run_doc=decided)
    assert store.get_run(run.run_id).doc == run.doc
    store.resolve_approval(resolved(store, approval_id), run.version, time.time(),
                           run_doc=decided)
    got = store.get_run(run.run_id)
    assert (got.doc, got.version, got.admin_pending) == (decided, run.version + 1, False)
    store.delete_approval(approval_id)
    assert store.get_run(run.run_id).doc == decided


def test_create_remembers_an_outcome_in_its_own_write(store):
    run = new_run()
    store.create_run(run, [ev("RunStarted")], remember=Remember("k1", {"after": 0}, 60))
    assert store.recall(run.run_id, "k1") == {"after": 0}
    assert store.recall(run.run_id, "k2") is None
    with pytest.raises(StaleRun):
        store.create_run(run, [ev("RunStarted")], remember=Remember("k2", {"after": 9}, 60))
    assert store.recall(run.run_id, "k2") is None
    assert [e.seq for e in store.read_events(run.run_id)] == [1]


def test_resolve_an_unknown_approval_or_run(store):
    run, (approval_id,) = paused_with_approvals(store)
    unknown = approval(run, "nope")
    with pytest.raises(ApprovalNotFound):
        store.resolve_approval(unknown, run.version, time.time())
    orphan = resolved(store, approval_id)
    orphan.run_id = "ghost"
    with pytest.raises(RunNotFound):
        store.resolve_approval(orphan, run.version, time.time())


def test_resolve_an_approval_through_another_run(store):
    run, (approval_id,) = paused_with_approvals(store)
    other = create(store)
    stray = resolved(store, approval_id)
    stray.run_id = other.run_id
    with pytest.raises(ApprovalNotFound):
        store.resolve_approval(stray, other.version, time.time())
    assert store.get_run(other.run_id) == other
    assert store.get_run(run.run_id) == run
    assert store.get_approval(approval_id).status == "pending"


def test_delete_approval(store):
    _, (approval_id,) = paused_with_approvals(store)
    with pytest.raises(ApprovalStillPending):
        store.delete_approval(approval_id)
    assert store.get_approval(approval_id).status == "pending"
    resolve(store, approval_id)
    store.delete_approval(approval_id)
    with pytest.raises(ApprovalNotFound):
        store.get_approval(approval_id)
    with pytest.raises(ApprovalNotFound):
        store.delete_approval(approval_id)
    assert approvals_listed(store) == ([], 0)


def test_expire_approvals_in_a_commit(store):
    run, ids = paused_with_approvals(store, 3)
    resolve(store, ids[0])
    run = store.get_run(run.run_id)
    advance(store, run, CANCELLED, ev("RunCancelled"), expire_approvals=ids, approval_ids=ids)
    got = store.get_run(run.run_id)
    assert (got.state, got.pending_approvals, got.admin_pending) == (CANCELLED, 0, False)
    assert [store.get_approval(i).status for i in ids] == ["approved", "expired", "expired"]
    with pytest.raises(ApprovalAlreadyResolved) as caught:
        resolve(store, ids[1])
    assert caught.value.status == "expired"
    assert store.count_pending_approvals() == 0


# -- leases and sweeps --------------------------------------------------------------------


def test_renew_leases_only_for_the_owner(store):
    now = time.time()
    mine = create(store, new_run(lease_owner="w1", lease_until=now + 5))
    theirs = create(store, new_run(lease_owner="w2", lease_until=now + 5))
    store.renew_leases("w1", [mine.run_id, theirs.run_id], now + 60)
    assert store.get_run(mine.run_id).lease_until == pytest.approx(now + 60)
    assert store.get_run(theirs.run_id) == theirs
    store.renew_leases("w1", [], now + 90)
    assert store.get_run(mine.run_id).lease_until == pytest.approx(now + 60)


def test_runs_with_lapsed_lease(store):
    now = time.time()
    lapsed = create(store, new_run(lease_owner="w1", lease_until=now - 10))
    create(store, new_run(lease_owner="w1", lease_until=now + 60))
    moved_on = create(store, new_run(lease_owner="w2", lease_until=now - 10))
    advance(store, moved_on, PAUSED, paused_at=now)
    assert store.runs_with_lapsed_lease(now) == [lapsed.run_id]
    store.renew_leases("w1", [lapsed.run_id], now + 60)
    assert store.runs_with_lapsed_lease(now) == []


def test_runs_with_lapsed_lease_limit(store):
    now = time.time()
    for _ in range(3):
        create(store, new_run(lease_owner="w1", lease_until=now - 10))
    assert len(store.runs_with_lapsed_lease(now, limit=2)) == 2


def test_runs_paused_before(store):
    now = time.time()
    old = create(store, new_run(state=PAUSED, paused_at=now - 100))
    create(store, new_run(state=PAUSED, paused_at=now))
    assert store.runs_paused_before(now - 50) == [old.run_id]
    advance(store, old, CONTINUED, lease_owner="w1", lease_until=now + 60)
    assert store.runs_paused_before(now - 50) == []


# -- idempotency, retention ---------------------------------------------------------------


def test_a_commit_remembers_an_outcome(store):
    run = create(store, new_run(state=PAUSED))
    assert store.recall(run.run_id, "k1") is None
    advance(store, run, CONTINUED, remember=Remember("k1", {"after": 3}, 60))
    assert store.recall(run.run_id, "k1") == {"after": 3}
    assert store.recall(run.run_id, "k2") is None
    assert store.recall("other-run", "k1") is None


def test_a_stale_commit_remembers_nothing(store):
    run = create(store, new_run(state=PAUSED))
    advance(store, run, CONTINUED, remember=Remember("k1", {"winner": True}, 60))
    with pytest.raises(StaleRun):
        advance(store, run, CONTINUED, remember=Remember("k1", {"winner": False}, 60))
    with pytest.raises(StaleRun):
        advance(store, run, CONTINUED, remember=Remember("k2", {"winner": False}, 60))
    assert store.recall(run.run_id, "k1") == {"winner": True}
    assert store.recall(run.run_id, "k2") is None


def test_a_remembered_outcome_expires(store):
    run = create(store, new_run(state=PAUSED))
    advance(store, run, CONTINUED, remember=Remember("k1", {"after": 1}, 1))
    assert store.recall(run.run_id, "k1") == {"after": 1}
    wait_until(lambda: store.recall(run.run_id, "k1") is None, 5, interval=0.1,
               what="the remembered outcome to expire")


def test_purge_finished(store, store_kind):
    run, (approval_id,) = paused_with_approvals(store)
    resolve(store, approval_id)
    run = store.get_run(run.run_id)
    alive = create(store, new_run(state=PAUSED, paused_at=time.time()))
    finished_at = time.time()
    advance(store, run, COMPLETED, ev("RunCompleted"), now=finished_at,
            approval_ids=[approval_id], retain_seconds=60)
    assert store.purge_finished(finished_at - 60) == 0
    assert set(listed(store)) == {run.run_id, alive.run_id}
    assert store.purge_finished(finished_at + 1) == 1
    assert listed(store) == [alive.run_id]
    assert store.purge_finished(finished_at + 1) == 0
    if store_kind.startswith("redis"):
        assert_expiring(store, run.run_id, approval_id, alive.run_id)
    else:
        assert_deleted(store, run.run_id, approval_id)
    assert store.get_run(alive.run_id).state is PAUSED


def test_purge_removes_every_index_entry_even_after_the_ttl(store, store_kind):
    """Retention leaves nothing behind, also when the TTL took the run's own keys first (on
    Redis the run hash is gone before purge runs, and purge must still find every entry)."""
    run, (first, second) = paused_with_approvals(store, 2, user_id="u1")
    resolve(store, first)
    run = store.get_run(run.run_id)
    finished_at = time.time()
    advance(store, run, CANCELLED, ev("RunCancelled"), now=finished_at, approval_ids=[first,
            second], expire_approvals=[second], retain_seconds=1)
    assert index_mentions(store, run.run_id, [first, second])
    if store_kind != "sqlite":
        wait_until(lambda: not store.redis.exists(store.keys.run(run.run_id)), 5,
                   interval=0.1, what="the TTL to remove the run hash")
    assert store.purge_finished(finished_at + 1) == 1
    assert index_mentions(store, run.run_id, [first, second]) == []
    assert listed(store) == [] and approvals_listed(store) == ([], 0)
    assert store.count_pending_approvals() == 0


def test_purge_keeps_a_run_whose_final_commit_lost(store):
    run = create(store, new_run(state=PAUSED, paused_at=time.time()))
    advance(store, run, CONTINUED, lease_owner="w1", lease_until=time.time() + 60)
    with pytest.raises(StaleRun):
        advance(store, run, CANCELLED, ev("RunCancelled"), retain_seconds=60)
    store.purge_finished(time.time() + 3600)
    assert listed(store) == [run.run_id]
    assert store.get_run(run.run_id).state is CONTINUED
    assert store.runs_with_lapsed_lease(time.time() + 120) == [run.run_id]


def assert_expiring(store: RedisRunStore, run_id: str, approval_id: str, alive_id: str):
    """Redis keeps a finished run's keys until their TTL runs out."""
    keys = store.keys
    for key in (keys.run(run_id), keys.events(run_id), keys.doc(run_id),
                keys.approval(run_id, approval_id)):
        assert 0 < store.redis.ttl(key) <= 60, key
    assert store.redis.ttl(keys.run(alive_id)) == -1


def assert_deleted(store: SqliteRunStore, run_id: str, approval_id: str):
    with pytest.raises(RunNotFound):
        store.get_run(run_id)
    assert store.read_events(run_id) == []
    with pytest.raises(ApprovalNotFound):
        store.get_approval(approval_id)


# -- unavailability -----------------------------------------------------------------------


def test_unreachable_redis_is_unavailable_at_once():
    store = RedisRunStore(f"redis://127.0.0.1:{free_port()}/0", prefix="unreachable",
                          socket_timeout=1.0)
    try:
        for call in (store.ping, lambda: store.get_run("r1"),
                     lambda: store.create_run(new_run(), [ev("RunStarted")])):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - started < 0.5
    finally:
        store.close()


def test_locked_sqlite_is_unavailable_after_busy_timeout(tmp_path):
    path = str(tmp_path / "locked.db")
    store = SqliteRunStore(path, busy_timeout=0.2)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        run = create(store, None, ev("RunStarted"))
        blocker.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            advance(store, run, PAUSED, ev("RunPaused"))
        assert 0.15 <= time.monotonic() - started < 2
        blocker.execute("ROLLBACK")
        assert store.get_run(run.run_id) == run
        advance(store, run, PAUSED, ev("RunPaused"))
    finally:
        blocker.close()
        store.close()


def test_a_new_sqlite_file_opened_while_another_holds_its_write_lock_waits_for_it(tmp_path):
    """The switch of a new file to WAL gets `database is locked` at once (no busy handler)
    where waiting could deadlock: two workers booting on one new file, one failed. The
    opening store waits the holder out instead, within its budget."""
    path = str(tmp_path / "new.db")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE placeholder (x)")
    holder.execute("BEGIN IMMEDIATE")
    releaser = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    releaser.start()
    started = time.monotonic()
    try:
        store = SqliteRunStore(path, busy_timeout=5.0)
        assert 0.25 <= time.monotonic() - started < 3
        run = create(store, None, ev("RunStarted"))
        assert store.get_run(run.run_id) == run
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
        store.close()
    finally:
        releaser.join()
        holder.close()


def _as_before_the_added_columns(path: str) -> None:
    """Make a store's file look like one from before the approvals' filter columns and the
    runs' `cancel_requested` and `commit_token` (what an upgrade opens)."""
    db = sqlite3.connect(path, isolation_level=None)
    for index in ("agent_id", "user_id", "session_id"):
        db.execute(f"DROP INDEX approvals_by_{index}")
    db.execute("DROP INDEX approvals_pending_by_user")
    for table, column in (("approvals", "agent_id"), ("approvals", "user_id"),
                          ("approvals", "session_id"), ("runs", "cancel_requested"),
                          ("runs", "commit_token")):
        db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    db.close()


def _columns(path: str, table: str) -> list[str]:
    with closing(sqlite3.connect(path)) as db:
        return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def test_an_old_file_gets_the_added_columns_once_though_another_process_adds_them_meanwhile(
        tmp_path):
    """Workers boot together on an upgraded file: one adds the columns while another has
    looked for them. The other waits for the first one's write and adds nothing twice."""
    path = str(tmp_path / "old.db")
    SqliteRunStore(path).close()
    _as_before_the_added_columns(path)
    assert "commit_token" not in _columns(path, "runs")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    for column in ("agent_id", "user_id", "session_id"):
        other.execute(f"ALTER TABLE approvals ADD COLUMN {column} TEXT")
    other.execute("ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0")
    other.execute("ALTER TABLE runs ADD COLUMN commit_token TEXT")
    committer = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    committer.start()
    try:
        store = SqliteRunStore(path, busy_timeout=5.0)
        run = create(store, None, ev("RunStarted"))
        assert store.get_run(run.run_id) == run
        store.close()
    finally:
        committer.join()
        other.close()
    runs, approvals = _columns(path, "runs"), _columns(path, "approvals")
    assert runs.count("commit_token") == 1 and runs.count("cancel_requested") == 1
    assert [approvals.count(c) for c in ("agent_id", "user_id", "session_id")] == [1, 1, 1]


def test_an_old_file_is_upgraded_on_open(tmp_path):
    path = str(tmp_path / "old.db")
    SqliteRunStore(path).close()
    _as_before_the_added_columns(path)
    store = SqliteRunStore(path)
    run = create(store, None, ev("RunStarted"))
    assert store.get_run(run.run_id) == run
    store.close()
    assert {"commit_token", "cancel_requested"} <= set(_columns(path, "runs"))
    assert {"agent_id", "user_id", "session_id"} <= set(_columns(path, "approvals"))
