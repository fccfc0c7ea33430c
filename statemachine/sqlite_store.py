"""The embedded store: stdlib sqlite3 in WAL mode, every write one BEGIN IMMEDIATE transaction.

BEGIN IMMEDIATE takes the database's write lock before the version is read, so the compare
and the set cannot interleave with another process's; several gunicorn workers on one host may
share the file. A lock held past `busy_timeout` becomes StoreUnavailable (503), never a hang.

Under gevent, the calls of one run's hot path (create, read, commit, cancel, its events, leases)
run on the worker's own thread, on connections that never wait inside SQLite (no busy handler,
no automatic checkpoint): every wait for a lock is a cooperative sleep, and checkpoints are
made in the pool of OS threads. Each such call cost a hand-off to an OS thread and back, and
the thread then fought the worker for the interpreter while it held the file's write lock:
without them the create+continue loop at concurrency 16 answered 564 to 753 requests/s
instead of 380 to 403 (three alternated runs). Scans (listings, counts, purges, the outbox)
still run in the OS threads: their time grows with the data.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from statemachine import deadline
from statemachine.blocking import Offload, gevent_active, native_lock
from statemachine.errors import (
    ApprovalNotFound,
    ApprovalStillPending,
    CancelRequested,
    RunNotFound,
    SessionExists,
    SessionNotFound,
    SessionOwnedElsewhere,
    StaleRun,
    StoreUnavailable,
)
from statemachine.outbox import OutboxEntry, commit_entries, resolution_entry
from statemachine.states import RunState
from statemachine.store import (
    APPROVAL_EXPIRED,
    APPROVAL_PENDING,
    Approval,
    ApprovalQuery,
    Commit,
    CommitResult,
    Remember,
    RunQuery,
    RunRead,
    RunRemoval,
    SessionLink,
    SessionQuery,
    StoredEvent,
    StoredRun,
    StoredSession,
    dumps,
    lease_lapsed,
    loads,
    paused_before,
    resolve_outcome,
)

T = TypeVar("T")

log = logging.getLogger(__name__)
_POLL_SECONDS = 0.05

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    user_id TEXT,
    state TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    doc TEXT NOT NULL,
    pending_approvals INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    paused_at REAL,
    finished_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    commit_token TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_agent ON runs (agent_id, created_at DESC);
CREATE INDEX IF NOT EXISTS runs_by_user ON runs (agent_id, user_id, created_at DESC);
CREATE INDEX IF NOT EXISTS runs_by_agent_session ON runs (agent_id, session_id, created_at DESC);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (agent_id, state, created_at DESC);
CREATE INDEX IF NOT EXISTS runs_by_lease ON runs (lease_until) WHERE lease_until IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_by_pause ON runs (paused_at) WHERE paused_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_by_finish ON runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS approvals (
    approval_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    status TEXT NOT NULL,
    doc TEXT NOT NULL,
    resolution TEXT,
    created_at REAL NOT NULL,
    updated_at REAL,
    agent_id TEXT,
    user_id TEXT,
    session_id TEXT
);
CREATE INDEX IF NOT EXISTS approvals_by_time ON approvals (created_at DESC);
CREATE INDEX IF NOT EXISTS approvals_by_run ON approvals (run_id);
""" + "".join(
    f"CREATE INDEX IF NOT EXISTS approvals_by_{column} ON approvals "
    f"({column}, created_at DESC);\n"
    for column in ("status", "agent_id", "user_id", "session_id")
) + """
CREATE INDEX IF NOT EXISTS approvals_pending_by_user ON approvals (status, user_id);
CREATE INDEX IF NOT EXISTS runs_by_session ON runs (session_id, created_at);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    agent_id TEXT,
    user_id TEXT,
    name TEXT,
    first_message TEXT,
    session_state TEXT NOT NULL,
    metadata TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_created ON sessions (created_at, session_id);
CREATE INDEX IF NOT EXISTS sessions_by_updated ON sessions (updated_at, session_id);
CREATE INDEX IF NOT EXISTS sessions_by_user_created
    ON sessions (user_id, created_at, session_id);
CREATE INDEX IF NOT EXISTS sessions_by_user_updated
    ON sessions (user_id, updated_at, session_id);
CREATE INDEX IF NOT EXISTS sessions_by_agent_created
    ON sessions (agent_id, user_id, created_at, session_id);
CREATE INDEX IF NOT EXISTS sessions_by_agent_updated
    ON sessions (agent_id, user_id, updated_at, session_id);
CREATE INDEX IF NOT EXISTS sessions_by_agent_only_created
    ON sessions (agent_id, created_at, session_id);
CREATE INDEX IF NOT EXISTS sessions_by_agent_only_updated
    ON sessions (agent_id, updated_at, session_id);
CREATE TABLE IF NOT EXISTS deleted_runs (
    run_id TEXT PRIMARY KEY,
    deleted_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deleted_runs_by_time ON deleted_runs (deleted_at);
CREATE TABLE IF NOT EXISTS idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    entry_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    failed_at REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_at) WHERE failed_at IS NULL;
"""

_APPROVAL_FILTERS = ("status", "agent_id", "user_id", "run_id", "session_id")
_APPROVAL_COPIED = ("agent_id", "user_id", "session_id")
"""Approval columns copied from its document when it is created, so that filters use indexes."""

