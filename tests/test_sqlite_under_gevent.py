"""Under gevent, SQLite's hot-path calls run on the worker's own thread and never block it.

They use connections without a busy handler or automatic checkpoints (see `sqlite_store`):
a write lock held by another process is waited out with cooperative sleeps (the worker's
other greenlets keep running meanwhile), a lock held past the store's budget is
StoreUnavailable, as in an OS thread, and checkpoints are made in the OS threads, so the WAL
stays bounded. Each case runs in a child process that gevent patched, as the worker is; the
lock is held by another process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.servers import ROOT

PRELUDE = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()

    import os, subprocess, sys, time, uuid

    import gevent

    from statemachine.errors import StoreUnavailable
    from statemachine.sqlite_store import SqliteRunStore
    from statemachine.states import RunState
    from statemachine.store import Commit, StoredRun

    PATH, HOLD, BUDGET = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    store = SqliteRunStore(PATH, busy_timeout=BUDGET)

    def new_run(doc_bytes=0):
        run_id, now = uuid.uuid4().hex, time.time()
        doc = {"run_id": run_id, "agent_id": "a", "agent_name": "A", "session_id": "s",
               "padding": "x" * doc_bytes}
        run = StoredRun(run_id=run_id, agent_id="a", session_id="s", user_id=None,
                        state=RunState.RUNNING, version=1, created_at=now, updated_at=now,
                        doc=doc)
        store.create_run(run, [{"event": "RunStarted"}])
        return store.get_run(run_id)

    def pause(run):
        return store.commit(Commit(run_id=run.run_id, expected_version=run.version,
                                   state=RunState.PAUSED, doc=run.doc, now=time.time(),
                                   events=[{"event": "RunPaused"}]))

    ticks = []
    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)
""")

LOCKED = PRELUDE + textwrap.dedent("""
    run = new_run()
    blocker = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\\n"
        "db.execute('BEGIN IMMEDIATE'); print('locked', flush=True)\\n"
        "time.sleep(float(sys.argv[2])); db.execute('COMMIT')\\n"), PATH, str(HOLD)],
        stdout=subprocess.PIPE, text=True)
    assert blocker.stdout.readline() == "locked\\n"
    gevent.spawn(ticker)
    started = time.monotonic()
    try:
        pause(run)
        outcome = "committed"
    except StoreUnavailable:
        outcome = "unavailable"
    waited = time.monotonic() - started
    during = [t for t in ticks if started <= t <= started + waited]
    print(outcome, round(waited, 1), len(during) >= waited / 0.01 * 0.5)
    print("state", store.get_run(run.run_id).state.value)
    blocker.wait(10)
""")

CHECKPOINTS = PRELUDE + textwrap.dedent("""
    for _ in range(1500):
        pause(new_run(doc_bytes=8000))
    gevent.sleep(0.5)  # the last checkpoint, in an OS thread
    print("wal MB", os.path.getsize(PATH + "-wal") / 2**20)
""")


def run_child(script: str, *args: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          check=True).stdout.splitlines()


def test_a_write_lock_held_elsewhere_is_waited_out_while_the_worker_runs_on(tmp_path):
    out = run_child(LOCKED, str(tmp_path / "runs.db"), "1.0", "5")
    outcome, waited, ticked = out[0].split()
    assert outcome == "committed" and 0.8 <= float(waited) < 3 and ticked == "True"
    assert out[1] == "state PAUSED"


def test_a_write_lock_held_past_the_budget_is_unavailable_and_writes_nothing(tmp_path):
    out = run_child(LOCKED, str(tmp_path / "runs.db"), "2.0", "0.4")
    outcome, waited, ticked = out[0].split()
    assert outcome == "unavailable" and 0.3 <= float(waited) < 1.5 and ticked == "True"
    assert out[1] == "state RUNNING"


def test_checkpoints_are_made_so_the_wal_stays_bounded(tmp_path):
    """1,500 creates and pauses of runs with 8 KB documents: without a checkpoint that
    catches up, the WAL grew to 130 MB; it is reused after each one, and stayed at 12 to 18
    MB (its size is the most it held between two restarts)."""
    out = run_child(CHECKPOINTS, str(tmp_path / "runs.db"), "0", "5")
    assert out[0].startswith("wal MB ") and float(out[0].split()[2]) < 45
