"""What a page of `GET /sessions` costs as the number of stored sessions grows, on both stores.

Sessions are stored through the store's own `create_session` (the path `POST /sessions`
takes), a tenth of them for one user and one agent; then pages of 20 are read through the
Flask app (newest first, by `updated_at`, one user's, one agent's and one user's with one
agent) and the median time of a page is printed per store and size. A flat row is the claim
"a page costs the page, not the number of stored sessions".

    .venv/bin/python -m bench.sessions_listing [--sizes 1000,10000,50000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from app import create_app
from statemachine.redis_store import RedisRunStore
from statemachine.sqlite_store import SqliteRunStore
from statemachine.store import StoredSession
from tests.servers import RedisServer

QUERIES = {
    "newest": "/sessions?limit=20",
    "by updated_at": "/sessions?limit=20&sort_by=updated_at",
    "one user": "/sessions?limit=20&user_id=u-bench",
    "one agent": "/sessions?limit=20&component_id=chat-agent",
    "user+agent": "/sessions?limit=20&user_id=u-bench&component_id=chat-agent",
    "page 20": "/sessions?limit=20&page=20",
}
READS = 30


def fill(store, upto: int, have: int) -> None:
    """Store sessions `have`..`upto`; every tenth is u-bench's with chat-agent."""
    base = time.time() - upto
    for index in range(have, upto):
        mine = index % 10 == 0
        store.create_session(StoredSession(
            session_id=f"s-{index}", agent_id="chat-agent" if mine else "confirm-agent",
            user_id="u-bench" if mine else f"u-{index}", created_at=base + index,
            updated_at=base + index, name=f"session {index}"))


def page_ms(client, path: str) -> float:
    samples = []
    for _ in range(READS):
        started = time.perf_counter()
        answer = client.get(path)
        samples.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200 and len(answer.json["data"]) == 20, answer.json
    return statistics.median(samples)


def run(kind: str, store, sizes: list[int]) -> None:
    app = create_app({"STORE": store})
    client = app.test_client()
    have = 0
    try:
        for size in sizes:
            started = time.perf_counter()
            fill(store, size, have)
            have = size
            filled = time.perf_counter() - started
            row = "  ".join(f"{name} {page_ms(client, path):6.2f}"
                            for name, path in QUERIES.items())
            print(f"{kind:6} {size:>7} sessions (stored in {filled:5.1f}s)  ms/page: {row}",
                  flush=True)
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    for kind, store in _each():
        run(kind, store, sizes)
    return 0


def _each():
    """Each store in turn (a fresh SQLite file, then a private redis-server), each closed
    before the next opens."""
    with _sqlite() as store:
        yield "sqlite", store
    with _redis() as store:
        yield "redis", store


@contextmanager
def _sqlite():
    with tempfile.TemporaryDirectory(prefix="bench-sessions-") as directory:
        yield SqliteRunStore(str(Path(directory) / "bench.db"))


@contextmanager
def _redis():
    server = RedisServer().start()
    try:
        yield RedisRunStore(server.url, prefix=f"bench-{uuid.uuid4().hex[:8]}")
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
