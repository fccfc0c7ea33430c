"""Under gunicorn's gevent worker, the per-event and per-run bookkeeping never yields.

gevent's lock yields to the hub when a non-blocking acquire fails, and the standard library
tests locks that way (`Thread.is_alive`, `Condition.notify` on a plain lock, a semaphore's
release). Each such yield in the hot path let other greenlets run in the middle of a model
turn: under load a fast turn outlived its batch window and paid for one more commit. These
run in a child process that gevent patched, as the worker is, and count switches of
greenlets; no timing is measured.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.servers import ROOT

SWITCHES = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()

    import time

    import greenlet
    import gevent

    from app.runtime.batching import Flusher
    from app.runtime.executor import RunExecutor

    switches = []
    greenlet.settrace(lambda event, args: switches.append(event)
                      if event in ("switch", "throw") else None)

    class Idle:
        def flush_due(self):
            pass

    flusher, idle = Flusher(), Idle()
    later = time.monotonic() + 3600
    flusher.watch(idle, later)  # starts the flusher's thread: that may switch
    gevent.sleep(0.01)
    switches.clear()
    for _ in range(200):
        flusher.watch(idle, later)
    print("watch", len(switches))

    executor = RunExecutor(store=None, max_runs=3, lease_seconds=30, sweep_interval=3600)
    executor.ensure_background()  # starts the lease thread,
    gevent.sleep(0.01)
    executor.ensure_background()  # then finds it running
    ran = []
    switches.clear()
    for _ in range(3):
        executor.reserve()
    try:
        executor.reserve()
    except Exception as exc:
        print("busy", type(exc).__name__)
    for _ in range(3):
        executor.release()
    executor.reserve()
    executor.submit("run-1", lambda: ran.append(1))
    print("bookkeeping", len(switches))
    executor.shutdown(wait=True)
    print("ran", ran)
""")


def test_emitting_reserving_and_submitting_never_yield_to_the_hub():
    out = subprocess.run([sys.executable, "-c", SWITCHES], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split("\n")
    assert out[:4] == ["watch 0", "busy ExecutorBusy", "bookkeeping 0", "ran [1]"]


REUSE = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()

    import contextvars
    import gc
    import weakref

    import gevent

    from app.runtime.executor import RunExecutor

    executor = RunExecutor(store=None, max_runs=4, lease_seconds=30, sweep_interval=3600)
    seen = contextvars.ContextVar("seen", default="fresh")
    greenlets, contexts = set(), []

    def work():
        greenlets.add(id(gevent.getcurrent()))
        contexts.append(seen.get())
        seen.set("left by a run")
        gevent.sleep(0.001)

    for _ in range(20):  # one after another: the same greenlet serves them all
        executor.reserve()
        executor.submit("run", work)
        gevent.sleep(0.02)
    print("sequential", len(greenlets), sorted(set(contexts)))
    greenlets.clear()
    for _ in range(4):  # at once: one greenlet each
        executor.reserve()
        executor.submit("run", work)
    gevent.sleep(0.05)
    print("parallel", len(greenlets))

    class Session:
        pass

    session = Session()
    held = weakref.ref(session)
    executor.reserve()
    executor.submit("run", lambda kept=session: gevent.sleep(0.001))
    del session
    gevent.sleep(0.02)
    gc.collect()
    print("last run kept", held() is not None)
    executor.shutdown(wait=True)
    try:
        executor.submit("run", work)
    except RuntimeError:
        print("closed")

""")


def test_run_loops_reuse_their_greenlets_with_a_fresh_context():
    """A greenlet per run mapped and unmapped the interpreter's frame stack each time; the
    pool keeps finished ones for the next run, which still starts in an empty context, and a
    waiting greenlet keeps nothing of its last run alive."""
    out = subprocess.run([sys.executable, "-c", REUSE], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split("\n")
    assert out[:4] == ["sequential 1 ['fresh']", "parallel 4", "last run kept False",
                       "closed"], out
