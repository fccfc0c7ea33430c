"""The Redis store: per run a hash, a document, a list of events and a bell; Lua compare-and-set.

The run's hash holds short fields only (Redis keeps it compact); the document is its own key,
written only by the commits that change it; the events are a list, event N at index N - 1
and stored without the envelope the hash already holds (see `Envelope`); the bell is a
one-entry stream each commit touches, for followers in other processes to block on (XREAD),
and it lapses shortly after the run pauses or ends. So a paused demo run keeps under 4 KB and
a delta costs its own bytes.

Scripts are sent with EVALSHA and reloaded on NOSCRIPT (on a single server through
`redis_scripts`, which skips redis-py's per-command layers; in a cluster through redis-py's
`Script`). On a single server a commit's index writes go inside its script, and a create's
session link inside its CREATE. In a cluster, index keys (listing, sweeps) are written
before the run's own atomic commit and checked against the run when read, so a crash between
the two leaves a harmless hint, never a wrong answer (see `redis_index`); there the client is
redis-py's `RedisCluster`: every script touches the keys of one slot, and pipelines hold only
commands it can route one by one.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.connection import Encoder
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from statemachine import deadline, lua
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
from statemachine.keys import SHARDS, Keys, approval_member, shard_of
from statemachine.outbox import (
    OUTBOX_SHARDS,
    OutboxEntry,
    commit_entries,
    resolution_entry,
)
from statemachine.outbox import shard_of as outbox_shard_of
from statemachine.redis_index import Merge, RedisIndex, pipe_eval
from statemachine.redis_scripts import LeanScript, ScriptRunner
from statemachine.states import RunState
from statemachine.store import (
    ENVELOPE_KEYS,
    SESSION_SORTS,
    Approval,
    ApprovalQuery,
    Commit,
    CommitResult,
    Envelope,
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
    session_matches,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    redis.exceptions.BusyLoadingError,
    # A cluster electing a new primary, or a slot with no node for a moment:
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.MasterDownError,
)
_SCAN_BATCH = 200
# Answers of a server that cannot take the command now but will later: 503, never 500.
# OOM is `maxmemory` reached with a no-eviction policy (scripts fail with it too).
_TRANSIENT_REPLIES = ("READONLY", "LOADING", "MASTERDOWN", "OOM", "BUSY ")
# A session's run hint whose run does not exist yet may belong to a create in flight; it is
# dropped only once it is older than this (a create takes milliseconds, or fails at once).
RUN_HINT_GRACE_SECONDS = 300.0
# A name filter cannot use an index: it reads at most this many index entries per listing.
NAME_SCAN_LIMIT = 10_000


def _guarded(method: Callable[..., T]) -> Callable[..., T]:
    """Turn Redis connectivity failures into StoreUnavailable (HTTP 503)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        deadline.check("redis")
        try:
            return method(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
        except redis.exceptions.ResponseError as exc:
            if _transient(exc):
                raise StoreUnavailable(f"redis: {exc}") from exc
            raise

    return wrapper


def _transient(exc: redis.exceptions.ResponseError) -> bool:
    """True for a reply that says "not now" (OOM, read-only replica, loading, busy script)."""
    text = str(exc)
    return text.startswith(_TRANSIENT_REPLIES) or "when used memory > 'maxmemory'" in text


def _uncounted() -> None:
    return None


on_round_trip: Callable[[], None] = _uncounted
"""Called once per command or pipeline sent to Redis (the app counts them for /metrics)."""


class _DeadlineBound:
    """Connection mixin: no command starts once the request's store budget is spent, and no
    reply is awaited longer than what is left of it (a frozen server costs one budget per
    request, not one socket timeout per call). Each send is one round trip: counted."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        deadline.check("redis")
        on_round_trip()
        super().send_packed_command(command, check_health)  # type: ignore[misc]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if deadline.remaining() is not None and "timeout" not in kwargs:
            kwargs["timeout"] = deadline.cap(self.socket_timeout)  # type: ignore[attr-defined]
        return super().read_response(*args, **kwargs)  # type: ignore[misc]


def _bind_to_deadline(pool: redis.ConnectionPool) -> None:
    """Give the pool's connection class (TCP, TLS or unix, as the URL chose) the mixin."""
    base = pool.connection_class
    pool.connection_class = type(f"Deadline{base.__name__}", (_DeadlineBound, base), {})


def _opt_float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _run_from_hash(fields: dict[str, str], doc: str | None = None) -> StoredRun:
    """The run of a hash and its document (JSON; a run stored before the document had its
    own key keeps it in the hash, and a reader that needs no document passes none)."""
    pending = int(fields.get("pending_approvals") or 0)
    return StoredRun(
        run_id=fields["run_id"],
        agent_id=fields["agent_id"],
        session_id=fields["session_id"],
        user_id=fields.get("user_id") or None,
        state=RunState(fields["state"]),
        version=int(fields["version"]),
        created_at=float(fields["created_at"]),
        updated_at=float(fields["updated_at"]),
        doc=loads(doc or fields.get("doc") or "{}"),
        admin_pending=pending > 0,
        pending_approvals=pending,
        last_seq=int(fields.get("last_seq") or 0),
        lease_owner=fields.get("lease_owner") or None,
        lease_until=_opt_float(fields.get("lease_until")),
        paused_at=_opt_float(fields.get("paused_at")),
        cancel_requested=fields.get("cancel_requested") == "1",
        commit_token=fields.get("commit_token") or None,
    )


def approval_from_hash(fields: dict[str, str]) -> Approval:
    doc = json.loads(fields["doc"])
    resolution = json.loads(fields["resolution"]) if fields.get("resolution") else {}
    return Approval(
        approval_id=doc["id"],
        run_id=doc["run_id"],
        status=fields["status"],
        doc=doc,
        resolution_data=resolution.get("resolution_data"),
        resolved_by=resolution.get("resolved_by"),
        resolved_at=resolution.get("resolved_at"),
        updated_at=int(float(fields["updated_at"])) if fields.get("updated_at") else None,
    )


def _num(value: float | None) -> str:
    return "" if value is None else repr(value)


_STRIPPED = "~"  # an event stored without its envelope (see `Envelope`)


def _pack(event: dict[str, Any], envelope: Envelope | None) -> str:
    """An event as the events list holds it: without the run's envelope when it has it."""
    stripped = envelope.strip(event) if envelope is not None else None
    return dumps(event) if stripped is None else _STRIPPED + dumps(stripped)


def _unpack(raw: str, envelope: Envelope) -> dict[str, Any]:
    if raw.startswith(_STRIPPED):
        return envelope.dress(loads(raw[1:]))
    return loads(raw)


def _envelope(fields: dict[str, str | None]) -> Envelope:
    """The envelope of the run whose hash has `fields` (for putting events back whole)."""
    return Envelope(*(fields.get(key) or "" for key in ENVELOPE_KEYS))


def _stored_events(raws: list[str], after: int, envelope: Envelope) -> list[StoredEvent]:
    """The list's elements read from index `after` on, as the events they store."""
    return [StoredEvent(seq=after + i + 1, data=_unpack(raw, envelope))
            for i, raw in enumerate(raws)]


def _creation_envelope(run: StoredRun) -> Envelope | None:
    name = run.doc.get("agent_name")
    return Envelope(run.agent_id, name, run.run_id, run.session_id) \
        if isinstance(name, str) else None


class _LazyCluster:
    """A `RedisCluster` built on first use, not at start.

    Building one reads the cluster's slot map, so it needs a reachable node; a server must
    start (and answer 503) while the cluster is down or electing. Scripts registered on it
    need only its encoder, which needs no connection.
    """

    def __init__(self, factory: Callable[[], RedisCluster]) -> None:
        self._factory = factory
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    def get_encoder(self) -> Encoder:
        return Encoder(encoding="utf-8", encoding_errors="strict", decode_responses=True)

    def client(self) -> RedisCluster:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = self._factory()
                    except redis.exceptions.RedisClusterException as exc:
                        raise RedisConnectionError(f"cluster unreachable: {exc}") from exc
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client(), name)

    def close(self) -> None:
        """Close the cluster client and every node's pool (its own `close` leaves the pools
        of node clients open, and `WAIT` uses them directly)."""
        if self._client is None:
            return
        nodes = self._client.get_nodes()
        self._client.close()
        for node in nodes:
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()


