"""Every Redis key the server uses, in one place.

Keys of one run carry the hash tag `{run_id}` so that they live in one Redis Cluster slot and
one Lua script may touch them all. Keys without a run tag are indexes: hints that are written
before the run's own commit and verified against the run when read, never the truth.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (`REDIS_KEY_PREFIX`), so tenants and tests never collide."""

    prefix: str = "agentos"

    def run(self, run_id: str) -> str:
        """Hash: state, version, doc (JSON), indexed columns, lease, guard, last_seq."""
        return f"{self.prefix}:run:{{{run_id}}}"

    def events(self, run_id: str) -> str:
        """Stream: the run's events with explicit ids 0-1, 0-2 ...; field `e` is the JSON."""
        return f"{self.prefix}:run:{{{run_id}}}:events"

    def approval(self, run_id: str, approval_id: str) -> str:
        """Hash: status, doc (JSON), resolution (JSON) of one approval of the run."""
        return f"{self.prefix}:run:{{{run_id}}}:approval:{approval_id}"

    def approval_runs(self) -> str:
        """Hash: approval_id -> run_id, to find an approval's slot from its id alone."""
        return f"{self.prefix}:approval-run"

    def approvals_by_time(self) -> str:
        """Sorted set: approval_id scored by creation time (newest-first listing)."""
        return f"{self.prefix}:approvals"

    def agent_runs(self, agent_id: str) -> str:
        """Sorted set: run_id scored by creation time, one per agent (listing)."""
        return f"{self.prefix}:agent-runs:{agent_id}"

    def executing(self) -> str:
        """Sorted set: run_id scored by lease expiry, for the lapsed-lease sweep."""
        return f"{self.prefix}:executing"

    def paused(self) -> str:
        """Sorted set: run_id scored by pause time, for the pause-expiry sweep."""
        return f"{self.prefix}:paused"

    def finished(self) -> str:
        """Sorted set: run_id scored by finish time, for retention of the indexes."""
        return f"{self.prefix}:finished"

    def session(self, session_id: str) -> str:
        """Hash: session_id, agent_id, user_id, name, first_message, session_state (JSON),
        metadata (JSON), created_at, updated_at. Its keys carry the tag `{session_id}`."""
        return f"{self.prefix}:session:{{{session_id}}}"

    def session_runs(self, session_id: str) -> str:
        """Sorted set: run_id scored by creation time, the runs of one session (a hint: each
        entry is checked against its run when read)."""
        return f"{self.prefix}:session:{{{session_id}}}:runs"

    def sessions(self, sort_by: str, agent_id: str | None = None,
                 user_id: str | None = None) -> str:
        """Sorted set: session_id scored by `sort_by` (created_at or updated_at), for all
        sessions, one agent's, one user's, or one user's with one agent (listing hints).

        The ids are length-prefixed, so no pair of ids can spell another pair's key.
        """
        scope = "all"
        if agent_id is not None:
            scope = f"agent:{len(agent_id)}:{agent_id}"
        if user_id is not None:
            scope += f":user:{len(user_id)}:{user_id}"
        return f"{self.prefix}:sessions:{sort_by}:{scope}"

    def idempotency(self, run_id: str, key: str) -> str:
        """String: the JSON outcome remembered for one Idempotency-Key of the run."""
        return f"{self.prefix}:run:{{{run_id}}}:idem:{key}"

    # -- webhook outbox (issue 15) ------------------------------------------------------

    def outbox(self, run_id: str) -> str:
        """Hash: the run's undelivered notifications, fields `p:<id>` payload, `n:<id>` next
        attempt (epoch seconds), `t:<id>` attempts, `c:<id>` creation time. In the run's slot,
        so the commit script writes it atomically with the fact it announces."""
        return f"{self.prefix}:run:{{{run_id}}}:outbox"

    def outbox_failed(self, run_id: str) -> str:
        """Hash: entry id -> JSON {payload, attempts, error} of notifications given up on."""
        return f"{self.prefix}:run:{{{run_id}}}:outbox-failed"

    def outbox_shard(self, shard: int) -> str:
        """Sorted set: run_id scored by when its outbox should next be looked at (a hint,
        written before the commit; verified by the claim). Tagged `{outbox:N}`: one slot per
        shard in a Redis Cluster."""
        return f"{self.prefix}:{{outbox:{shard}}}"
