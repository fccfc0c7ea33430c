"""The Redis indexes' own promises, on one server and on a cluster: hints written before a
commit survive readers until the commit lands, stale ones are removed by the reader that
meets them, values with separators cannot collide, and the shards spread the entries."""

from __future__ import annotations

import re
import time

import pytest

from statemachine.errors import StaleRun
from statemachine.keys import SHARDS, part, shard_of
from statemachine.redis_store import RedisRunStore
from statemachine.states import RunState
from statemachine.store import Commit
from tests.conftest import make_store
from tests.servers import RedisServer, no_redis
from tests.test_store_contract import (
    AGENT,
    advance,
    approvals_listed,
    create,
    listed,
    new_run,
    paused_with_approvals,
    resolve,
)

pytestmark = pytest.mark.redis
PAUSED, CONTINUED = RunState.PAUSED, RunState.CONTINUED


@pytest.fixture(params=["redis", "redis-cluster"])
def store(request, tmp_path):
    instance = make_store(request.param, request, tmp_path)
    yield instance
    instance.close()


def state_entry(store, run_id: str, state: RunState) -> float | None:
    return store.redis.zscore(store.keys.agent_state_runs(shard_of(run_id), AGENT, state.value),
                              run_id)


def test_a_hint_in_flight_survives_a_reader_until_its_commit_lands(store):
    run = create(store, new_run(state=PAUSED, paused_at=time.time()))
    commit = Commit(run_id=run.run_id, expected_version=run.version, state=CONTINUED,
                    doc=run.doc, now=time.time(), lease_owner="w1",
                    lease_until=time.time() + 60)
    store.index.hint_commit(commit)  # the writer has hinted, not yet committed
    assert listed(store, states=frozenset({CONTINUED})) == []
    assert state_entry(store, run.run_id, CONTINUED) is not None, "the reader kept the hint"
    store.commit(commit)
    assert listed(store, states=frozenset({CONTINUED})) == [run.run_id]
    assert state_entry(store, run.run_id, PAUSED) is None, "the commit removed the old entry"
    assert listed(store, states=frozenset({PAUSED})) == []


def test_a_reader_removes_the_hint_of_a_commit_that_lost(store):
    run = create(store, new_run(state=PAUSED, paused_at=time.time()))
    advance(store, run, CONTINUED, lease_owner="w1", lease_until=time.time() + 60)
    store.index.hint_commit(Commit(run_id=run.run_id, expected_version=run.version,
                                   state=RunState.CANCELLED, doc=run.doc, now=time.time()))
    assert listed(store, states=frozenset({RunState.CANCELLED})) == []
    assert state_entry(store, run.run_id, RunState.CANCELLED) is None


def test_values_with_separators_never_share_an_index(store):
    t0 = time.time()
    tricky = [("u:1", "s}{"), ("u", "1:s}{"), ("u%3A1", "s")]
    ids = [create(store, new_run(user_id=user, session_id=session, created_at=t0 + i)).run_id
           for i, (user, session) in enumerate(tricky)]
    assert listed(store, user_id="u:1") == [ids[0]]
    assert listed(store, user_id="u") == [ids[1]]
    assert listed(store, user_id="u%3A1") == [ids[2]]
    assert listed(store, session_id="s}{") == [ids[0]]
    assert part("a:b{c}%") == "a%3Ab%7Bc%7D%25"


def test_entries_spread_over_the_shards_and_pages_merge_them(store):
    t0 = time.time()
    ids = [create(store, new_run(f"spread-{i}", created_at=t0 + i)).run_id for i in range(40)]
    assert len({shard_of(run_id) for run_id in ids}) > SHARDS // 2
    newest = ids[::-1]
    assert [listed(store, limit=7, offset=o) for o in range(0, 40, 7)] == [
        newest[o:o + 7] for o in range(0, 40, 7)]


def test_approval_filters_combine_and_count(store):
    t0 = time.time()
    _, (a1,) = paused_with_approvals(store, now=t0, user_id="u1", session_id="s1")
    _, (a2,) = paused_with_approvals(store, now=t0 + 1, user_id="u1", session_id="s2")
    _, (b1,) = paused_with_approvals(store, now=t0 + 2, user_id="u2", session_id="s1")
    assert approvals_listed(store, user_id="u1", session_id="s1") == ([a1], 1)
    assert approvals_listed(store, status="pending", session_id="s1") == ([b1, a1], 2)
    assert approvals_listed(store, status="pending", user_id="u1", limit=1) == ([a2], 2)
    assert store.count_pending_approvals("u1") == 2


