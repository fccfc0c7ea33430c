"""Issue 2: N concurrent continues of one paused run, across threads and processes; one wins.

Each round, 16 threads of this process and 4 worker processes (each with its own store
connection) are released together by one barrier onto the same PAUSED run. Every contender
reads the run, asks the machine, and commits with the version it read; a loser of the
compare-and-set re-reads and must then be refused by the machine. Odd rounds are lockstep:
a second barrier holds everyone until all have read, so all 20 commit on the same version and
the compare-and-set alone must pick the winner.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from statemachine.errors import InvalidTransition, StaleRun
from statemachine.machine import decide
from statemachine.redis_store import RedisRunStore
from statemachine.sqlite_store import SqliteRunStore
from statemachine.states import RunState, Trigger
from statemachine.store import Commit, StoredRun

ROUNDS = 200
THREADS = 16
PROCESSES = 4
CONTENDERS = THREADS + PROCESSES
WAIT = 30  # seconds: the bound on every barrier and queue wait

WON = "won"
REFUSED = "run is already continued"
STALE = "stale"


# -- one contender --------------------------------------------------------------------------


def open_store(spec: tuple[str, str, str | None]):
    kind, location, prefix = spec
    if kind == "sqlite":
        return SqliteRunStore(location)
    return RedisRunStore(location, prefix=prefix)


def try_continue(store, run: StoredRun) -> str:
    """One attempt: decide on what was read, then compare-and-set on the version read."""
    try:
        state = decide(run.state, Trigger.CONTINUE, admin_pending=run.admin_pending)
    except InvalidTransition as exc:
        return exc.sentence
    commit = Commit(run_id=run.run_id, expected_version=run.version, state=state, doc=run.doc,
                    now=time.time(), events=[{"event": "RunContinued"}])
    try:
        store.commit(commit)
    except StaleRun:
        return STALE
    return WON


def contend(store, run_id: str, lockstep=None) -> tuple[str, bool]:
    """The outcome of one contender, and whether it lost a compare-and-set on the way.

    With a `lockstep` barrier, wait after reading until every contender has read.
    """
    run = store.get_run(run_id)
    if lockstep is not None:
        lockstep.wait(WAIT)
    first = try_continue(store, run)
    if first != STALE:
        return first, False
    return try_continue(store, store.get_run(run_id)), True


def is_lockstep(round_: int) -> bool:
    return round_ % 2 == 1


def race_all(store, run_ids: list[str], barrier) -> list[tuple[str, bool]]:
    """Contend in every round, starting each round together with all other contenders."""
    outcomes = []
    for round_, run_id in enumerate(run_ids):
        barrier.wait(WAIT)
        try:
            outcomes.append(contend(store, run_id, barrier if is_lockstep(round_) else None))
        except Exception as exc:  # reported to the test as a wrong outcome
            outcomes.append((repr(exc), False))
    return outcomes


def worker(spec, run_ids: queue.Queue, results: queue.Queue, barrier) -> None:
    """A long-lived contender process with its own store."""
    store = open_store(spec)
    try:
        results.put(("ready", None))
        results.put(("outcomes", race_all(store, run_ids.get(timeout=WAIT), barrier)))
    finally:
        store.close()


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def spec(store, store_kind, request) -> tuple[str, str, str | None]:
    """How another process opens the same store as the `store` fixture."""
    if store_kind == "sqlite":
        return ("sqlite", store.path, None)
    return ("redis", request.getfixturevalue("redis_url"), store.keys.prefix)


class Workers:
    """PROCESSES worker processes, started once, sharing one barrier with the test's threads."""

    def __init__(self, spec) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        self.barrier = ctx.Barrier(CONTENDERS)
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.processes = [
            ctx.Process(target=worker, args=(spec, self.tasks, self.results, self.barrier),
                        daemon=True)
            for _ in range(PROCESSES)
        ]
        for process in self.processes:
            process.start()

    def wait_ready(self) -> None:
        for _ in self.processes:
            assert self.results.get(timeout=WAIT) == ("ready", None)

    def start(self, run_ids: list[str]) -> None:
        for _ in self.processes:
            self.tasks.put(run_ids)

    def outcomes(self) -> list[list[tuple[str, bool]]]:
        collected = []
        for _ in self.processes:
            kind, outcomes = self.results.get(timeout=WAIT * 2)
            assert kind == "outcomes"
            collected.append(outcomes)
        return collected

    def stop(self) -> None:
        self.barrier.abort()
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
        for channel in (self.tasks, self.results):
            channel.close()
            channel.join_thread()


@pytest.fixture
def workers(spec):
    started = Workers(spec)
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def paused_runs(store, count: int) -> list[str]:
    now = time.time()
    ids = []
    for i in range(count):
        run_id = f"race-{i:03d}"
        doc = {"run_id": run_id, "agent_id": "agent-a", "agent_name": "Agent A",
               "session_id": "s1"}
        store.create_run(StoredRun(run_id=run_id, agent_id="agent-a", session_id="s1",
                                   user_id=None, state=RunState.PAUSED, version=1,
                                   created_at=now + i, updated_at=now, doc=doc,
                                   paused_at=now), [{"event": "RunPaused"}])
        ids.append(run_id)
    return ids


# -- the race -------------------------------------------------------------------------------


def test_exactly_one_continue_wins_each_round(store, workers):
    run_ids = paused_runs(store, ROUNDS)
    workers.start(run_ids)
    with ThreadPoolExecutor(THREADS) as pool:
        threads = [pool.submit(race_all, store, run_ids, workers.barrier)
                   for _ in range(THREADS)]
        per_contender = [f.result(timeout=WAIT * 2) for f in threads] + workers.outcomes()
    rounds = list(zip(*per_contender, strict=True))
    assert len(rounds) == ROUNDS
    results = [Counter(result for result, _ in outcomes) for outcomes in rounds]
    assert [r for r in results if r != {WON: 1, REFUSED: CONTENDERS - 1}] == []
    stale = [sum(lost for _, lost in outcomes) for outcomes in rounds]
    lockstep = [n for round_, n in enumerate(stale) if is_lockstep(round_)]
    assert lockstep == [CONTENDERS - 1] * (ROUNDS // 2)  # every loser lost at the CAS
    for run_id in run_ids:
        run = store.get_run(run_id)
        assert (run.state, run.version) == (RunState.CONTINUED, 2)
        assert [e.name for e in store.read_events(run_id)] == ["RunPaused", "RunContinued"]