_RUN_COLUMNS = (
    "run_id, agent_id, session_id, user_id, state, version, created_at, updated_at, doc, "
    "pending_approvals, last_seq, lease_owner, lease_until, paused_at, cancel_requested, "
    "commit_token"
)
# Columns added after the first release: a database file made before them gets them on open.
_ADDED_RUN_COLUMNS = {
    "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
    "commit_token": "TEXT",
}


# sqlite3 blocks in C (a lock wait sleeps in the library): under gevent every call runs in one
# of these OS threads, so a lock held by another process never freezes the worker's requests.
_THREADS = Offload(int(os.environ.get("SQLITE_THREADS", "8") or 8), "sqlite")


_ON_WORKER_THREAD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sqlite_on_worker_thread", default=False)
_BEGIN_FIRST_PAUSE, _BEGIN_LONGEST_PAUSE = 0.0002, 0.0015
"""Seconds `_begin` waits (the upper end; the lower is half) after its first failed try, and
at most: see `_begin`."""
CHECKPOINT_EVERY = 200
"""Write transactions on the worker's thread between two checkpoints made in an OS thread
(a few pages each: about SQLite's own 1,000-page threshold)."""


def _guarded(method: Callable[..., T] | None = None, *,
             inline: bool = False) -> Callable[..., T]:
    """Turn a locked or unreadable database into StoreUnavailable (HTTP 503); `inline`: a
    short call by primary key, made on the worker's own thread under gevent.

    A call made once the request's store deadline has passed is refused before it starts.
    """

    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            deadline.check("sqlite")
            try:
                if inline and gevent_active():
                    return _on_worker_thread(method, *args, **kwargs)
                return _THREADS.run(method, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"sqlite: {exc}") from exc

        return wrapper

    return decorate if method is None else decorate(method)


