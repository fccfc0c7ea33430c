"""The request body arrives whole within a bound, or the request is refused before the app.

gunicorn hands the application a body that reads lazily from the socket, and a body shorter
than its Content-Length (the client hung up) reads as a smaller one: parsed as it stands, a
half-sent create would make a run. This middleware reads the whole body first, within
`REQUEST_TIMEOUT_SECONDS` from the first byte read, and only a body that arrived complete
reaches Flask:

- too slow: 408 `REQUEST_TIMEOUT` and the connection is closed;
- ended early: dropped (nothing is parsed, nothing written; the client is gone, so the 400
  that is sent reaches no one) and the connection is closed;
- larger than MAX_CONTENT_LENGTH (declared): left to Flask, which answers 413 unread.

The bound is kept by a watchdog that shuts the socket's reading side once it is due, so a
client that trickles one byte at a time is cut as surely as a silent one; the worker serves
other requests meanwhile (a greenlet waits under gevent, one thread under gthread). One
watchdog thread per process keeps every request's bound (a heap of due times, checked at
least every `_WATCH_SLICE` seconds), so a request costs a heap entry, not a timer thread.
Headers are bounded by gunicorn itself (see the README's deployment section).
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_WATCH_SLICE = 0.05  # how late, at most, the watchdog shuts a socket past its bound


class _Late(Exception):
    """The body did not arrive within the bound."""


class _Cut(Exception):
    """The body ended before its Content-Length: the client hung up."""


def _declared_length(environ: dict[str, Any]) -> int | None:
    raw = environ.get("CONTENT_LENGTH") or ""
    try:
        return int(raw) if raw.strip() else None
    except ValueError:
        return None


def _shut_reading(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


class _Watchdog:
    """Shuts the reading side of each watched socket at its due time unless released first.

    Entries are released lazily (their socket slot emptied): with one bound for every
    request they come due in the order they were made, so the heap holds at most the
    requests of one bound's span and the thread wakes a bounded number of times a second.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._heap: list[tuple[float, int, list[Any]]] = []
        self._count = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, sock: Any, seconds: float) -> list[Any]:
        entry = [sock]
        with self._changed:
            self._start()
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._count), entry))
            if self._heap[0][2] is entry:
                self._changed.notify()
        return entry

    @staticmethod
    def release(entry: list[Any]) -> None:
        entry[0] = None

    def _start(self) -> None:
        if self._pid != os.getpid():  # first use, or a forked child: the thread is not here
            self._pid, self._heap = os.getpid(), []
            self._thread = threading.Thread(target=self._loop, daemon=True, name="intake")
            self._thread.start()

    def _loop(self) -> None:
        while True:
            for sock in self._due():
                _shut_reading(sock)

    def _due(self) -> list[Any]:
        """Wait for the next due entry; the sockets of the due entries not released."""
        with self._changed:
            while True:
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    sock = heapq.heappop(self._heap)[2][0]
                    if sock is not None:
                        due.append(sock)
                if due:
                    return due
                wait = self._heap[0][0] - now if self._heap else None
                self._changed.wait(None if wait is None else max(wait, _WATCH_SLICE))


_WATCHDOG = _Watchdog()


class BodyIntake:
    """WSGI middleware: read the body completely within `timeout` seconds, or answer for it."""

    def __init__(self, wsgi_app: Callable, *, timeout: float, max_length: int) -> None:
        self.wsgi_app = wsgi_app
        self.timeout = timeout
        self.max_length = max_length

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        length = _declared_length(environ)
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not chunked and (not length or length > self.max_length):
            return self.wsgi_app(environ, start_response)
        try:
            body = self._read(environ, length)
        except _Late:
            log.info("request body not complete after %.1fs: 408", self.timeout)
            return _refuse(start_response, "408 Request Timeout", "REQUEST_TIMEOUT",
                           f"The request body did not arrive within {self.timeout:g} seconds")
        except _Cut as exc:
            log.info("request body ended early (%s); dropped unparsed", exc)
            return _refuse(start_response, "400 Bad Request", "BAD_REQUEST",
                           "The request body ended before its Content-Length")
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.wsgi_app(environ, start_response)

    def _read(self, environ: dict[str, Any], length: int | None) -> bytes:
        """The whole body (a chunked one up to one byte past the limit, for Flask's 413)."""
        stream = environ["wsgi.input"]
        sock = environ.get("gunicorn.socket")
        limit = length if length is not None else self.max_length + 1
        started = time.monotonic()
        watched = _WATCHDOG.watch(sock, self.timeout) if sock else None
        try:
            body = self._drain(stream, limit, sock)
            if length is not None and len(body) < length:
                raise _Cut(f"{len(body)} of {length} bytes")
        except _Cut:
            if time.monotonic() - started >= self.timeout:
                raise _Late() from None
            raise
        finally:
            if watched is not None:
                _WATCHDOG.release(watched)
        return body

    @staticmethod
    def _drain(stream: Any, limit: int, sock: Any) -> bytes:
        parts, got = [], 0
        while got < limit:
            try:
                data = stream.read(min(_CHUNK, limit - got))
            except (OSError, ValueError) as exc:
                if sock is None:
                    raise
                raise _Cut(str(exc) or type(exc).__name__) from None
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)


def _refuse(start_response: Callable, status: str, code: str, detail: str) -> list[bytes]:
    """The JSON error shape, and no keep-alive: the connection's input is unusable now."""
    body = json.dumps({"detail": detail, "error_code": code}).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))), ("Connection", "close")])
    return [body]
