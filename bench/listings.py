"""Benchmark: what a page of runs or approvals costs, on each store, as the data grows.

Fills a fresh store through the RunStore API (so the same script measures any version of
the stores: run it with another checkout first on PYTHONPATH to get the "before" figures)
with APPROVALS paused runs of one approval each, and RUNS runs of one agent spread over 50
owners, then prints the median and p95 latency of:

- `GET /approvals?limit=1` (list_approvals limit=1, and the pending count),
- `GET /agents/{id}/runs?user_id=...` (list_runs of one owner, limit 20: a JWT user's list).

    python -m bench.listings [--approvals 10000] [--runs 20000] [--repeat 50] [--store redis]

Redis: a private redis-server (never a shared one) unless REDIS_URL is set; `--store
redis-cluster` needs REDIS_CLUSTER_URL (a node of a cluster you started).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

from statemachine.states import RunState
from statemachine.store import Approval, ApprovalQuery, Commit, RunQuery, StoredRun
from tests.servers import RedisServer

OWNERS = 50
AGENT = "bench-agent"


def _store(kind: str, workdir: str):
    if kind == "sqlite":
        from statemachine.sqlite_store import SqliteRunStore

        return SqliteRunStore(os.path.join(workdir, "bench.db")), None
    from statemachine.redis_store import RedisRunStore

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    if kind == "redis-cluster":
        return RedisRunStore(os.environ["REDIS_CLUSTER_URL"], prefix=prefix, cluster=True), None
    if os.environ.get("REDIS_URL"):
        return RedisRunStore(os.environ["REDIS_URL"], prefix=prefix), None
    server = RedisServer().start()
    return RedisRunStore(server.url, prefix=prefix), server


def _run(index: int, now: float, user: str) -> StoredRun:
    run_id = f"r{index:07d}-{uuid.uuid4().hex[:6]}"
    doc = {"run_id": run_id, "agent_id": AGENT, "session_id": f"s{index % 997}", "user_id": user}
    return StoredRun(run_id=run_id, agent_id=AGENT, session_id=doc["session_id"], user_id=user,
                     state=RunState.RUNNING, version=1, created_at=now + index * 1e-3,
                     updated_at=now, doc=doc)


def fill_approvals(store, count: int, now: float) -> None:
    for index in range(count):
        run = _run(index, now, f"u{index % OWNERS}")
        store.create_run(run, [])
        approval_id = uuid.uuid4().hex
        doc = {"id": approval_id, "run_id": run.run_id, "agent_id": AGENT,
               "user_id": run.user_id, "session_id": run.session_id, "status": "pending"}
        store.commit(Commit(run_id=run.run_id, expected_version=1, state=RunState.PAUSED,
                            doc=run.doc, now=run.created_at, paused_at=run.created_at,
                            approvals=[Approval(approval_id, run.run_id, "pending", doc)]))


def fill_runs(store, count: int, now: float) -> None:
    for index in range(count):
        store.create_run(_run(index, now, f"u{index % OWNERS}"), [])


def timed(call: Callable[[], object], repeat: int) -> str:
    call()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
    return f"median {statistics.median(samples):7.2f} ms   p95 {p95:7.2f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--approvals", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--store", choices=["sqlite", "redis", "redis-cluster"],
                        action="append")
    args = parser.parse_args(argv)
    for kind in args.store or ["sqlite", "redis"]:
        with tempfile.TemporaryDirectory() as workdir:
            store, server = _store(kind, workdir)
            try:
                bench(kind, store, args)
            finally:
                store.close()
                if server is not None:
                    server.stop()
    return 0


def bench(kind: str, store, args: argparse.Namespace) -> None:
    now = time.time()
    started = time.perf_counter()
    fill_approvals(store, args.approvals, now)
    print(f"[{kind}] {args.approvals} paused runs with one approval each, filled in "
          f"{time.perf_counter() - started:.1f} s")
    print(f"[{kind}]   GET /approvals?limit=1            "
          f"{timed(lambda: store.list_approvals(ApprovalQuery(limit=1)), args.repeat)}")
    print(f"[{kind}]   GET /approvals?status=pending&limit=20 "
          f"{timed(lambda: store.list_approvals(ApprovalQuery(status='pending')), args.repeat)}")
    print(f"[{kind}]   GET /approvals/count              "
          f"{timed(lambda: store.count_pending_approvals(), args.repeat)}")
    print(f"[{kind}]   GET /approvals/count?user_id=u7   "
          f"{timed(lambda: store.count_pending_approvals('u7'), args.repeat)}")
    started = time.perf_counter()
    fill_runs(store, args.runs, now + args.approvals)
    total = args.runs + args.approvals
    print(f"[{kind}] + {args.runs} runs ({total} runs of {AGENT}, {OWNERS} owners), filled in "
          f"{time.perf_counter() - started:.1f} s")
    query = RunQuery(agent_id=AGENT, user_id="u7", limit=20)
    print(f"[{kind}]   GET /agents/{AGENT}/runs?user_id=u7 (limit 20) "
          f"{timed(lambda: store.list_runs(query), args.repeat)}")
    paused = RunQuery(agent_id=AGENT, states=frozenset({RunState.PAUSED}), limit=20, offset=40)
    print(f"[{kind}]   GET /agents/{AGENT}/runs?status=PAUSED&page=3 "
          f"{timed(lambda: store.list_runs(paused), args.repeat)}")


if __name__ == "__main__":
    sys.exit(main())
