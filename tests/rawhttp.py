"""Many HTTP requests held open from one thread: raw sockets and a selector, no client library.

Used where a test needs hundreds of concurrent streams or deliberately slow uploads; each
connection records what arrived (status, `: ping` comments, event names) and when.
"""

from __future__ import annotations

import re
import selectors
import socket
import time
from dataclasses import dataclass, field

_EVENT = re.compile(rb"^event: (\w+)$", re.M)
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})")


def request_bytes(method: str, path: str, body: bytes = b"", *, length: int | None = None,
                  headers: dict[str, str] | None = None) -> bytes:
    """A complete request head (and `body`); `length` may claim more than `body` holds."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if method == "POST":
        lines += ["Content-Type: application/x-www-form-urlencoded",
                  f"Content-Length: {len(body) if length is None else length}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Exchange:
    """One connection: what was sent, what came back, and when."""

    sock: socket.socket
    opened: float = field(default_factory=time.monotonic)
    data: bytearray = field(default_factory=bytearray)
    headers_at: float | None = None
    closed_at: float | None = None

    @property
    def status(self) -> int | None:
        match = _STATUS.match(bytes(self.data))
        return int(match.group(1)) if match else None

    @property
    def pings(self) -> int:
        return self.data.count(b"\n: ping\n")

    @property
    def events(self) -> list[str]:
        return [name.decode() for name in _EVENT.findall(bytes(self.data))]

    @property
    def body(self) -> bytes:
        return bytes(self.data).split(b"\r\n\r\n", 1)[-1]

    def receive(self, chunk: bytes) -> None:
        self.data += chunk
        if self.headers_at is None and b"\r\n\r\n" in self.data:
            self.headers_at = time.monotonic()


def connect(port: int, payload: bytes) -> Exchange:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(payload)
    sock.setblocking(False)
    return Exchange(sock)


def pump(exchanges: list[Exchange], *, until, timeout: float, step: float = 0.2,
         feed=None) -> None:
    """Read every open connection until `until(exchanges)` is true, all closed, or `timeout`.

    `feed()`, when given, is asked on every round for new connections to add (a ramp); the
    pump goes on while it may still give some (it returns None once it is done).
    """
    selector = selectors.DefaultSelector()
    for exchange in exchanges:
        if exchange.closed_at is None:
            selector.register(exchange.sock, selectors.EVENT_READ, exchange)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if feed is not None:
                fresh = feed()
                if fresh is None:
                    feed = None
                for exchange in fresh or []:
                    exchanges.append(exchange)
                    selector.register(exchange.sock, selectors.EVENT_READ, exchange)
            if feed is None and (not selector.get_map() or until(exchanges)):
                break
            for key, _ in selector.select(step):
                _read(selector, key.data)
    finally:
        selector.close()


def ramp(port: int, payload: bytes, count: int, per_second: float):
    """A `feed` for `pump`: `count` connections, opened at `per_second`."""
    started, opened = time.monotonic(), 0

    def feed() -> list[Exchange] | None:
        nonlocal opened
        if opened >= count:
            return None
        due = min(count, int((time.monotonic() - started) * per_second) + 1)
        batch = [connect(port, payload) for _ in range(due - opened)]
        opened = due
        return batch

    return feed


def _read(selector: selectors.BaseSelector, exchange: Exchange) -> None:
    try:
        chunk = exchange.sock.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        chunk = b""
    if chunk:
        exchange.receive(chunk)
        return
    exchange.closed_at = time.monotonic()
    selector.unregister(exchange.sock)
    exchange.sock.close()


def close_all(exchanges: list[Exchange]) -> None:
    for exchange in exchanges:
        try:
            exchange.sock.close()
        except OSError:
            pass
