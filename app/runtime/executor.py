"""Runs agent loops off the request thread, renews their leases, and sweeps runs others lost.

One RunExecutor per process. A run keeps executing when its client disconnects because the
request only follows the store's event log; the loop itself runs here. A background thread
renews the leases of the runs this process executes and, at a slower pace, calls the sweep
(lapsed leases of dead workers, expired pauses, retention), so no separate daemon is needed.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from statemachine.blocking import ProcessThread, gevent_active
from statemachine.errors import StoreUnavailable
from statemachine.store import RunStore

log = logging.getLogger(__name__)


class ExecutorBusy(Exception):
    """Every execution slot of this process is taken (HTTP 503, retry later)."""


class ShuttingDown(ExecutorBusy):
    """This process is stopping and takes no new runs (HTTP 503, retry: another worker will)."""


class _Greenlets:
    """Run loops in greenlets that stay for the next run (under gevent), with a pool's
    `submit` and `shutdown`.

    The slots already bound how many execute. A greenlet started for every run cost more than
    much of the run's own Python: each new greenlet maps a 16 KiB chunk for the interpreter's
    frames and its end unmaps it (two system calls and the page faults of a fresh mapping, dear
    on a virtual machine), about 8% of a worker's CPU per request (`bench.ab`, README). A
    finished loop's greenlet waits for the next run instead, up to `KEEP_IDLE` of them, holding
    nothing of the last one; each run gets an empty `contextvars` context, as a new greenlet
    would. Runs are handed over on gevent's own queue, whose `put` never yields (the
    switch-counting test holds `submit` to that); a pool of gevent-patched threads would add a
    future and a semaphore per run besides."""

    KEEP_IDLE = 64
    """The most greenlets kept waiting for a run (each keeps its 16 KiB chunk of frames, some
    20 KB in all); more start when needed, and those beyond this many end with their run."""

    def __init__(self) -> None:
        from gevent import spawn_raw
        from gevent.event import Event
        from gevent.queue import Queue

        self._spawn = spawn_raw
        self._tasks: Queue = Queue()
        self._idle = 0  # greenlets waiting with no run handed to them yet
        self._running = 0
        self._drained = Event()
        self._drained.set()
        self._closed = False

    def submit(self, function: Callable[..., None], *args: object) -> None:
        if self._closed:
            raise RuntimeError("cannot run new loops after shutdown")
        self._running += 1
        self._drained.clear()
        if self._idle:
            self._idle -= 1  # a waiting greenlet takes it
        else:
            self._spawn(self._serve)
        self._tasks.put((function, args))

    def _serve(self) -> None:
        """One greenlet's life: runs, one after another, while it is wanted."""
        while True:
            task = self._tasks.get()
            if task is None:
                return
            function, args = task
            try:
                contextvars.Context().run(function, *args)
            finally:
                # a waiting greenlet holds nothing of its last run (its session, its events)
                task = function = args = None
                self._running -= 1
                if not self._running:
                    self._drained.set()
            if self._closed or self._idle >= self.KEEP_IDLE:
                return
            self._idle += 1

    def shutdown(self, wait: bool = True) -> None:
        self._closed = True
        for _ in range(self._idle):
            self._tasks.put(None)
        self._idle = 0
        if wait:
            self._drained.wait()


def _run_pool(max_runs: int) -> ThreadPoolExecutor | _Greenlets:
    """Where run loops execute: greenlets under gevent, else a pool of OS threads."""
    if gevent_active():
        return _Greenlets()
    return ThreadPoolExecutor(max_workers=max_runs, thread_name_prefix="run")


def new_owner_id() -> str:
    """Identifies this process as a lease holder, across hosts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class RunExecutor:
    """A bounded pool of run loops plus the lease-renewal and sweep thread.

    `sweep` is set by whoever owns the runs (the service) once it exists.
    """

    def __init__(
        self,
        store: RunStore,
        *,
        max_runs: int,
        lease_seconds: float,
        sweep_interval: float,
    ) -> None:
        self.store = store
        self.owner = new_owner_id()
        self.lease_seconds = lease_seconds
        self.sweep: Callable[[], None] | None = None
        self.on_change: Callable[[int], None] | None = None  # told the runs executing here
        self._sweep_interval = sweep_interval
        self._max_runs = max_runs
        self._free_slots = max_runs  # counted under `_lock`: a semaphore's release yields
        self._pool = _run_pool(max_runs)
        # run_id -> executions of it in this process: a finishing execution only takes its
        # own count away, so it never drops the lease renewal of a newer one of the same run.
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = ProcessThread(self._background, "lease-and-sweep")
        self.draining = False

    def reserve(self) -> None:
        """Take an execution slot before committing a run to execute here."""
        if self.draining:
            raise ShuttingDown()
        with self._lock:
            if self._free_slots == 0:
                raise ExecutorBusy()
            self._free_slots -= 1

    def release(self) -> None:
        """Give back a slot reserved for a commit that did not happen."""
        with self._lock:
            if self._free_slots == self._max_runs:
                raise ValueError("an execution slot was released more often than reserved")
            self._free_slots += 1

    @property
    def free_slots(self) -> int:
        """Slots neither reserved nor executing."""
        with self._lock:
            return self._free_slots

    def submit(self, run_id: str, work: Callable[[], None]) -> None:
        """Run `work` for `run_id` in a reserved slot, renewing its lease meanwhile."""
        self.ensure_background()
        with self._lock:
            self._active[run_id] = self._active.get(run_id, 0) + 1
        self._changed()
        self._pool.submit(self._run, run_id, work)

    def _run(self, run_id: str, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:
            log.exception("run %s: execution ended with an unexpected error", run_id)
        finally:
            self._done(run_id)
            self.release()
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            with self._lock:
                executing = len(self._active)
            self.on_change(executing)

    def _done(self, run_id: str) -> None:
        with self._lock:
            left = self._active.get(run_id, 0) - 1
            if left > 0:
                self._active[run_id] = left
            else:
                self._active.pop(run_id, None)

    def active(self) -> list[str]:
        with self._lock:
            return sorted(self._active)

    def ensure_background(self) -> None:
        """Start the renewal/sweep thread in this process (again after a fork or its end);
        every run started calls this, so a living thread costs a comparison."""
        self._thread.ensure()

    def _background(self) -> None:
        renew_every = max(0.2, self.lease_seconds / 3)
        next_sweep = 0.0
        while not self._stop.wait(min(renew_every, self._sweep_interval)):
            self._renew()
            if self.sweep is not None and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self._sweep_interval
                self._safely(self.sweep)

    def _renew(self) -> None:
        ids = self.active()
        if ids:
            until = time.time() + self.lease_seconds
            self._safely(lambda: self.store.renew_leases(self.owner, ids, until))

    @staticmethod
    def _safely(step: Callable[[], None]) -> None:
        try:
            step()
        except StoreUnavailable as exc:
            log.warning("background step skipped, store unavailable: %s", exc)
        except Exception:
            log.exception("background step failed")

    def drain(self, seconds: float, poll: float = 0.1) -> list[str]:
        """Take no new runs; wait up to `seconds` for the executing ones to pause or end.

        Returns the runs still executing then: the caller abandons them (see the service).
        Their loops go on meanwhile, committing as usual, and the lease thread renews them.
        """
        self.draining = True
        until = time.monotonic() + seconds
        while self.active() and time.monotonic() < until:
            time.sleep(min(poll, max(0.0, until - time.monotonic())))
        return self.active()

    def shutdown(self, wait: bool = True) -> None:
        self._stop.set()
        self._pool.shutdown(wait=wait)