def test_the_sweep_reads_a_bounded_batch_of_each_shard(store):
    now = time.time()
    for i in range(30):
        create(store, new_run(f"lapsed-{i}", lease_owner="w1", lease_until=now - 100 + i))
    due = store.runs_with_lapsed_lease(now, limit=5)
    assert due == [f"lapsed-{i}" for i in range(5)], "oldest lease first, across shards"


def wait_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def test_a_state_change_waits_for_a_replica_on_the_cluster(redis_cluster, cluster_prefix):
    store = RedisRunStore(redis_cluster.url, prefix=cluster_prefix, cluster=True,
                          wait_replicas=1)
    try:
        run = create(store, new_run(state=PAUSED, paused_at=time.time()))
        node = store._node(store.keys.run(run.run_id))
        before = wait_calls(node)
        started = time.monotonic()
        advance(store, run, CONTINUED, lease_owner="w1", lease_until=time.time() + 60)
        assert time.monotonic() - started < 0.5, "the replica acknowledged at once"
        assert wait_calls(node) == before + 1
        assert store.get_run(run.run_id).state is CONTINUED
        checkpoint = store.get_run(run.run_id)
        advance(store, checkpoint, CONTINUED, reindex=False, lease_owner="w1",
                lease_until=time.time() + 60)
        assert wait_calls(node) == before + 1, "a checkpoint does not wait"
    finally:
        store.close()


def test_a_replica_that_does_not_answer_delays_but_never_fails_a_commit(
        redis_url, redis_prefix, caplog):
    store = RedisRunStore(redis_url, prefix=redis_prefix, socket_timeout=0.6, wait_replicas=1)
    try:
        run = create(store, new_run(state=PAUSED, paused_at=time.time()))
        advance(store, run, CONTINUED, lease_owner="w1", lease_until=time.time() + 60)
        assert store.get_run(run.run_id).state is CONTINUED
        assert "reached 0 of 1 replicas" in caplog.text
    finally:
        store.close()


def test_reindex_rebuilds_every_index_from_the_runs(store):
    from statemachine.reindex import reindex

    t0 = time.time()
    run, (a1, a2) = paused_with_approvals(store, 2, now=t0, user_id="u1", session_id="s1")
    resolve(store, a1)
    other = create(store, new_run(user_id="u2", state=RunState.RUNNING, created_at=t0 + 1,
                                  lease_owner="w1", lease_until=t0 - 5))

    def views() -> tuple:
        return (listed(store), listed(store, user_id="u1"),
                listed(store, states=frozenset({PAUSED})), approvals_listed(store),
                approvals_listed(store, status="pending"), store.count_pending_approvals(),
                store.runs_with_lapsed_lease(time.time()))

    before = views()
    assert before[0] == [other.run_id, run.run_id] and before[-1] == [other.run_id]
    store.redis.zadd(f"{store.keys.prefix}:approvals", {a1: t0})  # the old layout's keys
    store.redis.zadd(f"{store.keys.prefix}:agent-runs:{AGENT}", {run.run_id: t0})
    for key in list(store.redis.scan_iter(match=f"{store.keys.prefix}:{{idx-*")):
        store.redis.delete(key)
    assert views()[0] == []
    done = reindex(store, drop_legacy=True)
    assert done == {"runs": 2, "approvals": 2, "legacy_keys_dropped": 2}
    assert views() == before
    assert store.get_approval(a2).status == "pending"
    assert reindex(store) == {"runs": 2, "approvals": 2, "legacy_keys_dropped": 0}
    assert views() == before


def test_every_cluster_node_connection_honours_the_request_deadline(redis_cluster,
                                                                     cluster_prefix):
    from statemachine.redis_store import _DeadlineBound

    store = RedisRunStore(redis_cluster.url, prefix=cluster_prefix, cluster=True)
    try:
        store.ping()
        create(store, new_run())
        pools = [node.redis_connection.connection_pool for node in store.redis.get_nodes()
                 if node.redis_connection is not None]
        assert pools and all(issubclass(p.connection_class, _DeadlineBound) for p in pools)
        made = store.redis.nodes_manager.connection_kwargs["connection_class"]
        assert issubclass(made, _DeadlineBound), "nodes found later are bound too"
    finally:
        store.close()