def connect(url: str, *, cluster: bool, socket_timeout: float, max_connections: int) -> Any:
    """The Redis client for `url` (`redis://`, `rediss://` with TLS, `unix://`; user and
    password in the URL): one server, or with `cluster` a Redis Cluster reached through
    any of its nodes. Timeouts bound every call; the pool is bounded."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": min(socket_timeout, 2.0),
        "health_check_interval": 15,
        "max_connections": max_connections,
    }
    if cluster:
        return _LazyCluster(lambda: _bound_cluster(RedisCluster.from_url(url, **options)))
    pool = redis.BlockingConnectionPool.from_url(url, timeout=socket_timeout, **options)
    _bind_to_deadline(pool)
    return redis.Redis(connection_pool=pool)


def _bound_cluster(client: RedisCluster) -> RedisCluster:
    """Bind every node's pool to the request deadline, now and for nodes found later (a
    failover, a resharding): the cluster client makes node pools from these kwargs."""
    kwargs = client.nodes_manager.connection_kwargs
    base = kwargs.get("connection_class") or redis.Connection
    if not issubclass(base, _DeadlineBound):
        kwargs["connection_class"] = type(f"Deadline{base.__name__}", (_DeadlineBound, base), {})
    for node in client.get_nodes():
        if node.redis_connection is not None:
            pool = node.redis_connection.connection_pool
            pool.disconnect()
            pool.connection_class = kwargs["connection_class"]
            pool.connection_kwargs.pop("connection_class", None)
    return client


class RedisRunStore:
    """RunStore on Redis; safe for any number of processes and hosts sharing one server or
    one Redis Cluster."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "agentos",
        socket_timeout: float = 5.0,
        max_connections: int = 64,
        cluster: bool = False,
        wait_replicas: int = 0,
        outbox: bool = False,
    ) -> None:
        self.keys = Keys(prefix)
        self.outbox = outbox
        self.cluster = cluster
        self.wait_replicas = wait_replicas
        self.wait_timeout = min(1.0, socket_timeout / 2)
        self.redis = connect(url, cluster=cluster, socket_timeout=socket_timeout,
                             max_connections=max_connections)
        self.index = RedisIndex(self.redis, self.keys, _run_from_hash, approval_from_hash)
        self._block_cap = max(0.1, socket_timeout - 1.0)
        # One server: scripts go through a runner that skips redis-py's per-command layers
        # (see `redis_scripts`); a cluster client routes each by its keys itself.
        self._runner = None if cluster else ScriptRunner(self.redis.connection_pool)
        self._commit = self._script(lua.COMMIT)
        self._create = self._script(lua.CREATE)
        self._read = self._script(lua.READ_RUN)
        self._resolve = self._script(lua.RESOLVE)
        self._delete_approval = self._script(lua.DELETE_APPROVAL)
        self._renew = self._script(lua.RENEW_LEASE)
        self._request_cancel = self._script(lua.REQUEST_CANCEL)
        self._link_session = self._script(lua.LINK_SESSION)
        self._create_session = self._script(lua.CREATE_SESSION)
        self._update_session = self._script(lua.UPDATE_SESSION)
        self._delete_run = self._script(lua.DELETE_RUN)
        self._delete_session = self._script(lua.DELETE_SESSION)

        self._claim = self._script(lua.OUTBOX_CLAIM)
        self._reschedule = self._script(lua.OUTBOX_RESCHEDULE)

    def _script(self, source: str) -> Any:
        script = self.redis.register_script(source)
        return script if self._runner is None else LeanScript(script, self._runner)

    # -- runs ---------------------------------------------------------------------------

    @_guarded
    def ping(self) -> None:
        self.redis.ping()

    @_guarded
    def create_run(self, run: StoredRun, events: list[dict[str, Any]],
                   session: SessionLink | None = None,
                   remember: Remember | None = None) -> CommitResult:
        """Store a new run at version 1 with its first events; the id must be new.

        In a cluster the session is linked first, as a hint: its keys live in another slot
        than the run's, so one script cannot write both. A session whose run then failed to
        be stored keeps a run hint that reads drop (after RUN_HINT_GRACE_SECONDS) and may
        keep that run's message as its name; a run is never stored without its session.
        On a single server CREATE links the session, writes its listing entries and the
        run's index entries itself: one round trip, all or nothing.
        `remember` (an Idempotency-Key's outcome) is written by the run's own script.
        """
        inline_link = session if session is not None and not self.cluster else None
        if session is not None and inline_link is None:
            self._link(session, run.run_id)
        if self.cluster:
            self.index.hint_create(run)
        keys, args = self._create_call(run, events, remember, inline_link)
        out = self._create(keys=keys, args=args)
        if out[0] == -5:
            raise StaleRun(f"run {run.run_id} already exists")
        if out[0] == -6:
            raise SessionOwnedElsewhere(inline_link.session_id if inline_link else "")
        seqs = [int(s) for s in out[1:1 + len(events)]]
        if inline_link is not None:
            self._linked(inline_link, out[1 + len(events)])
        return CommitResult(version=1, seqs=seqs)

    @_guarded
    def bulk_create(self, runs: list[tuple[StoredRun, list[dict[str, Any]]]]) -> None:
        """`create_run` (no session, no remembered outcome) for many runs in one pipeline,
        as create_run sends them: on a single server each CREATE with its index entries, in
        a cluster each run's index hint and then its CREATE (sent whole: a cluster pipeline
        refuses EVALSHA). For bulk loading (benchmarks, imports); raises StaleRun after the
        pipeline if any id existed."""
        pipe = self.redis.pipeline(transaction=False)
        for run, events in runs:
            keys, args = self._create_call(run, events, None)
            if self.cluster:
                self.index.hint_create(run, pipe)
                pipe_eval(pipe, lua.CREATE, keys, args)
            else:
                self._create(keys=keys, args=args, client=pipe)
        outs = pipe.execute()[1::2] if self.cluster else pipe.execute()
        taken = [run.run_id for (run, _), out in zip(runs, outs, strict=True) if out[0] == -5]
        if taken:
            raise StaleRun(f"{len(taken)} runs already exist, e.g. {taken[0]}")

    def _create_call(self, run: StoredRun, events: list[dict[str, Any]],
                     remember: Remember | None, link: SessionLink | None = None
                     ) -> tuple[list[str], list[Any]]:
        """CREATE's keys and arguments for `run` at version 1 with its first events (and,
        on a single server, the session `link` it makes)."""
        envelope = _creation_envelope(run)
        fields = {
            "run_id": run.run_id,
            "agent_id": run.agent_id,
            "session_id": run.session_id,
            "user_id": run.user_id or "",
            "state": run.state.value,
            "version": 1,
            "created_at": repr(run.created_at),
            "updated_at": repr(run.updated_at),
            "agent_name": run.doc.get("agent_name") if envelope else "",
            "pending_approvals": 0,
            "lease_owner": run.lease_owner or "",
            "lease_until": _num(run.lease_until),
            "paused_at": _num(run.paused_at),
        }
        rid = run.run_id
        keys = [self.keys.run(rid), self.keys.events(rid),
                self.keys.idempotency(rid, remember.key if remember else "-"),
                self.keys.doc(rid), self.keys.bell(rid)]
        args = [
            len(events), dumps(fields), dumps(run.doc), *(_pack(e, envelope) for e in events),
            dumps(remember.value) if remember else "", remember.ttl if remember else 0,
            "" if self.cluster else self.index.inline_create(run), ""]
        if link is not None:
            keys += [self.keys.session(link.session_id), self.keys.session_runs(link.session_id)]
            args[-1] = dumps({"a": self._link_args(link, rid),
                              **self._session_hint_keys(link.session_id, link.agent_id,
                                                        link.user_id)})
        return keys, args

    @_guarded
    def get_run(self, run_id: str) -> StoredRun:
        return self._read_run(run_id, None, None).run

    @_guarded
    def read_run(self, run_id: str, *, events_after: int | None = None,
                 recall: str | None = None) -> RunRead:
        """The run, its events after `events_after` and a remembered outcome: one script,
        so one round trip and one consistent view (its keys share the run's slot)."""
        return self._read_run(run_id, events_after, recall)

    def _read_run(self, run_id: str, events_after: int | None,
                  recall: str | None) -> RunRead:
        keys = [self.keys.run(run_id), self.keys.doc(run_id), self.keys.events(run_id),
                self.keys.idempotency(run_id, recall or "-")]
        out = self._read(keys=keys, args=["" if events_after is None else events_after,
                                          "1" if recall is not None else ""])
        if out[0] == 0:
            raise RunNotFound(run_id)
        flat = out[1]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        run = _run_from_hash(fields, out[2])
        events = None
        if events_after is not None:
            events = _stored_events(out[3], events_after, _envelope(fields))
        return RunRead(run, events, json.loads(out[4]) if out[4] else None)

    @_guarded
    def commit(self, commit: Commit) -> CommitResult:
        """Apply `commit` atomically if the run is still at its expected version.

        On a single server the index writes travel inside the commit's own script (one round
        trip); in a cluster they live in other slots, so they are hints written before and
        clean-ups after it (see `redis_index`).
        """
        inline = commit.reindex and not self.cluster
        if commit.reindex and not inline:
            self.index.hint_commit(commit)
        rid = commit.run_id
        remember = commit.remember
        keys = [self.keys.run(rid), self.keys.events(rid),
                self.keys.idempotency(rid, remember.key if remember else "-")]
        keys += [self.keys.approval(rid, a.approval_id) for a in commit.approvals]
        keys += [self.keys.approval(rid, a) for a in commit.expire_approvals]
        retained = commit.approval_ids if commit.retain_seconds else []
        keys += [self.keys.approval(rid, a) for a in retained]
        entries = self._commit_entries(commit)
        args: list[Any] = [
            commit.expected_version,
            commit.state.value,
            commit.encoded_doc(),
            repr(commit.now),
            commit.lease_owner or "",
            _num(commit.lease_until),
            _num(commit.paused_at),
            "" if commit.retain_seconds is None else int(commit.retain_seconds),
            len(commit.events),
            len(commit.approvals),
            len(commit.expire_approvals),
            len(retained),
            dumps(remember.value) if remember else "",
            remember.ttl if remember else 0,
            "1" if commit.honour_cancel else "",
            _num(commit.lease_lapsed_by),
            commit.token or "",
            self.index.inline(commit, self._outbox_hint(rid, entries)) if inline else "",
            commit.envelope.agent_name if commit.envelope else "",
            *(_pack(e, commit.envelope) for e in commit.events),
            *(dumps(a.doc) for a in commit.approvals),
        ]
        keys += [self.keys.doc(rid), self.keys.bell(rid)]
        keys, args = self._with_outbox(rid, keys, args, entries, hinted=inline)
        out = self._replicated(keys, args) if commit.reindex else \
            self._commit(keys=keys, args=args)
        if out[0] < 0 and commit.reindex and not inline:
            self.index.after_lost_commit(commit)
        if out[0] == -1:
            raise RunNotFound(rid)
        if out[0] == -2:
            raise StaleRun(rid)
        if out[0] == -7:
            raise CancelRequested(rid)
        if commit.reindex and not inline:
            self.index.after_commit(commit, int(out[0]))
        return CommitResult(version=int(out[0]), seqs=[int(s) for s in out[1:]])

    @_guarded
    def request_cancel(self, run_id: str, expected_state: RunState, now: float) -> int:
        """Record a cancel request if the run is still in `expected_state`; the new version."""
        out = self._request_cancel(keys=[self.keys.run(run_id)],
                                   args=[expected_state.value, repr(now)])
        if out == -1:
            raise RunNotFound(run_id)
        if out == -2:
            raise StaleRun(run_id)
        return int(out)

    def _replicated(self, keys: list[str], args: list[Any]) -> Any:
        """COMMIT, then (with `wait_replicas`) WAIT on the same connection until that many
        replicas have the write, for at most `wait_timeout` seconds.

        A state change (above all PAUSED -> CONTINUED, after which tools run) that only the
        primary holds is lost if the primary dies before replicating it; the promoted replica
        would let the run be continued a second time. Waiting closes that window whenever the
        replicas keep up; when they do not, the write stands and the shortfall is logged (a
        continue must not fail because a replica is slow)."""
        if not self.wait_replicas:
            return self._commit(keys=keys, args=args)
        try:
            pipe = self._node(keys[0]).pipeline(transaction=False)
            self._commit(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.wait_replicas, int(self.wait_timeout * 1000))
            out, acked = pipe.execute()
        except (redis.exceptions.MovedError, redis.exceptions.AskError):
            return self._commit(keys=keys, args=args)  # refused unrun; the cluster client routes
        if int(acked) < self.wait_replicas:
            log.warning("commit on %s reached %s of %s replicas within %ss", keys[0], acked,
                        self.wait_replicas, self.wait_timeout)
        return out

    def _node(self, key: str) -> Any:
        """The client of the node that serves `key` (WAIT counts one connection's writes)."""
        if not self.cluster:
            return self.redis
        return self.redis.get_redis_connection(self.redis.get_node_from_key(key))

    @_guarded
    def read_events(self, run_id: str, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrange(self.keys.events(run_id), after, after + limit - 1)
        pipe.hmget(self.keys.run(run_id), *ENVELOPE_KEYS)
        raws, identity = pipe.execute()
        return _stored_events(raws, after, _envelope(dict(zip(ENVELOPE_KEYS, identity,
                                                               strict=True))))

    @_guarded
    def wait_events(self, run_id: str, after: int, timeout: float) -> list[StoredEvent]:
        """Block up to `timeout` seconds on the run's bell for a commit after event `after`
        (XREAD BLOCK), then read what it committed."""
        block_ms = max(1, int(min(timeout, self._block_cap) * 1000))
        if not self.redis.xread({self.keys.bell(run_id): f"0-{after}"}, count=1,
                                block=block_ms):
            return []
        return self.read_events(run_id, after)

    @_guarded
    def list_runs(self, query: RunQuery) -> list[StoredRun]:
        """Newest first, from the index of the most selective filter (see `redis_index`)."""
        return self.index.list_runs(query)

    # -- leases and sweeps --------------------------------------------------------------

    @_guarded
    def renew_leases(self, owner: str, run_ids: Iterable[str], until: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        ids = list(run_ids)
        for run_id in ids:
            pipe_eval(pipe, lua.RENEW_LEASE, [self.keys.run(run_id)], [owner, repr(until)])
        self.index.renew(ids, until, pipe)
        pipe.execute()

    @_guarded
    def runs_with_lapsed_lease(self, now: float, limit: int = 100) -> list[str]:
        """Runs whose lease hint lapsed; hints of runs no longer executing are dropped."""
        return self.index.due("executing", now, limit, lease_lapsed)

    @_guarded
    def runs_paused_before(self, before: float, limit: int = 100) -> list[str]:
        return self.index.due("paused", before, limit, paused_before)

    # -- approvals ----------------------------------------------------------------------

    def _approval_key(self, approval_id: str) -> str:
        run_id = self.redis.hget(self.keys.approval_runs(approval_id), approval_id)
        if not run_id:
            raise ApprovalNotFound(approval_id)
        return self.keys.approval(run_id, approval_id)

    @_guarded
    def get_approval(self, approval_id: str) -> Approval:
        fields = self.redis.hgetall(self._approval_key(approval_id))
        if not fields:
            raise ApprovalNotFound(approval_id)
        return approval_from_hash(fields)

    @_guarded
    def list_approvals(self, query: ApprovalQuery) -> tuple[list[Approval], int]:
        return self.index.list_approvals(query)

    @_guarded
    def count_pending_approvals(self, user_id: str | None = None) -> int:
        return self.index.count_pending(user_id)

    @_guarded
    def resolve_approval(self, approval: Approval, expected_version: int, now: float,
                         run_doc: dict[str, Any] | None = None):
        """Compare-and-set pending -> approval.status and release the run's guard, atomically;
        `run_doc` (the run's document with the decision in it) is written in the same step."""
        resolution = {
            "resolution_data": approval.resolution_data,
            "resolved_by": approval.resolved_by,
            "resolved_at": approval.resolved_at,
        }
        keys = [self.keys.run(approval.run_id),
                self.keys.approval(approval.run_id, approval.approval_id),
                self.keys.doc(approval.run_id)]
        self.index.hint_resolve(approval, expected_version)
        entries = [resolution_entry(approval, now)] if self.outbox else []
        args = [expected_version, approval.status, dumps(resolution), repr(now),
                "" if run_doc is None else dumps(run_doc)]
        out = self._resolve(*self._with_outbox(approval.run_id, keys, args, entries))
        result = resolve_outcome(out[0], approval, out[1] if len(out) > 1 else None)
        self.index.after_resolve(approval, result.version)
        return result

    @_guarded
    def delete_approval(self, approval_id: str) -> None:
        run_id = self.redis.hget(self.keys.approval_runs(approval_id), approval_id)
        if not run_id:
            raise ApprovalNotFound(approval_id)
        out = self._delete_approval(keys=[self.keys.approval(run_id, approval_id)])
        if out == -3:
            raise ApprovalNotFound(approval_id)
        if out == -4:
            raise ApprovalStillPending()
        pipe = self.redis.pipeline(transaction=False)
        self.index.forget_approval(pipe, approval_member(approval_id, run_id),
                                   self.index.identity(run_id))
        pipe.execute()

    # -- idempotency, retention ---------------------------------------------------------

    @_guarded
    def recall(self, run_id: str, key: str) -> dict[str, Any] | None:
        """The outcome a commit remembered under (run, key), if it has not expired."""
        value = self.redis.get(self.keys.idempotency(run_id, key))
        return json.loads(value) if value else None

    @_guarded
    def purge_finished(self, before: float) -> int:
        """Drop every index entry of runs finished before `before` (their keys expire by TTL,
        before or after this runs)."""
        return self.index.purge(before)

    # -- sessions -------------------------------------------------------------------------

    def _link(self, link: SessionLink, run_id: str) -> None:
        """Index hints first, then the session itself (made, or joined by the run)."""
        keys = [self.keys.session(link.session_id), self.keys.session_runs(link.session_id)]
        self._hint_session(link.session_id, link.agent_id, link.user_id, link.now, link.now)
        out = self._link_session(keys=keys, args=self._link_args(link, run_id))
        if out[0] == -6:
            self._restore_updated(link.session_id)
            raise SessionOwnedElsewhere(link.session_id)
        self._linked(link, out)

    @staticmethod
    def _link_args(link: SessionLink, run_id: str) -> list[str]:
        return [link.session_id, link.agent_id, link.user_id or "", link.message,
                repr(link.now), run_id, "1" if link.exclusive else ""]

    def _linked(self, link: SessionLink, out: list[Any]) -> None:
        """After a link answered `out`: the listing entries of what the session turned out
        to be (its own agent and user, its true creation time), when they differ from the
        hints written with the link."""
        agent_id, user_id = out[1] or None, out[2] or None
        if out[0] == 2:  # the session took the run's agent: its agent indexes are new
            self._index_created(link.session_id, agent_id, user_id, float(out[3]))
        if (agent_id, user_id) != (link.agent_id, link.user_id):
            self._hint_session(link.session_id, agent_id, user_id, None, link.now)

    def _session_hint_keys(self, session_id: str, agent_id: str | None,
                           user_id: str | None) -> dict[str, list[str]]:
        """The listings a linked session enters: by creation time (never replacing an
        entry, `nx`) and by update time (only moving it forward, `gt`)."""
        return {"nx": self._index_keys(session_id, "created_at", agent_id, user_id),
                "gt": self._index_keys(session_id, "updated_at", agent_id, user_id)}

    def _index_created(self, session_id: str, agent_id: str | None, user_id: str | None,
                       created_at: float) -> None:
        """The session's true creation time in its indexes (the hint had the run's time)."""
        pipe = self.redis.pipeline(transaction=False)
        for key in self._index_keys(session_id, "created_at", agent_id, user_id):
            pipe.zadd(key, {session_id: created_at})
        pipe.execute()

    def _index_keys(self, session_id: str, sort_by: str, agent_id: str | None,
                    user_id: str | None) -> list[str]:
        """Every listing index a session with this agent and user belongs to (all in the
        session's index shard)."""
        scopes = [(None, None), (agent_id, None)] if agent_id else [(None, None)]
        if user_id is not None:
            scopes += [(a, user_id) for a, _ in scopes]
        shard = shard_of(session_id)
        return [self.keys.sessions(shard, sort_by, a, u) for a, u in scopes]

    def _hint_session(self, session_id: str, agent_id: str | None, user_id: str | None,
                      created_at: float | None, updated_at: float, new: bool = False) -> None:
        """Listing hints: a session's creation time (never replacing an entry) and a later
        `updated_at` (only ever moving it forward; a `new` session's never replaces one)."""
        pipe = self.redis.pipeline(transaction=False)
        self._queue_session_hints(pipe, session_id, agent_id, user_id, created_at, updated_at,
                                  new)
        pipe.execute()

    def _queue_session_hints(self, pipe: Any, session_id: str, agent_id: str | None,
                             user_id: str | None, created_at: float | None,
                             updated_at: float, new: bool = False) -> None:
        if created_at is not None:
            for key in self._index_keys(session_id, "created_at", agent_id, user_id):
                pipe.zadd(key, {session_id: created_at}, nx=True)
        for key in self._index_keys(session_id, "updated_at", agent_id, user_id):
            pipe.zadd(key, {session_id: updated_at}, nx=new, gt=not new)

    def _restore_updated(self, session_id: str) -> None:
        """Put back the stored `updated_at` after a hint for a write that did not happen."""
        session = self.get_session(session_id)
        pipe = self.redis.pipeline(transaction=False)
        for key in self._index_keys(session_id, "updated_at", session.agent_id,
                                    session.user_id):
            pipe.zadd(key, {session_id: session.updated_at}, xx=True)
        pipe.execute()

    @_guarded
    def create_session(self, session: StoredSession) -> None:
        self._hint_session(session.session_id, session.agent_id, session.user_id,
                           session.created_at, session.updated_at, new=True)
        fields = {
            "session_id": session.session_id, "agent_id": session.agent_id or "",
            "user_id": session.user_id or "", "session_state": dumps(session.session_state),
            "created_at": repr(session.created_at), "updated_at": repr(session.updated_at),
        }
        if session.name is not None:
            fields["name"] = session.name
        if session.metadata is not None:
            fields["metadata"] = dumps(session.metadata)
        if self._create_session(keys=[self.keys.session(session.session_id)],
                                args=[dumps(fields)]) == -5:
            raise SessionExists(session.session_id)

    @_guarded
    def get_session(self, session_id: str) -> StoredSession:
        fields = self.redis.hgetall(self.keys.session(session_id))
        if not fields:
            raise SessionNotFound(session_id)
        return _session_from_hash(fields)

    @_guarded
    def update_session(self, session_id: str, changes: dict[str, Any],
                       now: float) -> StoredSession:
        """Set the given fields (`name`, `session_state`, `metadata`) and `updated_at`."""
        current = self.get_session(session_id)
        self._hint_session(session_id, current.agent_id, current.user_id, None, now)
        pairs: list[Any] = []
        for name, value in changes.items():
            pairs += [name, value if name == "name" else dumps(value)]
        if self._update_session(keys=[self.keys.session(session_id)],
                                args=[repr(now), *pairs]) == -1:
            raise SessionNotFound(session_id)
        return self.get_session(session_id)

    @_guarded
    def list_sessions(self, query: SessionQuery) -> tuple[list[StoredSession], int]:
        """A page merged from the index shards that hold exactly the filtered sessions.

        Without a name filter the page costs the page (at most `offset + limit` entries of
        each shard, plus any stale hints met on the way, which are dropped) and the total is
        the indexes' size; a name filter reads them in order, at most NAME_SCAN_LIMIT
        entries, and counts the matches it saw.
        """
        if query.sort_by not in SESSION_SORTS:
            raise ValueError(f"cannot sort sessions by {query.sort_by!r}")
        indexes = [self.keys.sessions(shard, query.sort_by, query.agent_id, query.user_id)
                   for shard in range(SHARDS)]
        if query.name_contains is None:
            merge = Merge(self.redis, indexes, query.offset + query.limit, query.descending)
            merge.take(query.offset)
            page = self._scan_sessions(merge, query, query.limit, query.limit + _SCAN_BATCH)
            pipe = self.redis.pipeline(transaction=False)
            for index in indexes:
                pipe.zcard(index)
            return page, sum(pipe.execute())
        merge = Merge(self.redis, indexes, _SCAN_BATCH, query.descending)
        matches = self._scan_sessions(merge, query, NAME_SCAN_LIMIT, NAME_SCAN_LIMIT)
        return matches[query.offset:query.offset + query.limit], len(matches)

    def _scan_sessions(self, merge: Merge, query: SessionQuery, wanted: int,
                       budget: int) -> list[StoredSession]:
        """Up to `wanted` sessions that still match, in index order, reading at most
        `budget` index entries."""
        found: list[StoredSession] = []
        read = 0
        while len(found) < wanted and read < budget:
            count = min(_SCAN_BATCH, budget - read, max(wanted - len(found), 1))
            entries = merge.take(count)
            if not entries:
                break
            read += len(entries)
            found += [s for s in self._sessions_of(entries, query) if session_matches(s, query)]
        return found[:wanted]

    def _sessions_of(self, entries: list[Any], query: SessionQuery) -> list[StoredSession]:
        """The sessions behind index entries; entries of gone sessions, or of sessions of
        another agent or user than the index's, are dropped from it."""
        pipe = self.redis.pipeline(transaction=False)
        for entry in entries:
            pipe.hgetall(self.keys.session(entry.member))
        found, stale = [], self.redis.pipeline(transaction=False)
        owner = SessionQuery(agent_id=query.agent_id, user_id=query.user_id)
        for entry, fields in zip(entries, pipe.execute(), strict=True):
            session = _session_from_hash(fields) if fields else None
            if session is not None and session_matches(session, owner):
                found.append(session)
            else:
                stale.zrem(entry.key, entry.member)
        stale.execute()
        return found

    @_guarded
    def session_runs(self, session_id: str, limit: int = 1000) -> list[StoredRun]:
        """The newest `limit` runs of the session, oldest first; old dead hints are dropped."""
        index = self.keys.session_runs(session_id)
        entries = self.redis.zrevrange(index, 0, limit - 1, withscores=True)
        pipe = self.redis.pipeline(transaction=False)
        for run_id, _ in entries:
            pipe.hgetall(self.keys.run(run_id))
            pipe.get(self.keys.doc(run_id))
        runs, dead = [], []
        horizon = time.time() - RUN_HINT_GRACE_SECONDS
        answers = pipe.execute() if entries else []
        for (run_id, score), fields, doc in zip(entries, answers[::2], answers[1::2],
                                                strict=True):
            if fields and fields.get("session_id") == session_id:
                runs.append(_run_from_hash(fields, doc))
            elif score < horizon or fields:
                dead.append(run_id)
        if dead:
            self.redis.zrem(index, *dead)
        return runs[::-1]

    @_guarded
    def delete_session(self, session_id: str, runs: list[RunRemoval], now: float,
                       retain_seconds: int) -> None:
        """Delete each planned run at its planned version, then the session once it is empty.

        Each run's deletion is one script (its keys share one slot); the session's runs live
        in other slots, so a run that moved since the plan stops the deletion (StaleRun)
        with the runs before it already gone, and a run that joined since keeps the session.
        """
        session = self.get_session(session_id)
        for removal in runs:
            self._remove_run(session_id, removal, now, retain_seconds)
        out = self._delete_session(keys=[self.keys.session(session_id),
                                         self.keys.session_runs(session_id)])
        if out == -2:
            raise StaleRun(session_id)
        if out == -1:
            raise SessionNotFound(session_id)
        self._forget_session(session)

    def _remove_run(self, session_id: str, removal: RunRemoval, now: float,
                    retain_seconds: int) -> None:
        rid = removal.run_id
        keys = [self.keys.run(rid), self.keys.events(rid), self.keys.doc(rid),
                self.keys.bell(rid)]
        keys += [self.keys.approval(rid, a) for a in removal.expire_approvals]
        keys += [self.keys.approval(rid, a) for a in removal.approval_ids]
        args = [removal.expected_version, repr(now), len(removal.expire_approvals),
                max(1, int(retain_seconds))]
        entries = self._commit_entries(removal.as_commit(now))
        out = self._delete_run(*self._with_outbox(rid, keys, args, entries))
        if out == -2:
            raise StaleRun(rid)
        self.redis.zrem(self.keys.session_runs(session_id), rid)
        self.index.deleted(rid, removal.expire_approvals, now)

    def _forget_session(self, session: StoredSession) -> None:
        """Drop the deleted session's listing hints (reads would drop them anyway)."""
        pipe = self.redis.pipeline(transaction=False)
        for sort_by in SESSION_SORTS:
            for index in self._index_keys(session.session_id, sort_by, session.agent_id,
                                          session.user_id):
                pipe.zrem(index, session.session_id)
        pipe.execute()

    # -- webhook outbox (issue 15) -------------------------------------------------------

    def _commit_entries(self, commit: Commit) -> list[OutboxEntry]:
        return commit_entries(commit) if self.outbox else []

    def _outbox_hint(self, run_id: str, entries: list[OutboxEntry]) -> list[list[str]]:
        """The outbox shard's entry for a run with new notifications, as [key, score,
        member] (verified when claimed, like every index hint)."""
        if not entries:
            return []
        return [[self.keys.outbox_shard(outbox_shard_of(run_id)), repr(entries[0].created_at),
                 run_id]]

    def _with_outbox(self, run_id: str, keys: list[str], args: list[Any],
                     entries: list[OutboxEntry],
                     hinted: bool = False) -> tuple[list[str], list[Any]]:
        """Append the outbox key and entries (the scripts' last key and ARGV tail); the
        shard hint goes first, like every index hint (unless the script itself writes it,
        `hinted`)."""
        if entries and not hinted:
            for key, score, member in self._outbox_hint(run_id, entries):
                self.redis.zadd(key, {member: float(score)})
        tail: list[Any] = []
        for entry in entries:
            tail += [entry.entry_id, entry.payload, repr(entry.created_at)]
        return [*keys, self.keys.outbox(run_id)], [*args, *tail, len(entries)]

    @_guarded
    def claim_outbox(self, now: float, lease_until: float, limit: int = 50) -> list[OutboxEntry]:
        """Lease due entries (until `lease_until`) so no other deliverer takes them meanwhile."""
        claimed: list[OutboxEntry] = []
        indexes = [self.keys.outbox_shard(shard) for shard in range(OUTBOX_SHARDS)]
        pipe = self.redis.pipeline(transaction=False)
        for index in indexes:
            pipe.zrangebyscore(index, "-inf", now, start=0, num=limit, withscores=True)
        for index, due in zip(indexes, pipe.execute(), strict=True):
            for run_id, score in due:
                claimed += self._claim_run(index, run_id, score, now, lease_until, limit)
                if len(claimed) >= limit:
                    return claimed
        return claimed

    def _claim_run(self, index: str, run_id: str, score: float, now: float,
                   lease_until: float, limit: int) -> list[OutboxEntry]:
        out = self._claim(keys=[self.keys.outbox(run_id)],
                          args=[repr(now), repr(lease_until), limit])
        self._reschedule(keys=[index], args=[run_id, repr(score), out[0]])
        rows = out[1:]
        return [OutboxEntry(entry_id=rows[i], run_id=run_id, payload=rows[i + 1],
                            attempts=int(rows[i + 2]), created_at=float(rows[i + 3]))
                for i in range(0, len(rows), 4)]

    @_guarded
    def settle_outbox(self, entry: OutboxEntry, *, delivered: bool,
                      retry_at: float | None = None, error: str | None = None) -> None:
        """Delivered: drop it. Else retry at `retry_at`, or (None) record it as failed."""
        key, eid = self.keys.outbox(entry.run_id), entry.entry_id
        fields = [f"p:{eid}", f"n:{eid}", f"t:{eid}", f"c:{eid}"]
        pipe = self.redis.pipeline(transaction=True)
        if delivered:
            pipe.hdel(key, *fields)
        elif retry_at is not None:
            pipe.hset(key, f"n:{eid}", repr(retry_at))
            pipe.hincrby(key, f"t:{eid}", 1)
        else:
            pipe.hset(self.keys.outbox_failed(entry.run_id), eid, dumps(
                {"payload": entry.payload, "attempts": entry.attempts + 1, "error": error}))
            pipe.hdel(key, *fields)
        pipe.execute()
        if retry_at is not None and not delivered:
            self.redis.zadd(self.keys.outbox_shard(outbox_shard_of(entry.run_id)),
                            {entry.run_id: retry_at}, lt=True)

    @_guarded
    def failed_outbox(self, run_id: str) -> list[dict[str, Any]]:
        """The notifications of a run that were given up on, as recorded."""
        return [json.loads(v) for v in self.redis.hvals(self.keys.outbox_failed(run_id))]

    @_guarded
    def count_paused_runs(self, limit: int = 10_000) -> int:
        """Runs PAUSED now, checked against the runs behind the pause index (at most `limit`,
        read evenly from its shards)."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(SHARDS):
            pipe.zrange(self.keys.paused(shard), 0, max(1, limit // SHARDS) - 1)
        ids = [run_id for rows in pipe.execute() for run_id in rows]
        pipe = self.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.hget(self.keys.run(run_id), "state")
        return sum(1 for state in (pipe.execute() if ids else []) if state == "PAUSED")

    def close(self) -> None:
        if self.cluster:
            self.redis.close()
        else:
            self.redis.connection_pool.disconnect()


def _session_from_hash(fields: dict[str, str]) -> StoredSession:
    metadata = fields.get("metadata")
    return StoredSession(
        session_id=fields["session_id"],
        agent_id=fields.get("agent_id") or None,
        user_id=fields.get("user_id") or None,
        name=fields.get("name"),
        first_message=fields.get("first_message"),
        session_state=json.loads(fields.get("session_state") or "{}"),
        metadata=json.loads(metadata) if metadata else None,
        created_at=float(fields["created_at"]),
        updated_at=float(fields["updated_at"]),
    )
