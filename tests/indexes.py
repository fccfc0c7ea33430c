"""What a store's indexes still hold about a run: retention tests check it is nothing."""

from __future__ import annotations

from statemachine.redis_store import RedisRunStore
from statemachine.sqlite_store import SqliteRunStore


def index_mentions(store, run_id: str, approval_ids: list[str] = ()) -> list[str]:
    """Every index entry (Redis: key and member; SQLite: table row) naming the run or one of
    its approvals. Empty once retention has purged the run. A wrapped store (the app's
    ObservedStore) is looked at through to the store itself."""
    store = getattr(store, "_store", store)
    if isinstance(store, SqliteRunStore):
        return _sqlite_mentions(store, run_id, approval_ids)
    assert isinstance(store, RedisRunStore)
    return _redis_mentions(store, run_id, approval_ids)


def _sqlite_mentions(store: SqliteRunStore, run_id: str, approval_ids) -> list[str]:
    db = store._read()
    found = [f"runs:{r[0]}" for r in db.execute("SELECT run_id FROM runs WHERE run_id = ?",
                                                 (run_id,))]
    found += [f"approvals:{r[0]}" for r in db.execute(
        "SELECT approval_id FROM approvals WHERE run_id = ?", (run_id,))]
    found += [f"events:{r[0]}" for r in db.execute(
        "SELECT COUNT(*) FROM events WHERE run_id = ?", (run_id,)) if r[0]]
    return found + [f"approvals:{a}" for a in approval_ids if db.execute(
        "SELECT 1 FROM approvals WHERE approval_id = ?", (a,)).fetchone()]


def _redis_mentions(store: RedisRunStore, run_id: str, approval_ids) -> list[str]:
    client, found = store.redis, []
    names = {run_id, *approval_ids}
    for key in client.scan_iter(match=f"{store.keys.prefix}:{{idx-*", count=1000):
        if run_id in key:
            found.append(key)
            continue
        kind = client.type(key)
        members = client.zrange(key, 0, -1) if kind == "zset" else \
            client.hkeys(key) if kind == "hash" else []
        found += [f"{key} {m!r}" for m in members if m.split("\x00")[0] in names
                  or m.endswith(f"\x00{run_id}")]
    return found
