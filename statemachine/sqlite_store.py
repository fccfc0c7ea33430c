"""The embedded store: stdlib sqlite3 in WAL mode, every write one BEGIN IMMEDIATE transaction.

BEGIN IMMEDIATE takes the database's write lock before the version is read, so the compare
and the set cannot interleave with another process's; several gunicorn workers on one host may
share the file. A lock held past `busy_timeout` becomes StoreUnavailable (503), never a hang.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from statemachine.errors import (
    ApprovalNotFound,
    ApprovalStillPending,
    RunNotFound,
    StaleRun,
    StoreUnavailable,
)
from statemachine.states import RunState
from statemachine.store import (
    APPROVAL_EXPIRED,
    APPROVAL_PENDING,
    Approval,
    ApprovalQuery,
    Commit,
    CommitResult,
    RunQuery,
    StoredEvent,
    StoredRun,
    dumps,
    lease_lapsed,
    paused_before,
    resolve_outcome,
)

T = TypeVar("T")
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
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS runs_by_agent ON runs (agent_id, created_at DESC);
CREATE INDEX IF NOT EXISTS runs_by_user ON runs (agent_id, user_id, created_at DESC);
CREATE INDEX IF NOT EXISTS runs_by_session ON runs (agent_id, session_id, created_at DESC);
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
CREATE TABLE IF NOT EXISTS idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
"""

_APPROVAL_FILTERS = ("status", "agent_id", "user_id", "run_id", "session_id")
_APPROVAL_COPIED = ("agent_id", "user_id", "session_id")
"""Approval columns copied from its document when it is created, so that filters use indexes."""

_RUN_COLUMNS = (
    "run_id, agent_id, session_id, user_id, state, version, created_at, updated_at, doc, "
    "pending_approvals, last_seq, lease_owner, lease_until, paused_at"
)


