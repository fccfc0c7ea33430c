"""N concurrent continues of one paused run, across threads and processes: exactly one wins.

What races is the server's own `RunService.continue_run` (the code a request runs), not a copy
of its logic. Each round, 16 threads of this process and 4 worker processes (each with its own
app, executor and store connection) are released together by one barrier onto the same PAUSED
`confirm-agent` run and call `continue_run` with a confirmation. The winner's process executes
the run (its tool, logged by `DEMO_TOOL_LOG`); every loser must be refused by the machine.
Odd rounds are lockstep: the store each contender uses holds it, after its first read of the
run, until every contender has read, so all 20 commit on the same version and the
compare-and-set alone must pick the winner.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from app import create_app
from app.runtime.service import RunAccess
from statemachine.errors import InvalidTransition, StaleRun
from statemachine.redis_store import RedisRunStore
from statemachine.sqlite_store import SqliteRunStore
from statemachine.states import RunState
from tests.servers import wait_until

ROUNDS = 60
LONG_ROUNDS = 200
THREADS = 16
PROCESSES = 4
CONTENDERS = THREADS + PROCESSES
WAIT = 30  # seconds: the bound on every barrier and queue wait
AGENT = "confirm-agent"
TOOLS = [{"tool_call_id": "call_1_1", "confirmed": True}]

WON = "won"
REFUSED = frozenset({"run is already continued", "run is already running",
                     "run is already completed"})


# -- the store every contender uses: the real one, which can hold a contender in lockstep ----


class LockstepStore:
    """The real store; a contender that `arm`s it waits on the barrier after its first read.

    It also notes whether the contender's commit lost a compare-and-set. Everything else is
    the wrapped store itself.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._local = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def arm(self, barrier: Any | None) -> None:
        self._local.barrier, self._local.lost = barrier, False

    def lost(self) -> bool:
        return getattr(self._local, "lost", False)

    def get_run(self, run_id: str):
        run = self._store.get_run(run_id)
        self._lockstep()
        return run

    def read_run(self, run_id: str, **what):
        read = self._store.read_run(run_id, **what)
        self._lockstep()
        return read

    def _lockstep(self) -> None:
        """Every contender has read the run before any of them decides on it (or, for one
        that decides on the copy its process kept of the pause, before it commits)."""
        barrier = getattr(self._local, "barrier", None)
        if barrier is not None:
            self._local.barrier = None
            barrier.wait(WAIT)

    def commit(self, commit):
        self._lockstep()
        try:
            return self._store.commit(commit)
        except StaleRun:
            self._local.lost = True
            raise


# -- one contender --------------------------------------------------------------------------


def open_store(spec: tuple[str, str, str | None]):
    kind, location, prefix = spec
    if kind == "sqlite":
        return SqliteRunStore(location)
    return RedisRunStore(location, prefix=prefix)


def contend(app, run_id: str, lockstep) -> tuple[str, bool]:
    """One call of the service's continue; its outcome and whether it lost a compare-and-set."""
    agentos = app.extensions["agentos"]
    agentos.store.arm(lockstep)
    try:
        agentos.service.continue_run(RunAccess(agent_id=AGENT, run_id=run_id), TOOLS)
        outcome = WON
    except InvalidTransition as exc:
        outcome = exc.sentence
    except Exception as exc:  # reported to the test as a wrong outcome
        outcome = repr(exc)
    return outcome, agentos.store.lost()


def is_lockstep(round_: int) -> bool:
    return round_ % 2 == 1


def race_all(app, run_ids: list[str], barrier) -> list[tuple[str, bool]]:
    """Contend in every round, starting each round together with all other contenders."""
    outcomes = []
    for round_, run_id in enumerate(run_ids):
        barrier.wait(WAIT)
        outcomes.append(contend(app, run_id, barrier if is_lockstep(round_) else None))
    return outcomes


