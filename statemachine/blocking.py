"""Calls that block in C (sqlite3, a tool's own code) kept off gevent's hub.

Under gunicorn's gevent worker (sockets and threading monkey-patched) a call that blocks
without yielding, such as a SQLite lock wait or a CPU-bound tool, would freeze every request
of the worker. `Offload.run` sends such a call to a pool of real OS threads and waits for it
cooperatively; without gevent it simply calls. The calling context (the request's store
deadline, the tool's `current_call`) travels with the call.
"""

from __future__ import annotations

import contextvars
import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def gevent_active() -> bool:
    """True in a process whose sockets gevent has monkey-patched (gunicorn's gevent worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("socket"))


def native_lock() -> Any:
    """A lock of the operating system's threads, even where gevent patched `threading`: for
    code that runs in `Offload`'s real threads (a patched lock belongs to one thread's hub)."""
    try:
        from gevent.monkey import get_original
    except ImportError:  # no gevent: threading's lock is the native one
        return threading.Lock()
    return get_original("_thread", "allocate_lock")()


def _outcome(call: Callable[[], T]) -> tuple[bool, Any]:
    """The call's result or its exception, as a value: gevent's pool would print (as an
    unhandled error) every exception a task raises, domain errors like RunNotFound included."""
    try:
        return True, call()
    except BaseException as exc:  # re-raised, traceback and all, in the calling greenlet
        return False, exc


class Offload:
    """A lazily built pool of `size` OS threads per process (again after a fork)."""

    def __init__(self, size: int, name: str) -> None:
        self.size = max(1, size)
        self.name = name
        self._pool: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`function(*args, **kwargs)` in a real thread under gevent, else right here."""
        call = functools.partial(function, *args, **kwargs)
        if not gevent_active():
            return call()
        context = contextvars.copy_context()
        done, outcome = self._threads().apply(context.run, (_outcome, call))
        if not done:
            raise outcome
        return outcome

    def spawn(self, function: Callable[[], None]) -> None:
        """`function()` in one of the threads, not waited for (here and now without gevent);
        it reports its own failures, as nobody waits for them."""
        if not gevent_active():
            function()
            return
        self._threads().spawn(_outcome, function)

    def _threads(self) -> Any:
        if self._pool is None or self._pid != os.getpid():
            with self._lock:
                if self._pool is None or self._pid != os.getpid():
                    from gevent.threadpool import ThreadPool

                    self._pool, self._pid = ThreadPool(self.size), os.getpid()
        return self._pool


class ProcessThread:
    """One daemon thread per process running `target`: started by `ensure` if this process
    has none in `target` (the first call, after a fork, after `target` ended).

    A flag that the thread itself clears, not `Thread.is_alive()`: under gevent that call
    yields to the hub (gevent's lock sleeps when a non-blocking acquire fails), and `ensure`
    is called on hot paths (every emitted event, every run started)."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self._name = name
        self._running_in = 0  # the pid whose thread is in `target` (0: none)
        self._lock = threading.Lock()

    def ensure(self) -> None:
        if self._running_in == os.getpid():
            return
        with self._lock:
            if self._running_in != os.getpid():
                self._running_in = os.getpid()
                threading.Thread(target=self._run, daemon=True, name=self._name).start()

    def _run(self) -> None:
        try:
            self._target()
        finally:
            self._running_in = 0  # the next `ensure` starts another
