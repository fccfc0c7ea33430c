"""Every Redis key the server uses, in one place.

Keys of one run carry the hash tag `{run_id}` so that they live in one Redis Cluster slot and
one Lua script may touch them all. Keys without a run tag are indexes: hints that are written
before the run's own commit and verified against the run when read, never the truth.

Indexes are split over `SHARDS` hash tags `{idx-0}` .. `{idx-15}`, so no one slot (one cluster
node) holds them all. Every index entry of a run (and of its approvals) lives in the run's
shard, `shard_of(run_id)`: one script may then update or remove all of them at once. Only the
approval -> run map is sharded by the approval id, because a lookup by id knows nothing else.
Values that reach an index key name (agent, user and session ids, states) are escaped by
`part`, so no client-chosen text can close a hash tag or collide with another key.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from dataclasses import dataclass

SHARDS = 16
_NAMES_CACHED = 4096
"""Index key names are made once per (shard, agent, state): every commit names several."""
APPROVAL_FIELDS = ("status", "agent", "user", "session")


def shard_of(member: str) -> int:
    """The index shard of a run (or an approval id): stable across processes and hosts."""
    return zlib.crc32(member.encode("utf-8", "surrogatepass")) % SHARDS


def part(value: str) -> str:
    """`value` escaped for use inside a key name: `%`, `:`, `{` and `}` become %XX."""
    return (value.replace("%", "%25").replace(":", "%3A").replace("{", "%7B")
            .replace("}", "%7D"))


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (`REDIS_KEY_PREFIX`), so tenants and tests never collide."""

    prefix: str = "agentos"

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError("REDIS_KEY_PREFIX must not contain { or }: they pick cluster slots")

    def run(self, run_id: str) -> str:
        """Hash: state, version, indexed columns, lease, guard, last_seq. Every value is
        short, so Redis keeps it in its compact encoding (the document has its own key)."""
        return f"{self.prefix}:run:{{{run_id}}}"

    def doc(self, run_id: str) -> str:
        """String: the run's document (JSON), written only when it changes."""
        return f"{self.prefix}:run:{{{run_id}}}:doc"

    def events(self, run_id: str) -> str:
        """List: the run's events (JSON), element i holding event i + 1, so a read from any
        event on is one LRANGE."""
        return f"{self.prefix}:run:{{{run_id}}}:log"

    def bell(self, run_id: str) -> str:
        """Stream: one entry `0-<last event>` per commit, that followers in other processes
        block on (XREAD); kept only while the run executes and for a few seconds after."""
        return f"{self.prefix}:run:{{{run_id}}}:bell"

    def legacy_events(self, run_id: str) -> str:
        """Stream: where versions before the event list kept a run's events (field `e`);
        `python -m statemachine.reindex --migrate-logs` moves them."""
        return f"{self.prefix}:run:{{{run_id}}}:events"

    def approval(self, run_id: str, approval_id: str) -> str:
        """Hash: status, doc (JSON), resolution (JSON) of one approval of the run."""
        return f"{self.prefix}:run:{{{run_id}}}:approval:{approval_id}"

    def session(self, session_id: str) -> str:
        """Hash: session_id, agent_id, user_id, name, first_message, session_state (JSON),
        metadata (JSON), created_at, updated_at. Its keys carry the tag `{session_id}`."""
        return f"{self.prefix}:session:{{{session_id}}}"

    def session_runs(self, session_id: str) -> str:
        """Sorted set: run_id scored by creation time, the runs of one session (a hint: each
        entry is checked against its run when read)."""
        return f"{self.prefix}:session:{{{session_id}}}:runs"

    def idempotency(self, run_id: str, key: str) -> str:
        """String: the JSON outcome remembered for one Idempotency-Key of the run.

        The client's key is hashed into the name: no client text reaches a key unescaped.
        """
        return f"{self.prefix}:run:{{{run_id}}}:idem:{_digest(key)}"

    # -- index shards ---------------------------------------------------------------------

    def _shard(self, shard: int) -> str:
        return f"{self.prefix}:{{idx-{shard}}}"

    @functools.lru_cache(maxsize=_NAMES_CACHED)  # noqa: B019 - Keys live as long as the process
    def run_identity(self, shard: int) -> str:
        """Hash: run_id -> JSON {agent_id, session_id, user_id}: what purge needs to find
        every index entry of a run after its own hash has expired."""
        return f"{self._shard(shard)}:run-identity"

    @functools.lru_cache(maxsize=_NAMES_CACHED)  # noqa: B019 - Keys live as long as the process
    def run_hinted(self, shard: int) -> str:
        """Hash: run_id -> the run version the latest hint was written for. A stale entry is
        removed only by a reader that saw the run at that version or later."""
        return f"{self._shard(shard)}:run-hinted"

    @functools.lru_cache(maxsize=_NAMES_CACHED)  # noqa: B019 - Keys live as long as the process
    def agent_runs(self, shard: int, agent_id: str) -> str:
        """Sorted set: run_id scored by creation time, the agent's runs (listing)."""
        return f"{self._shard(shard)}:agent:{part(agent_id)}"

    def agent_user_runs(self, shard: int, agent_id: str, user_id: str) -> str:
        """Sorted set: run_id by creation time, the agent's runs of one user."""
        return f"{self._shard(shard)}:agent-user:{part(agent_id)}:{part(user_id)}"

    def agent_session_runs(self, shard: int, agent_id: str, session_id: str) -> str:
        """Sorted set: run_id by creation time, the agent's runs of one session."""
        return f"{self._shard(shard)}:agent-session:{part(agent_id)}:{part(session_id)}"

    @functools.lru_cache(maxsize=_NAMES_CACHED)  # noqa: B019 - Keys live as long as the process
    def agent_state_runs(self, shard: int, agent_id: str, state: str) -> str:
        """Sorted set: run_id by creation time, the agent's runs hinted in one state."""
        return f"{self._shard(shard)}:agent-state:{part(agent_id)}:{part(state)}"

    @functools.lru_cache(maxsize=_NAMES_CACHED)  # noqa: B019 - Keys live as long as the process
    def executing(self, shard: int) -> str:
        """Sorted set: run_id scored by lease expiry, for the lapsed-lease sweep."""
        return f"{self._shard(shard)}:executing"

    @functools.lru_cache(maxsize=_NAMES_CACHED)  # noqa: B019 - Keys live as long as the process
    def paused(self, shard: int) -> str:
        """Sorted set: run_id scored by pause time, for the pause-expiry sweep."""
        return f"{self._shard(shard)}:paused"

    @functools.lru_cache(maxsize=_NAMES_CACHED)  # noqa: B019 - Keys live as long as the process
    def finished(self, shard: int) -> str:
        """Sorted set: run_id scored by finish time, for retention of the indexes."""
        return f"{self._shard(shard)}:finished"

    @functools.lru_cache(maxsize=_NAMES_CACHED)  # noqa: B019 - Keys live as long as the process
    def approvals(self, shard: int) -> str:
        """Sorted set: `approval_member` scored by creation time (newest-first listing)."""
        return f"{self._shard(shard)}:approvals"

    def approvals_by(self, shard: int, field: str, value: str) -> str:
        """Sorted set: approvals with one status, agent, user or session (APPROVAL_FIELDS)."""
        if field not in APPROVAL_FIELDS:
            raise ValueError(f"no approvals index by {field!r}")
        return f"{self._shard(shard)}:approvals-{field}:{part(value)}"

    def run_approvals(self, run_id: str) -> str:
        """Sorted set: the approvals of one run, in the run's shard (run filter, purge)."""
        return f"{self._shard(shard_of(run_id))}:run-approvals:{part(run_id)}"

    def sessions(self, shard: int, sort_by: str, agent_id: str | None = None,
                 user_id: str | None = None) -> str:
        """Sorted set: session_id scored by `sort_by` (created_at or updated_at), for all
        sessions, one agent's, one user's, or one user's with one agent (listing hints), in
        the session's shard, `shard_of(session_id)`.

        The ids are length-prefixed, so no pair of ids can spell another pair's key.
        """
        scope = "all"
        if agent_id is not None:
            scope = f"agent:{len(agent_id)}:{agent_id}"
        if user_id is not None:
            scope += f":user:{len(user_id)}:{user_id}"
        return f"{self._shard(shard)}:sessions:{sort_by}:{scope}"

    def approval_runs(self, approval_id: str) -> str:
        """Hash: approval_id -> run_id, to find an approval's slot from its id alone."""
        return f"{self._shard(shard_of(approval_id))}:approval-run"

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


@functools.lru_cache(maxsize=_NAMES_CACHED)
def _digest(key: str) -> str:
    """The name part of an Idempotency-Key (most calls pass "-": no key)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def approval_member(approval_id: str, run_id: str) -> str:
    """An approvals index member: the id first (ties order by id), then its run."""
    return f"{approval_id}\x00{run_id}"


def split_approval_member(member: str) -> tuple[str, str]:
    """(approval_id, run_id) of an approvals index member."""
    approval_id, _, run_id = member.partition("\x00")
    return approval_id, run_id
