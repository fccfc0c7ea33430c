"""Scripts sent to one Redis server without redis-py's per-command layers.

Every request runs about three scripts, and redis-py spends more CPU around each than the
script costs: its command dispatch, retry wrapper and metrics recording, and its pool's check
that a connection taken from it has no unread data (a poll of the socket on every use). A
`ScriptRunner` keeps a few connections of the store's own pool checked out and reuses them:
the same connection class (TLS, unix socket, credentials, the request deadline), the same
retry policy and the same NOSCRIPT reload as redis-py's `Script`, minus that overhead. The
command is packed by hiredis in one C call (redis-py's packer checks and encodes its some
thirty arguments one by one in Python first).

A connection goes back to the idle list only after a call that read its whole reply; any
other ending (a timeout, a dropped socket, the greenlet killed mid-call) disconnects it, so
no reply can be read by the wrong call and the poll is not needed. Connections checked out
here count against the pool's bound like any other; beyond `IDLE_KEPT` idle ones, they go
back to the pool, where the blocking reads of open streams may take them.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, ResponseError

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis[hiredis] installs it; without it, redis-py's own packer
    _hiredis_pack = None

IDLE_KEPT = 16


def _send(conn: Any, *args: Any) -> None:
    """One command on `conn`. hiredis packs str, int, float and bytes exactly as redis-py
    does (a float as its repr); anything else it refuses is left to redis-py, whose answer
    to a bad argument (a bool, None: DataError) stays the one callers see."""
    if _hiredis_pack is not None:
        try:
            packed = _hiredis_pack(args)
        except TypeError:
            pass
        else:
            conn.send_packed_command([packed])
            return
    conn.send_command(*args)


class ScriptRunner:
    """EVALSHA (and on NOSCRIPT, SCRIPT LOAD then EVALSHA again) on reused connections."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        conn = self._take()
        try:
            out = conn.retry.call_with_retry(lambda: self._evalsha(conn, script, keys, args),
                                             lambda _error: conn.disconnect())
        except ResponseError:
            self._give(conn)  # the server answered: the connection read its whole reply
            raise
        except BaseException:
            conn.disconnect()
            self._give(conn)
            raise
        self._give(conn)
        return out

    @staticmethod
    def _evalsha(conn: Any, script: Script, keys: list[str], args: list[Any]) -> Any:
        _send(conn, "EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return conn.read_response()
        except NoScriptError:
            _send(conn, "SCRIPT", "LOAD", script.script)
            script.sha = conn.read_response()
            _send(conn, "EVALSHA", script.sha, len(keys), *keys, *args)
            return conn.read_response()

    def _take(self) -> Any:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's connections are not ours
                self._pid, self._idle = os.getpid(), []
            if self._idle:
                return self._idle.pop()
        return self._pool.get_connection()

    def _give(self, conn: Any) -> None:
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < IDLE_KEPT:
                self._idle.append(conn)
                return
        self._pool.release(conn)


class LeanScript:
    """A registered script called as redis-py's `Script` is, `(keys=, args=, client=)`: sent
    through the runner unless it is queued on a pipeline (`client`), which keeps its own."""

    def __init__(self, script: Script, runner: ScriptRunner) -> None:
        self.script = script
        self._runner = runner

    def __call__(self, keys: list[str], args: list[Any] | None = None,
                 client: Any = None) -> Any:
        if client is not None:
            return self.script(keys=keys, args=args or [], client=client)
        return self._runner.run(self.script, keys, args or [])