def server_app(store):
    return create_app({"STORE": LockstepStore(store), "SWEEP_INTERVAL_SECONDS": 3600,
                       "MAX_RUNS_PER_PROCESS": 64})


def worker(spec, tool_log: str, run_ids: queue.Queue, results: queue.Queue, barrier) -> None:
    """A long-lived contender process with its own app and store."""
    os.environ["DEMO_TOOL_LOG"] = tool_log
    store = open_store(spec)
    app = server_app(store)
    try:
        results.put(("ready", None))
        outcomes = race_all(app, run_ids.get(timeout=WAIT), barrier)
        app.extensions["agentos"].executor.shutdown(wait=True)
        results.put(("outcomes", outcomes))
    finally:
        store.close()


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def spec(store, store_kind, request) -> tuple[str, str, str | None]:
    """How another process opens the same store as the `store` fixture."""
    if store_kind == "sqlite":
        return ("sqlite", store.path, None)
    return ("redis", request.getfixturevalue("redis_url"), store.keys.prefix)


@pytest.fixture
def tool_log(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "tools.log"
    monkeypatch.setenv("DEMO_TOOL_LOG", str(path))
    return path


class Workers:
    """PROCESSES worker processes, started once, sharing one barrier with the test's threads."""

    def __init__(self, spec, tool_log: Path) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        self.barrier = ctx.Barrier(CONTENDERS)
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.processes = [
            ctx.Process(target=worker, daemon=True,
                        args=(spec, str(tool_log), self.tasks, self.results, self.barrier))
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
            kind, outcomes = self.results.get(timeout=WAIT * 4)
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
def workers(spec, tool_log):
    started = Workers(spec, tool_log)
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def paused_runs(app, count: int) -> list[str]:
    """`count` confirm-agent runs, created and paused by the service itself."""
    service = app.extensions["agentos"].service
    ids = [service.create_run(AGENT, f"m{i}", None, None).run_id for i in range(count)]
    store = app.extensions["agentos"].store
    wait_until(lambda: all(store.get_run(r).state is RunState.PAUSED for r in ids),
               timeout=60, what="the runs to pause")
    return ids


# -- the race -------------------------------------------------------------------------------


def race(store, workers, tool_log: Path, rounds: int) -> None:
    app = server_app(store)
    try:
        run_ids = paused_runs(app, rounds)
        workers.start(run_ids)
        with ThreadPoolExecutor(THREADS) as pool:
            threads = [pool.submit(race_all, app, run_ids, workers.barrier)
                       for _ in range(THREADS)]
            per_contender = [f.result(timeout=WAIT * 4) for f in threads]
        per_contender += workers.outcomes()
        app.extensions["agentos"].executor.shutdown(wait=True)
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)
    rounds_seen = list(zip(*per_contender, strict=True))
    assert len(rounds_seen) == rounds
    wrong = [Counter(o for o, _ in outcomes) for outcomes in rounds_seen
             if sum(o == WON for o, _ in outcomes) != 1
             or not all(o == WON or o in REFUSED for o, _ in outcomes)]
    assert wrong == []
    lockstep = [sum(lost for _, lost in outcomes) for round_, outcomes in
                enumerate(rounds_seen) if is_lockstep(round_)]
    assert lockstep == [CONTENDERS - 1] * (rounds // 2)  # every loser lost at the CAS
    executed = Counter(line.split()[0] for line in tool_log.read_text().splitlines())
    assert executed == dict.fromkeys(run_ids, 1)  # each tool ran exactly once
    for run_id in run_ids:
        assert store.get_run(run_id).state is RunState.COMPLETED
        assert [e.name for e in store.read_events(run_id)].count("RunContinued") == 1


def test_exactly_one_continue_wins_each_round(store, workers, tool_log):
    race(store, workers, tool_log, ROUNDS)


@pytest.mark.long
def test_exactly_one_continue_wins_each_of_many_rounds(store, workers, tool_log):
    race(store, workers, tool_log, LONG_ROUNDS)

