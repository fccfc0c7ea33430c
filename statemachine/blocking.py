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
        return self._threads().apply(context.run, (call,))

    def _threads(self) -> Any:
        if self._pool is None or self._pid != os.getpid():
            with self._lock:
                if self._pool is None or self._pid != os.getpid():
                    from gevent.threadpool import ThreadPool

                    self._pool, self._pid = ThreadPool(self.size), os.getpid()
        return self._pool