def _guarded(method: Callable[..., T]) -> Callable[..., T]:
    """Turn a locked or unreadable database into StoreUnavailable (HTTP 503)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    return wrapper


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
        doc=json.loads(row["doc"]),
        admin_pending=row["pending_approvals"] > 0,
        pending_approvals=row["pending_approvals"],
        last_seq=row["last_seq"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        paused_at=row["paused_at"],
    )


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

    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._migrate(self._connection())

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Create the schema; a file from before the approvals' filter columns gets them,
        filled from each approval's document, before the indexes on them are made."""
        table = SCHEMA.split("CREATE INDEX IF NOT EXISTS approvals_by_status")[0]
        db.executescript(table)
        columns = {row[1] for row in db.execute("PRAGMA table_info(approvals)")}
        for column in _APPROVAL_COPIED:
            if column not in columns:
                db.execute(f"ALTER TABLE approvals ADD COLUMN {column} TEXT")
                db.execute(f"UPDATE approvals SET {column} = json_extract(doc, '$.{column}')")
        db.executescript(SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None,
                check_same_thread=False,
            )
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            self._local.db = db
            with self._all_lock:
                self._all.append(db)
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction: committed whole, or rolled back whole."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _read(self) -> sqlite3.Connection:
        return self._connection()

    # -- runs ---------------------------------------------------------------------------

    @_guarded
    def ping(self) -> None:
        self._read().execute("SELECT 1").fetchone()

    @_guarded
    def create_run(self, run: StoredRun, events: list[dict[str, Any]]) -> CommitResult:
        with self._write() as db:
            try:
                db.execute(
                    f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, 1, ?, ?, ?, 0, 0, ?, ?, ?)",
                    (run.run_id, run.agent_id, run.session_id, run.user_id, run.state.value,
                     run.created_at, run.updated_at, dumps(run.doc), run.lease_owner,
                     run.lease_until, run.paused_at),
                )
            except sqlite3.IntegrityError:
                raise StaleRun(f"run {run.run_id} already exists") from None
            seqs = self._append_events(db, run.run_id, 0, events)
        return CommitResult(version=1, seqs=seqs)

    @staticmethod
    def _append_events(db: sqlite3.Connection, run_id: str, last: int, events: list) -> list:
        seqs = list(range(last + 1, last + 1 + len(events)))
        db.executemany(
            "INSERT INTO events (run_id, seq, data) VALUES (?, ?, ?)",
            [(run_id, seq, dumps(event)) for seq, event in zip(seqs, events, strict=True)],
        )
        db.execute("UPDATE runs SET last_seq = ? WHERE run_id = ?", (last + len(events), run_id))
        return seqs

    @_guarded
    def get_run(self, run_id: str) -> StoredRun:
        row = self._read().execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise RunNotFound(run_id)
        return _run_from_row(row)

    @_guarded
    def commit(self, commit: Commit) -> CommitResult:
        """Apply `commit` atomically if the run is still at its expected version."""
        with self._write() as db:
            row = db.execute(
                "SELECT version, last_seq, pending_approvals FROM runs WHERE run_id = ?",
                (commit.run_id,),
            ).fetchone()
            if row is None:
                raise RunNotFound(commit.run_id)
            if row["version"] != commit.expected_version:
                raise StaleRun(commit.run_id)
            pending = row["pending_approvals"] + self._insert_approvals(db, commit)
            pending -= self._expire_approvals(db, commit)
            seqs = self._append_events(db, commit.run_id, row["last_seq"], commit.events)
            self._remember(db, commit)
            finished = commit.now if commit.retain_seconds is not None else None
            db.execute(
                "UPDATE runs SET state = ?, version = version + 1, doc = ?, updated_at = ?, "
                "pending_approvals = ?, lease_owner = ?, lease_until = ?, paused_at = ?, "
                "finished_at = ? WHERE run_id = ?",
                (commit.state.value, dumps(commit.doc), commit.now, pending, commit.lease_owner,
                 commit.lease_until, commit.paused_at, finished, commit.run_id),
            )
        return CommitResult(version=commit.expected_version + 1, seqs=seqs)

    @staticmethod
    def _remember(db: sqlite3.Connection, commit: Commit) -> None:
        if commit.remember is None:
            return
        db.execute(
            "INSERT OR REPLACE INTO idempotency (scope, key, value, expires_at) "
            "VALUES (?, ?, ?, ?)",
            (commit.run_id, commit.remember.key, dumps(commit.remember.value),
             commit.now + commit.remember.ttl),
        )

    @staticmethod
    def _insert_approvals(db: sqlite3.Connection, commit: Commit) -> int:
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

    @_guarded
    def read_events(self, run_id: str, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        rows = self._read().execute(
            "SELECT seq, data FROM events WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (run_id, after, limit),
        ).fetchall()
        return [StoredEvent(seq=row["seq"], data=json.loads(row["data"])) for row in rows]

    def wait_events(self, run_id: str, after: int, timeout: float) -> list[StoredEvent]:
        """Poll for events after `after` for up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.read_events(run_id, after)
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))

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

    @_guarded
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
    def resolve_approval(self, approval: Approval, expected_version: int, now: float):
        """Compare-and-set pending -> approval.status and release the run's guard, atomically."""
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

    @_guarded
    def recall(self, run_id: str, key: str) -> dict[str, Any] | None:
        """The outcome a commit remembered under (run, key), if it has not expired."""
        row = self._read().execute(
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
        return len(ids)

    def close(self) -> None:
        with self._all_lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _approval_where(query: ApprovalQuery) -> tuple[str, list[str]]:
    """` WHERE ...` over the filter columns the query sets (or nothing), and its values."""
    given = [(c, getattr(query, c)) for c in _APPROVAL_FILTERS if getattr(query, c) is not None]
    if not given:
        return "", []
    return " WHERE " + " AND ".join(f"{c} = ?" for c, _ in given), [v for _, v in given]