def _on_worker_thread(method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`method` on this thread's connections, which never wait inside SQLite: a lock met
    (rare outside BEGIN IMMEDIATE in WAL mode) is waited out here, cooperatively, for up to
    the store's budget. A call that met one rolled back whatever it had begun."""
    store = args[0]
    wait = deadline.cap(store.busy_timeout)
    until = time.monotonic() + (store.busy_timeout if wait is None else wait)
    token = _ON_WORKER_THREAD.set(True)
    try:
        while True:
            try:
                return method(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() >= until:
                    raise
            time.sleep(random.uniform(0.0005, 0.0015))
    finally:
        _ON_WORKER_THREAD.reset(token)


def _run_from_row(row: sqlite3.Row) -> StoredRun:
    return StoredRun(
        run_id=row["run_id"],
        agent_id=row["agent_id"],
        session_id=row["session_id"],
        user_id=row["user_id"],
        state=RunState(row["state"]),
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        doc=loads(row["doc"]),
        admin_pending=row["pending_approvals"] > 0,
        pending_approvals=row["pending_approvals"],
        last_seq=row["last_seq"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        paused_at=row["paused_at"],
        cancel_requested=bool(row["cancel_requested"]),
        commit_token=row["commit_token"],
    )


def _stored_run(db: sqlite3.Connection, run_id: str) -> StoredRun:
    row = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        raise RunNotFound(run_id)
    return _run_from_row(row)


def _events_after(db: sqlite3.Connection, run_id: str, after: int,
                  limit: int) -> list[StoredEvent]:
    """The run's events after `after`, in order, at most `limit` (-1: all of them)."""
    rows = db.execute(
        "SELECT seq, data FROM events WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        (run_id, after, limit),
    ).fetchall()
    return [StoredEvent(seq=row["seq"], data=loads(row["data"])) for row in rows]


def _approval_from_row(row: sqlite3.Row) -> Approval:
    resolution = json.loads(row["resolution"]) if row["resolution"] else {}
    doc = json.loads(row["doc"])
    return Approval(
        approval_id=row["approval_id"],
        run_id=row["run_id"],
        status=row["status"],
        doc=doc,
        resolution_data=resolution.get("resolution_data"),
        resolved_by=resolution.get("resolved_by"),
        resolved_at=resolution.get("resolved_at"),
        updated_at=int(row["updated_at"]) if row["updated_at"] is not None else None,
    )


class SqliteRunStore:
    """RunStore on one SQLite file; one connection per thread, WAL, immediate transactions."""

    def __init__(self, path: str, *, busy_timeout: float = 5.0, outbox: bool = False) -> None:
        self.path = path
        self.outbox = outbox
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        # One writer of this process at a time: the file's write lock is then contended by
        # processes, not by every thread, and SQLite's busy back-off (sleeps of 1 to 100 ms
        # between tries) stays at its first, short steps instead of piling up on the tail.
        self._writer = native_lock()
        self._worker_dbs: dict[tuple[int, bool], sqlite3.Connection] = {}
        self._worker_writes, self._checkpointing = 0, False
        self._turn: tuple[int, Any] = (0, None)
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        """Create the schema; a file from before the columns added since gets them (the
        approvals' filter columns filled from each approval's document) before the indexes
        on them are made.

        Every worker does this as it boots, often at the same moment: the columns are looked
        for and added in one write transaction, so a worker never adds a column that another
        added after it looked (`duplicate column name`, and a worker that fails to boot)."""
        self._connection().executescript(
            SCHEMA.split("CREATE INDEX IF NOT EXISTS approvals_by_status")[0])
        with self._transaction() as db:
            self._add_missing_columns(db)
        self._connection().executescript(SCHEMA)

    @staticmethod
    def _add_missing_columns(db: sqlite3.Connection) -> None:
        columns = {row["name"] for row in db.execute("PRAGMA table_info(approvals)")}
        for column in _APPROVAL_COPIED:
            if column not in columns:
                db.execute(f"ALTER TABLE approvals ADD COLUMN {column} TEXT")
                db.execute(f"UPDATE approvals SET {column} = json_extract(doc, '$.{column}')")
        present = {row["name"] for row in db.execute("PRAGMA table_info(runs)")}
        for name, decl in _ADDED_RUN_COLUMNS.items():
            if name not in present:
                db.execute(f"ALTER TABLE runs ADD COLUMN {name} {decl}")

    def _connection(self, writer: bool = False) -> sqlite3.Connection:
        """This thread's connection for reads (SQLite's busy handler waits out a lock) or,
        with `writer`, for write transactions (no busy handler: `_begin` waits instead, so no
        statement inside the write lock changes the connection's settings). On the worker's
        own thread (see `_on_worker_thread`), one pair per process that never waits."""
        if _ON_WORKER_THREAD.get():
            return self._worker_connection(writer)
        return self._thread_connection(writer)

    def _thread_connection(self, writer: bool = False) -> sqlite3.Connection:
        name = "writer" if writer else "db"
        db = getattr(self._local, name, None)
        if db is None:
            db = self._open(busy_timeout=0 if writer else self.busy_timeout)
            setattr(self._local, name, db)
        return db

    def _worker_connection(self, writer: bool) -> sqlite3.Connection:
        """The worker thread's connections, shared by its greenlets: none yields between
        a BEGIN and its COMMIT (the writer's are behind `_writer`, its reads are one batch of
        statements), so their transactions never interleave."""
        key = (os.getpid(), writer)
        db = self._worker_dbs.get(key)
        if db is None:
            db = self._open(busy_timeout=0, checkpoints=False)
            self._worker_dbs = {**{k: v for k, v in self._worker_dbs.items()
                                   if k[0] == os.getpid()}, key: db}
        return db

    def _open(self, busy_timeout: float, checkpoints: bool = True) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                             check_same_thread=False)
        db.row_factory = sqlite3.Row
        self._use_wal(db)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        if not checkpoints:  # a checkpoint writes and syncs the file: see `_checkpoint`
            db.execute("PRAGMA wal_autocheckpoint=0")
        db.create_function("casefold_contains", 2, _casefold_contains, deterministic=True)
        with self._all_lock:
            self._all.append(db)
        return db

    def _use_wal(self, db: sqlite3.Connection) -> None:
        """Put the file in WAL mode, which it keeps: the first connection to a new file
        switches it, every later one only reads the mode.

        The switch needs the file to itself, and where waiting could deadlock (this
        connection reads while another holds the write lock) SQLite answers `database is
        locked` at once instead of calling the busy handler: two workers opening a new file
        together met that, and one failed to boot. So the switch is retried, within the
        busy budget, until this connection or another has made it."""
        until = time.monotonic() + max(self.busy_timeout, 1.0)
        while True:
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0] in ("wal", "memory"):
                    return  # switched already (an in-memory file has no WAL to switch to)
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode == "wal":
                    return
                failure = sqlite3.OperationalError(
                    f"{self.path} stays in journal mode {mode!r}, not WAL")
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
                failure = exc
            if time.monotonic() >= until:
                raise failure
            time.sleep(random.uniform(0.005, 0.025))

    def _checkpoint(self) -> None:
        """Copy the WAL back into the database file, in an OS thread.

        FULL, not PASSIVE: it keeps new writers out (they wait in `_begin`, as for any write
        lock) until every frame is copied, so the next write starts the WAL again from its
        beginning. A PASSIVE one, running beside writers that never pause, never caught up
        with them and the WAL grew without bound (130 MB in 3,000 writes)."""
        try:
            self._thread_connection().execute("PRAGMA wal_checkpoint(FULL)").fetchone()
        except sqlite3.Error as exc:
            log.warning("sqlite checkpoint skipped: %s", exc)
        finally:
            self._checkpointing = False

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction: committed whole, or rolled back whole.

        What a write encodes (documents, events) is encoded before it is called: the file's
        write lock is held by one process at a time, so its every microsecond is the whole
        machine's."""
        wait = deadline.cap(self.busy_timeout)
        if not self._take_writer(self.busy_timeout if wait is None else wait):
            raise sqlite3.OperationalError("database is locked (by this process's writers)")
        try:
            with self._transaction() as db:
                yield db
        finally:
            self._give_writer()
        if _ON_WORKER_THREAD.get():
            self._count_for_checkpoint()

    def _take_writer(self, seconds: float) -> bool:
        """This process's writer lock. The worker thread's greenlets queue for it in turn
        on a gevent semaphore (woken as it is released), then take the native lock, polling
        with cooperative sleeps in the rare case that an OS thread (a scan's write) holds it."""
        if not _ON_WORKER_THREAD.get():
            return self._writer.acquire(timeout=seconds)
        until = time.monotonic() + seconds
        turn = self._greenlets_turn()
        if not turn.acquire(timeout=seconds):
            return False
        while not self._writer.acquire(blocking=False):
            if time.monotonic() >= until:
                turn.release()
                return False
            time.sleep(random.uniform(0.0005, 0.0015))
        return True

    def _give_writer(self) -> None:
        self._writer.release()
        if _ON_WORKER_THREAD.get():
            self._greenlets_turn().release()

    def _greenlets_turn(self) -> Any:
        """The worker thread's queue for the writer lock (made in this process, under gevent:
        a store made before the fork, or before gevent patched, gets its own here)."""
        pid, turn = self._turn
        if pid != os.getpid():
            from gevent.lock import Semaphore

            pid, turn = self._turn = (os.getpid(), Semaphore())
        return turn

    def _count_for_checkpoint(self) -> None:
        """Every CHECKPOINT_EVERY writes, a checkpoint in an OS thread. Called once the
        write is committed: nothing here may fail it."""
        self._worker_writes += 1
        if self._worker_writes >= CHECKPOINT_EVERY and not self._checkpointing:
            self._worker_writes, self._checkpointing = 0, True
            try:
                _THREADS.spawn(self._checkpoint)
            except Exception as exc:  # noqa: BLE001 - the next write tries again
                self._checkpointing = False
                log.warning("sqlite checkpoint not started: %s", exc)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection(writer=True)
        self._begin(db)
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a COMMIT that failed (disk full) leaves it open
                db.execute("ROLLBACK")
            raise

    def _begin(self, db: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, tried again while another process holds the write lock, after
        0.1 to 0.2 ms at first and then twice as long each time, up to 0.75 to 1.5 ms, for no
        longer than the request's store budget (or `busy_timeout`).

        SQLite's own busy handler sleeps 1, 2, 5, 10 ... 100 ms between its tries: a writer
        that met the lock held for a millisecond often slept ten, most of a loaded tail. The
        writer connection has none, so this loop is the only wait. The other worker's commits
        hold the lock for a fraction of a millisecond, and with tries about every millisecond
        the machine was 11 to 15% idle under the create+continue loop (under 1% on Redis): the
        short first tries raised its rate by 4 to 8% in three alternated runs (`bench.ab
        --store sqlite`, README)."""
        wait = deadline.cap(self.busy_timeout)
        until = time.monotonic() + (self.busy_timeout if wait is None else wait)
        pause = _BEGIN_FIRST_PAUSE
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() >= until:
                    raise
            time.sleep(random.uniform(pause / 2, pause))
            pause = min(2 * pause, _BEGIN_LONGEST_PAUSE)

    def _read(self) -> sqlite3.Connection:
        return self._connection()

    # -- runs ---------------------------------------------------------------------------

    @_guarded
    def ping(self) -> None:
        self._read().execute("SELECT 1").fetchone()

    @_guarded(inline=True)
    def create_run(self, run: StoredRun, events: list[dict[str, Any]],
                   session: SessionLink | None = None,
                   remember: Remember | None = None) -> CommitResult:
        """Store a new run; its session is made or touched, and an Idempotency-Key's outcome
        remembered, in the same transaction."""
        doc, encoded = dumps(run.doc), [dumps(event) for event in events]
        with self._write() as db:
            if session is not None:
                _link_session(db, session)
            try:
                db.execute(
                    f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, 1, ?, ?, ?, 0, ?, ?, ?, ?, 0, NULL)",
                    (run.run_id, run.agent_id, run.session_id, run.user_id, run.state.value,
                     run.created_at, run.updated_at, doc, len(encoded), run.lease_owner,
                     run.lease_until, run.paused_at),
                )
            except sqlite3.IntegrityError:
                raise StaleRun(f"run {run.run_id} already exists") from None
            seqs = self._append_events(db, run.run_id, 0, encoded)
            if remember is not None:
                self._store_remembered(db, run.run_id, remember, run.created_at)
        return CommitResult(version=1, seqs=seqs)

    @staticmethod
    def _append_events(db: sqlite3.Connection, run_id: str, last: int,
                       encoded: list[str]) -> list[int]:
        """Insert the run's next events (already encoded); the caller writes `last_seq`."""
        seqs = list(range(last + 1, last + 1 + len(encoded)))
        db.executemany("INSERT INTO events (run_id, seq, data) VALUES (?, ?, ?)",
                       [(run_id, seq, data) for seq, data in zip(seqs, encoded, strict=True)])
        return seqs

    @_guarded(inline=True)
    def get_run(self, run_id: str) -> StoredRun:
        return _stored_run(self._read(), run_id)

    @_guarded(inline=True)
    def read_run(self, run_id: str, *, events_after: int | None = None,
                 recall: str | None = None) -> RunRead:
        """The run, its events after `events_after` and a remembered outcome, as one read
        (one transaction, so they agree with each other)."""
        db = self._read()
        db.execute("BEGIN")
        try:
            run = _stored_run(db, run_id)
            events = None if events_after is None else _events_after(db, run_id,
                                                                     events_after, -1)
            remembered = None if recall is None else self._recalled(db, run_id, recall)
        finally:
            db.execute("COMMIT")
        return RunRead(run, events, remembered)

    @_guarded(inline=True)
    def commit(self, commit: Commit) -> CommitResult:
        """Apply `commit` atomically if the run is still at its expected version."""
        doc = commit.encoded_doc() or None  # None: the stored document stays
        encoded = [dumps(event) for event in commit.events]
        entries = commit_entries(commit) if self.outbox else []
        with self._write() as db:
            row = db.execute(
                "SELECT version, last_seq, pending_approvals, cancel_requested, lease_until "
                "FROM runs WHERE run_id = ?",
                (commit.run_id,),
            ).fetchone()
            self._check(row, commit)
            pending = row["pending_approvals"] + self._insert_approvals(db, commit)
            pending -= self._expire_approvals(db, commit)
            seqs = self._append_events(db, commit.run_id, row["last_seq"], encoded)
            self._remember(db, commit)
            self._enqueue(db, entries)
            finished = commit.now if commit.retain_seconds is not None else None
            db.execute(
                "UPDATE runs SET state = ?, version = version + 1, doc = coalesce(?, doc), "
                "updated_at = ?, pending_approvals = ?, lease_owner = ?, lease_until = ?, "
                "paused_at = ?, finished_at = ?, cancel_requested = 0, commit_token = ?, "
                "last_seq = ? WHERE run_id = ?",
                (commit.state.value, doc, commit.now, pending, commit.lease_owner,
                 commit.lease_until, commit.paused_at, finished, commit.token,
                 row["last_seq"] + len(encoded), commit.run_id),
            )
        return CommitResult(version=commit.expected_version + 1, seqs=seqs)

    def _remember(self, db: sqlite3.Connection, commit: Commit) -> None:
        if commit.remember is not None:
            self._store_remembered(db, commit.run_id, commit.remember, commit.now)

    @staticmethod
    def _check(row: sqlite3.Row | None, commit: Commit) -> None:
        """The commit's conditions, in the same order as the Redis script's."""
        if row is None:
            raise RunNotFound(commit.run_id)
        if commit.honour_cancel and row["cancel_requested"]:
            raise CancelRequested(commit.run_id)
        if row["version"] != commit.expected_version:
            raise StaleRun(commit.run_id)
        if commit.lease_lapsed_by is not None and (
                row["lease_until"] is None or row["lease_until"] > commit.lease_lapsed_by):
            raise StaleRun(commit.run_id)

    @_guarded(inline=True)
    def request_cancel(self, run_id: str, expected_state: RunState, now: float) -> int:
        """Record a cancel request if the run is still in `expected_state`; the new version."""
        with self._write() as db:
            row = db.execute("SELECT version, state FROM runs WHERE run_id = ?",
                             (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(run_id)
            if row["state"] != expected_state.value:
                raise StaleRun(run_id)
            db.execute("UPDATE runs SET version = version + 1, cancel_requested = 1, "
                       "updated_at = ? WHERE run_id = ?", (now, run_id))
        return row["version"] + 1

    @staticmethod
    def _store_remembered(db: sqlite3.Connection, run_id: str, remember: Remember,
                          now: float) -> None:
        db.execute(
            "INSERT OR REPLACE INTO idempotency (scope, key, value, expires_at) "
            "VALUES (?, ?, ?, ?)",
            (run_id, remember.key, dumps(remember.value), now + remember.ttl),
        )

    @staticmethod
    def _insert_approvals(db: sqlite3.Connection, commit: Commit) -> int:
        if not commit.approvals:
            return 0  # no statement: every one inside the write lock is the whole machine's
        db.executemany(
            "INSERT INTO approvals (approval_id, run_id, status, doc, created_at, agent_id, "
            "user_id, session_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(a.approval_id, commit.run_id, APPROVAL_PENDING, dumps(a.doc), commit.now,
              *(_text(a.doc.get(c)) for c in _APPROVAL_COPIED)) for a in commit.approvals],
        )
        return len(commit.approvals)

    @staticmethod
    def _expire_approvals(db: sqlite3.Connection, commit: Commit) -> int:
        expired = 0
        for approval_id in commit.expire_approvals:
            expired += db.execute(
                "UPDATE approvals SET status = ?, updated_at = ? "
                "WHERE approval_id = ? AND run_id = ? AND status = ?",
                (APPROVAL_EXPIRED, commit.now, approval_id, commit.run_id, APPROVAL_PENDING),
            ).rowcount
        return expired

    @_guarded(inline=True)
    def read_events(self, run_id: str, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        return _events_after(self._read(), run_id, after, limit)

    def wait_events(self, run_id: str, after: int, timeout: float) -> list[StoredEvent]:
        """Poll for events after `after` for up to `timeout` seconds."""
        until = time.monotonic() + timeout
        while True:
            events = self.read_events(run_id, after)
            if events or time.monotonic() >= until:
                return events
            time.sleep(min(_POLL_SECONDS, max(0.0, until - time.monotonic())))

    @_guarded
    def list_runs(self, query: RunQuery) -> list[StoredRun]:
        where, params = ["agent_id = ?"], [query.agent_id]
        for column, value in (("session_id", query.session_id), ("user_id", query.user_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if query.states is not None:
            states = sorted(s.value for s in query.states)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        rows = self._read().execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, run_id DESC LIMIT ? OFFSET ?",
            (*params, query.limit, query.offset),
        ).fetchall()
        return [_run_from_row(row) for row in rows]

    # -- leases and sweeps --------------------------------------------------------------

    @_guarded(inline=True)
    def renew_leases(self, owner: str, run_ids: Iterable[str], until: float) -> None:
        ids = list(run_ids)
        if not ids:
            return
        with self._write() as db:
            db.executemany(
                "UPDATE runs SET lease_until = ? WHERE run_id = ? AND lease_owner = ?",
                [(until, run_id, owner) for run_id in ids],
            )

    @_guarded
    def runs_with_lapsed_lease(self, now: float, limit: int = 100) -> list[str]:
        rows = self._read().execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE lease_until <= ? LIMIT ?", (now, limit)
        ).fetchall()
        return [r.run_id for r in map(_run_from_row, rows) if lease_lapsed(r, now)]

    @_guarded
    def runs_paused_before(self, before: float, limit: int = 100) -> list[str]:
        rows = self._read().execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE paused_at <= ? LIMIT ?", (before, limit)
        ).fetchall()
        return [r.run_id for r in map(_run_from_row, rows) if paused_before(r, before)]

    # -- approvals ----------------------------------------------------------------------

    @_guarded
    def get_approval(self, approval_id: str) -> Approval:
        row = self._read().execute(
            "SELECT * FROM approvals WHERE approval_id = ?", (approval_id,)
        ).fetchone()
        if row is None:
            raise ApprovalNotFound(approval_id)
        return _approval_from_row(row)

    @_guarded
    def list_approvals(self, query: ApprovalQuery) -> tuple[list[Approval], int]:
        """A page through the filter columns' indexes, and the number that match."""
        where, params = _approval_where(query)
        db = self._read()
        rows = db.execute(
            f"SELECT * FROM approvals{where} ORDER BY created_at DESC, approval_id DESC "
            "LIMIT ? OFFSET ?", (*params, query.limit, query.offset),
        ).fetchall()
        total = db.execute(f"SELECT COUNT(*) FROM approvals{where}", params).fetchone()[0]
        return [_approval_from_row(row) for row in rows], total

    @_guarded
    def count_pending_approvals(self, user_id: str | None = None) -> int:
        where, params = _approval_where(ApprovalQuery(status=APPROVAL_PENDING, user_id=user_id))
        return self._read().execute(f"SELECT COUNT(*) FROM approvals{where}",
                                    params).fetchone()[0]

    @_guarded
    def resolve_approval(self, approval: Approval, expected_version: int, now: float,
                         run_doc: dict[str, Any] | None = None):
        """Compare-and-set pending -> approval.status and release the run's guard, atomically;
        `run_doc` (the run's document with the decision in it) is written in the same step."""
        resolution = dumps({
            "resolution_data": approval.resolution_data,
            "resolved_by": approval.resolved_by,
            "resolved_at": approval.resolved_at,
        })
        with self._write() as db:
            code, status = self._resolve_check(db, approval, expected_version)
            if code > 0:
                db.execute(
                    "UPDATE approvals SET status = ?, resolution = ?, updated_at = ? "
                    "WHERE approval_id = ?",
                    (approval.status, resolution, now, approval.approval_id),
                )
                db.execute(
                    "UPDATE runs SET version = version + 1, updated_at = ?, "
                    "pending_approvals = MAX(pending_approvals - 1, 0) WHERE run_id = ?",
                    (now, approval.run_id),
                )
                if run_doc is not None:
                    db.execute("UPDATE runs SET doc = ? WHERE run_id = ?",
                               (dumps(run_doc), approval.run_id))
                self._enqueue(db, [resolution_entry(approval, now)] if self.outbox else [])
        return resolve_outcome(code, approval, status)

    @staticmethod
    def _resolve_check(db: sqlite3.Connection, approval: Approval, expected: int):
        """The same outcome codes as the Redis script (see `lua.py`)."""
        run = db.execute(
            "SELECT version FROM runs WHERE run_id = ?", (approval.run_id,)
        ).fetchone()
        if run is None:
            return -1, None
        row = db.execute(
            "SELECT status FROM approvals WHERE approval_id = ? AND run_id = ?",
            (approval.approval_id, approval.run_id),
        ).fetchone()
        if row is None:
            return -3, None
        if row["status"] != APPROVAL_PENDING:
            return -4, row["status"]
        if run["version"] != expected:
            return -2, None
        return expected + 1, None

    @_guarded
    def delete_approval(self, approval_id: str) -> None:
        with self._write() as db:
            row = db.execute(
                "SELECT status FROM approvals WHERE approval_id = ?", (approval_id,)
            ).fetchone()
            if row is None:
                raise ApprovalNotFound(approval_id)
            if row["status"] == APPROVAL_PENDING:
                raise ApprovalStillPending()
            db.execute("DELETE FROM approvals WHERE approval_id = ?", (approval_id,))

    # -- idempotency, retention ---------------------------------------------------------

    @_guarded(inline=True)
    def recall(self, run_id: str, key: str) -> dict[str, Any] | None:
        """The outcome a commit remembered under (run, key), if it has not expired."""
        return self._recalled(self._read(), run_id, key)

    @staticmethod
    def _recalled(db: sqlite3.Connection, run_id: str, key: str) -> dict[str, Any] | None:
        row = db.execute(
            "SELECT value FROM idempotency WHERE scope = ? AND key = ? AND expires_at > ?",
            (run_id, key, time.time()),
        ).fetchone()
        return json.loads(row["value"]) if row else None

    @_guarded
    def purge_finished(self, before: float) -> int:
        """Delete runs that finished before `before`, with their events and approvals."""
        with self._write() as db:
            ids = [r[0] for r in db.execute(
                "SELECT run_id FROM runs WHERE finished_at < ? LIMIT 1000", (before,)
            ).fetchall()]
            for table in ("events", "approvals", "runs"):
                db.executemany(f"DELETE FROM {table} WHERE run_id = ?", [(i,) for i in ids])
            db.execute("DELETE FROM idempotency WHERE expires_at < ?", (time.time(),))
            self._purge_deleted_runs(db, before)
        return len(ids)

    # -- sessions -------------------------------------------------------------------------

    @_guarded
    def create_session(self, session: StoredSession) -> None:
        with self._write() as db:
            try:
                db.execute(
                    f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _session_row(session),
                )
            except sqlite3.IntegrityError:
                raise SessionExists(session.session_id) from None

    @_guarded
    def get_session(self, session_id: str) -> StoredSession:
        row = self._read().execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None:
            raise SessionNotFound(session_id)
        return _session_from_row(row)

    @_guarded
    def update_session(self, session_id: str, changes: dict[str, Any],
                       now: float) -> StoredSession:
        """Set the given fields (`name`, `session_state`, `metadata`) and `updated_at`."""
        sets = [f"{column} = ?" for column in changes]
        values = [v if column == "name" else dumps(v) for column, v in changes.items()]
        with self._write() as db:
            updated = db.execute(
                f"UPDATE sessions SET {', '.join([*sets, 'updated_at = MAX(updated_at, ?)'])} "
                "WHERE session_id = ?", (*values, now, session_id),
            ).rowcount
        if not updated:
            raise SessionNotFound(session_id)
        return self.get_session(session_id)

    @_guarded
    def list_sessions(self, query: SessionQuery) -> tuple[list[StoredSession], int]:
        """One page in index order, and the number of sessions that match."""
        where, params = _session_filters(query)
        direction = "DESC" if query.descending else "ASC"
        order = f"{_sort_column(query.sort_by)} {direction}, session_id {direction}"
        db = self._read()
        rows = db.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions {where} ORDER BY {order} "
            "LIMIT ? OFFSET ?", (*params, query.limit, query.offset),
        ).fetchall()
        total = db.execute(f"SELECT COUNT(*) FROM sessions {where}", params).fetchone()[0]
        return [_session_from_row(row) for row in rows], total

    @_guarded
    def session_runs(self, session_id: str, limit: int = 1000) -> list[StoredRun]:
        """The newest `limit` runs of the session, oldest first."""
        rows = self._read().execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE session_id = ? "
            "ORDER BY created_at DESC, run_id DESC LIMIT ?", (session_id, limit),
        ).fetchall()
        return [_run_from_row(row) for row in reversed(rows)]

    @_guarded
    def delete_session(self, session_id: str, runs: list[RunRemoval], now: float,
                       retain_seconds: int) -> None:
        """Delete the session and exactly the runs planned, at their planned versions.

        One transaction: if a run moved or joined since the plan was made, nothing is
        deleted (StaleRun). Pending approvals of the runs are expired; every approval of a
        deleted run is kept until the retention purge, so the queue shows how it ended.
        """
        with self._write() as db:
            if db.execute("SELECT 1 FROM sessions WHERE session_id = ?",
                          (session_id,)).fetchone() is None:
                raise SessionNotFound(session_id)
            current = dict(db.execute("SELECT run_id, version FROM runs WHERE session_id = ?",
                                      (session_id,)).fetchall())
            if current != {r.run_id: r.expected_version for r in runs}:
                raise StaleRun(session_id)
            for removal in runs:
                _remove_run(db, removal, now)
                self._enqueue(db, commit_entries(removal.as_commit(now)) if self.outbox else [])
            db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))

    def _purge_deleted_runs(self, db: sqlite3.Connection, before: float) -> None:
        """Approvals of runs deleted with their session go once the retention has passed."""
        ids = [(r[0],) for r in db.execute(
            "SELECT run_id FROM deleted_runs WHERE deleted_at < ? LIMIT 1000", (before,)
        ).fetchall()]
        db.executemany("DELETE FROM approvals WHERE run_id = ?", ids)
        db.executemany("DELETE FROM deleted_runs WHERE run_id = ?", ids)

    # -- webhook outbox (issue 15) -------------------------------------------------------

    @staticmethod
    def _enqueue(db: sqlite3.Connection, entries: list[OutboxEntry]) -> None:
        """Outbox rows, inside the caller's transaction: they exist iff the fact does."""
        if not entries:
            return
        db.executemany(
            "INSERT INTO outbox (entry_id, run_id, payload, created_at, next_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [(e.entry_id, e.run_id, e.payload, e.created_at, e.created_at) for e in entries],
        )

    @_guarded
    def claim_outbox(self, now: float, lease_until: float, limit: int = 50) -> list[OutboxEntry]:
        """Lease due entries (until `lease_until`) so no other deliverer takes them meanwhile.

        A read first: an idle outbox costs no write lock, however often it is polled."""
        due = self._read().execute(
            "SELECT 1 FROM outbox WHERE failed_at IS NULL AND next_at <= ? LIMIT 1", (now,)
        ).fetchone()
        if due is None:
            return []
        with self._write() as db:
            rows = db.execute(
                "SELECT entry_id, run_id, payload, created_at, attempts FROM outbox "
                "WHERE failed_at IS NULL AND next_at <= ? ORDER BY next_at LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany("UPDATE outbox SET next_at = ? WHERE entry_id = ?",
                           [(lease_until, row["entry_id"]) for row in rows])
        return [OutboxEntry(entry_id=r["entry_id"], run_id=r["run_id"], payload=r["payload"],
                            created_at=r["created_at"], attempts=r["attempts"]) for r in rows]

    @_guarded
    def settle_outbox(self, entry: OutboxEntry, *, delivered: bool,
                      retry_at: float | None = None, error: str | None = None) -> None:
        """Delivered: drop it. Else retry at `retry_at`, or (None) record it as failed."""
        with self._write() as db:
            if delivered:
                db.execute("DELETE FROM outbox WHERE entry_id = ?", (entry.entry_id,))
            elif retry_at is not None:
                db.execute("UPDATE outbox SET next_at = ?, attempts = attempts + 1, error = ? "
                           "WHERE entry_id = ?", (retry_at, error, entry.entry_id))
            else:
                db.execute("UPDATE outbox SET failed_at = ?, attempts = attempts + 1, "
                           "error = ? WHERE entry_id = ?",
                           (time.time(), error, entry.entry_id))

    @_guarded
    def failed_outbox(self, run_id: str) -> list[dict[str, Any]]:
        """The notifications of a run that were given up on, as recorded."""
        rows = self._read().execute(
            "SELECT payload, attempts, error FROM outbox WHERE run_id = ? "
            "AND failed_at IS NOT NULL", (run_id,)).fetchall()
        return [dict(row) for row in rows]

    @_guarded
    def count_paused_runs(self, limit: int = 10_000) -> int:
        """Runs PAUSED now (at most `limit` counted), from the pause index."""
        row = self._read().execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM runs WHERE paused_at IS NOT NULL "
            "AND state = 'PAUSED' LIMIT ?)", (limit,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._all_lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()
        self._worker_dbs = {}


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY: another connection holds the lock (any other error is not ours to wait)."""
    return "locked" in str(exc) or "busy" in str(exc)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _approval_where(query: ApprovalQuery) -> tuple[str, list[str]]:
    """` WHERE ...` over the filter columns the query sets (or nothing), and its values."""
    given = [(c, getattr(query, c)) for c in _APPROVAL_FILTERS if getattr(query, c) is not None]
    if not given:
        return "", []
    return " WHERE " + " AND ".join(f"{c} = ?" for c, _ in given), [v for _, v in given]


# -- sessions -------------------------------------------------------------------------------

_SESSION_COLUMNS = (
    "session_id, agent_id, user_id, name, first_message, session_state, metadata, "
    "created_at, updated_at"
)
_SORT_COLUMNS = {"created_at": "created_at", "updated_at": "updated_at"}


def _casefold_contains(haystack: str | None, needle: str) -> bool:
    """The name filter, the same in SQL as in Python (`session_matches`)."""
    return needle.casefold() in (haystack or "").casefold()


def _sort_column(sort_by: str) -> str:
    try:
        return _SORT_COLUMNS[sort_by]
    except KeyError:
        raise ValueError(f"cannot sort sessions by {sort_by!r}") from None


def _session_row(session: StoredSession) -> tuple:
    return (session.session_id, session.agent_id, session.user_id, session.name,
            session.first_message, dumps(session.session_state),
            None if session.metadata is None else dumps(session.metadata),
            session.created_at, session.updated_at)


def _session_from_row(row: sqlite3.Row) -> StoredSession:
    return StoredSession(
        session_id=row["session_id"], agent_id=row["agent_id"], user_id=row["user_id"],
        name=row["name"], first_message=row["first_message"],
        session_state=json.loads(row["session_state"]),
        metadata=json.loads(row["metadata"]) if row["metadata"] is not None else None,
        created_at=row["created_at"], updated_at=row["updated_at"],
    )


def _session_filters(query: SessionQuery) -> tuple[str, list[Any]]:
    where, params = [], []
    for column, value in (("agent_id", query.agent_id), ("user_id", query.user_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if query.name_contains is not None:
        where.append("casefold_contains(COALESCE(name, first_message), ?)")
        params.append(query.name_contains)
    return ("WHERE " + " AND ".join(where)) if where else "", params


def _link_session(db: sqlite3.Connection, link: SessionLink) -> None:
    """Make the run's session, or add the run to it unless another user owns it."""
    row = db.execute("SELECT user_id FROM sessions WHERE session_id = ?",
                     (link.session_id,)).fetchone()
    if row is None:
        db.execute(
            f"INSERT INTO sessions ({_SESSION_COLUMNS}) "
            "VALUES (?, ?, ?, NULL, ?, '{}', NULL, ?, ?)",
            (link.session_id, link.agent_id, link.user_id, link.message, link.now, link.now),
        )
        return
    owner = row["user_id"]
    if link.exclusive and owner != link.user_id:
        raise SessionOwnedElsewhere(link.session_id)
    db.execute(
        "UPDATE sessions SET updated_at = MAX(updated_at, ?), "
        "first_message = COALESCE(first_message, ?), agent_id = COALESCE(agent_id, ?) "
        "WHERE session_id = ?", (link.now, link.message, link.agent_id, link.session_id),
    )


def _remove_run(db: sqlite3.Connection, removal: RunRemoval, now: float) -> None:
    """Expire the run's pending approvals, then delete the run and everything under it."""
    db.executemany(
        "UPDATE approvals SET status = ?, updated_at = ? "
        "WHERE approval_id = ? AND run_id = ? AND status = ?",
        [(APPROVAL_EXPIRED, now, a, removal.run_id, APPROVAL_PENDING)
         for a in removal.expire_approvals],
    )
    if removal.approval_ids:
        db.execute("INSERT OR REPLACE INTO deleted_runs (run_id, deleted_at) VALUES (?, ?)",
                   (removal.run_id, now))
    for table, column in (("events", "run_id"), ("idempotency", "scope"), ("runs", "run_id")):
        db.execute(f"DELETE FROM {table} WHERE {column} = ?", (removal.run_id,))
