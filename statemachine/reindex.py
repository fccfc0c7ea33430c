"""Rebuild the Redis indexes from the runs themselves: an offline, one-off maintenance tool.

Use it after upgrading from a version with the old index layout (one `agent-runs:<agent>`,
`approvals`, `approval-run`, `executing`, `paused` and `finished` key each, without shard
tags), from one that kept a run's document in its hash and its events in a stream (each such
run is moved to its document key and event list), or if index keys were lost. It SCANs the
run and approval hashes under the prefix (the only place that walks the whole keyspace, never
a request), writes their index entries as a create would (idempotent: entries that exist are
left as they are), and with `--drop-legacy` deletes the old layout's keys. Safe while servers
run: every entry is a verified hint (a run of the layout before the event list shows its
events again once it is moved).

    REDIS_URL=... [REDIS_CLUSTER=1] [REDIS_KEY_PREFIX=agentos] python -m statemachine.reindex
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from statemachine import lua
from statemachine.redis_store import RedisRunStore, _run_from_hash, approval_from_hash

LEGACY = ("approvals", "approval-run", "executing", "paused", "finished")


def reindex(store: RedisRunStore, *, drop_legacy: bool = False, batch: int = 500) -> dict:
    """Index every run and approval under the store's prefix; counts of what was done."""
    done = {"runs": 0, "approvals": 0, "legacy_keys_dropped": 0}
    migrate, migrated = store.redis.register_script(lua.MIGRATE_RUN), 0
    prefix = store.keys.prefix
    for key in store.redis.scan_iter(match=f"{prefix}:run:*", count=batch, _type="hash"):
        fields = store.redis.hgetall(key)
        if not fields:
            continue
        if ":approval:" in key:
            _index_approval(store, fields)
            done["approvals"] += 1
        elif key.endswith("}"):
            run_id = fields["run_id"]
            migrated += int(migrate(keys=[
                key, store.keys.doc(run_id), store.keys.events(run_id),
                store.keys.legacy_events(run_id)]))
            _index_run(store, fields, store.redis.ttl(key))
            done["runs"] += 1
    if drop_legacy:
        done["legacy_keys_dropped"] = _drop_legacy(store, batch)
    if migrated:
        done["runs_migrated"] = migrated  # runs of the layout before the event list
    return done


def _index_run(store: RedisRunStore, fields: dict[str, str], ttl: int) -> None:
    run = _run_from_hash(fields)
    finished = run.updated_at if run.state.is_final and ttl > 0 else None
    store.index.hint_stored_run(run, finished)


def _index_approval(store: RedisRunStore, fields: dict[str, str]) -> None:
    approval = approval_from_hash(fields)
    created = approval.doc.get("created_at")
    store.index.hint_stored_approval(
        approval, float(created) if isinstance(created, int | float) else 0.0)


def _drop_legacy(store: RedisRunStore, batch: int) -> int:
    prefix, dropped = store.keys.prefix, 0
    names = [f"{prefix}:{name}" for name in LEGACY]
    names += list(store.redis.scan_iter(match=f"{prefix}:agent-runs:*", count=batch))
    for name in names:
        dropped += int(store.redis.delete(name))
    return dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop-legacy", action="store_true",
                        help="delete the old layout's index keys afterwards")
    args = parser.parse_args(argv)
    url = os.environ.get("REDIS_URL")
    if not url:
        print("REDIS_URL is not set", file=sys.stderr)
        return 2
    cluster = os.environ.get("REDIS_CLUSTER", "").strip().lower() in ("1", "true", "yes", "on")
    store = RedisRunStore(url, prefix=os.environ.get("REDIS_KEY_PREFIX", "agentos"),
                          cluster=cluster)
    try:
        print(json.dumps(reindex(store, drop_legacy=args.drop_legacy)))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