def test_a_shard_holding_more_than_its_share_is_read_further(store):
    """Thirty runs in one shard and three elsewhere: deep pages still come out in order."""
    t0, ids, n = time.time(), [], 0
    while len(ids) < 30:
        n += 1
        if shard_of(f"crowd-{n}") == 0:
            ids.append(create(store, new_run(f"crowd-{n}", created_at=t0 + len(ids))).run_id)
    others = [create(store, new_run(f"lone-{s}", created_at=t0 + 100 + s)).run_id
              for s in range(3)]
    newest = others[::-1] + ids[::-1]
    for offset, limit in ((0, 5), (20, 5), (28, 10), (31, 3)):
        assert listed(store, offset=offset, limit=limit) == newest[offset:offset + limit]


def _calls(store, command: str) -> int:
    stats = store.redis.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0))


@pytest.fixture
def private_redis():
    """A redis-server of this test alone: its command counts are the test's own."""
    try:
        server = RedisServer().start()
    except FileNotFoundError:
        no_redis("Redis command count")
    yield server
    server.stop()


def test_a_page_reads_the_page_not_the_index(private_redis):
    """300 runs with an approval each: a page of 2 reads 2 runs and 2 approvals, a count
    reads none; what a listing reads does not grow with what is stored."""
    store = RedisRunStore(private_redis.url, prefix="pages")
    try:
        t0 = time.time()
        for index in range(300):
            paused_with_approvals(store, now=t0 + index, user_id=f"u{index % 3}")
        runs = _calls(store, "hgetall")
        assert len(listed(store, user_id="u1", limit=2)) == 2
        assert _calls(store, "hgetall") - runs == 2
        approvals = _calls(store, "hgetall")
        assert len(approvals_listed(store, status="pending", limit=2)[0]) == 2
        assert _calls(store, "hgetall") - approvals == 2
        counted = _calls(store, "hgetall")
        assert store.count_pending_approvals("u2") == 100
        assert _calls(store, "hgetall") == counted
    finally:
        store.close()


def test_readers_racing_writers_never_lose_an_entry(store):
    """While one thread moves 60 runs PAUSED -> CONTINUED, two others list both states as fast
    as they can (removing every stale entry they meet); afterwards each run is listed under
    its state, exactly once: no reader removed the hint of a commit on its way."""
    import threading

    t0 = time.time()
    runs = [create(store, new_run(f"race-{i}", state=PAUSED, paused_at=t0, created_at=t0 + i))
            for i in range(60)]
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            listed(store, states=frozenset({PAUSED}), limit=100)
            listed(store, states=frozenset({CONTINUED}), limit=100)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for run in runs:
            advance(store, run, CONTINUED, lease_owner="w1", lease_until=time.time() + 60)
    finally:
        done.set()
        for reader in readers:
            reader.join(10)
    ids = [r.run_id for r in runs]
    assert listed(store, states=frozenset({CONTINUED}), limit=100) == ids[::-1]
    assert listed(store, states=frozenset({PAUSED}), limit=100) == []
    assert listed(store, limit=100) == ids[::-1]


def _index_entries(store, run_id: str) -> dict[str, float]:
    """Every index sorted set `run_id` is in, with its score."""
    found = {}
    for key in store.redis.scan_iter(match=f"{store.keys.prefix}*", count=1000):
        if store.redis.type(key) == "zset":
            score = store.redis.zscore(key, run_id)
            if score is not None:
                found[key] = score
    return found


def test_bulk_create_stores_runs_as_create_run_does(store):
    t0 = time.time()
    one = new_run("one", session_id="s-one", state=PAUSED, created_at=t0, paused_at=t0)
    many = [new_run(f"bulk-{i}", session_id="s-bulk", state=PAUSED, created_at=t0 + 1 + i,
                    paused_at=t0 + 1 + i) for i in range(3)]
    event = {"event": "RunPaused"}
    store.create_run(one, [event])
    store.bulk_create([(run, [event]) for run in many])

    def shape(run_id: str) -> tuple:
        fields = store.redis.hgetall(store.keys.run(run_id))
        masked = {k: v for k, v in fields.items() if k not in {"run_id", "session_id",
                                                                 "created_at", "updated_at",
                                                                 "paused_at", "doc"}}
        entries = sorted(re.sub(r"\{idx-\d+\}", "{idx}", key).replace("s-one", "S")
                         .replace("s-bulk", "S") for key in _index_entries(store, run_id))
        events = [e.data for e in store.read_events(run_id)]
        return masked, entries, events

    assert all(shape(run.run_id) == shape(one.run_id) for run in many)
    assert listed(store, states=frozenset({PAUSED})) == [r.run_id for r in many[::-1]] + ["one"]
    assert listed(store, session_id="s-bulk") == [r.run_id for r in many[::-1]]
    with pytest.raises(StaleRun):
        store.bulk_create([(many[0], [event])])
