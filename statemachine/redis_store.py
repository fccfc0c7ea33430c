"""The Redis store: one hash per run, a stream of events per run, Lua compare-and-set.

Scripts are sent with EVALSHA and reloaded on NOSCRIPT (redis-py's `Script` does both). Index
keys (listing, sweeps) are written before the run's own atomic commit and checked against the
run when read, so a crash between the two leaves a harmless hint, never a wrong answer (see
`redis_index`). With `cluster=True` the client is redis-py's `RedisCluster`: every script
touches the keys of one slot, and pipelines hold only commands it can route one by one.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.connection import Encoder
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from statemachine import lua
from statemachine.errors import (
    ApprovalNotFound,
    ApprovalStillPending,
    RunNotFound,
    StaleRun,
    StoreUnavailable,
)
from statemachine.keys import Keys, approval_member
from statemachine.redis_index import RedisIndex, pipe_eval
from statemachine.states import RunState
from statemachine.store import (
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


def _guarded(method: Callable[..., T]) -> Callable[..., T]:
    """Turn Redis connectivity failures into StoreUnavailable (HTTP 503)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
        except redis.exceptions.ResponseError as exc:
            if "READONLY" in str(exc) or "LOADING" in str(exc) or "MASTERDOWN" in str(exc):
                raise StoreUnavailable(f"redis: {exc}") from exc
            raise

    return wrapper


def _opt_float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _run_from_hash(fields: dict[str, str]) -> StoredRun:
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
        doc=json.loads(fields["doc"]),
        admin_pending=pending > 0,
        pending_approvals=pending,
        last_seq=int(fields.get("last_seq") or 0),
        lease_owner=fields.get("lease_owner") or None,
        lease_until=_opt_float(fields.get("lease_until")),
        paused_at=_opt_float(fields.get("paused_at")),
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
        return _LazyCluster(lambda: RedisCluster.from_url(url, **options))
    pool = redis.BlockingConnectionPool.from_url(url, timeout=socket_timeout, **options)
    return redis.Redis(connection_pool=pool)


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
    ) -> None:
        self.keys = Keys(prefix)
        self.cluster = cluster
        self.wait_replicas = wait_replicas
        self.wait_timeout = min(1.0, socket_timeout / 2)
        self.redis = connect(url, cluster=cluster, socket_timeout=socket_timeout,
                             max_connections=max_connections)
        self.index = RedisIndex(self.redis, self.keys, _run_from_hash, approval_from_hash)
        self._block_cap = max(0.1, socket_timeout - 1.0)
        self._commit = self.redis.register_script(lua.COMMIT)
        self._create = self.redis.register_script(lua.CREATE)
        self._resolve = self.redis.register_script(lua.RESOLVE)
        self._delete_approval = self.redis.register_script(lua.DELETE_APPROVAL)
        self._renew = self.redis.register_script(lua.RENEW_LEASE)

    # -- runs ---------------------------------------------------------------------------

    @_guarded
    def ping(self) -> None:
        self.redis.ping()

    @_guarded
    def create_run(self, run: StoredRun, events: list[dict[str, Any]]) -> CommitResult:
        """Store a new run at version 1 with its first events; the id must be new."""
        self.index.hint_create(run)
        fields = {
            "run_id": run.run_id,
            "agent_id": run.agent_id,
            "session_id": run.session_id,
            "user_id": run.user_id or "",
            "state": run.state.value,
            "version": 1,
            "created_at": repr(run.created_at),
            "updated_at": repr(run.updated_at),
            "doc": dumps(run.doc),
            "pending_approvals": 0,
            "lease_owner": run.lease_owner or "",
            "lease_until": _num(run.lease_until),
            "paused_at": _num(run.paused_at),
        }
        keys = [self.keys.run(run.run_id), self.keys.events(run.run_id)]
        out = self._create(keys=keys, args=[len(events), dumps(fields), *map(dumps, events)])
        if out[0] == -5:
            raise StaleRun(f"run {run.run_id} already exists")
        return CommitResult(version=1, seqs=[int(s) for s in out[1:]])

    @_guarded
    def get_run(self, run_id: str) -> StoredRun:
        fields = self.redis.hgetall(self.keys.run(run_id))
        if not fields:
            raise RunNotFound(run_id)
        return _run_from_hash(fields)

    @_guarded
    def commit(self, commit: Commit) -> CommitResult:
        """Apply `commit` atomically if the run is still at its expected version."""
        if commit.reindex:
            self.index.hint_commit(commit)
        rid = commit.run_id
        remember = commit.remember
        keys = [self.keys.run(rid), self.keys.events(rid),
                self.keys.idempotency(rid, remember.key if remember else "-")]
        keys += [self.keys.approval(rid, a.approval_id) for a in commit.approvals]
        keys += [self.keys.approval(rid, a) for a in commit.expire_approvals]
        retained = commit.approval_ids if commit.retain_seconds else []
        keys += [self.keys.approval(rid, a) for a in retained]
        args: list[Any] = [
            commit.expected_version,
            commit.state.value,
            dumps(commit.doc),
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
            *map(dumps, commit.events),
            *(dumps(a.doc) for a in commit.approvals),
        ]
        out = self._replicated(keys, args) if commit.reindex else \
            self._commit(keys=keys, args=args)
        if out[0] < 0 and commit.reindex:
            self.index.after_lost_commit(commit)
        if out[0] == -1:
            raise RunNotFound(rid)
        if out[0] == -2:
            raise StaleRun(rid)
        if commit.reindex:
            self.index.after_commit(commit, int(out[0]))
        return CommitResult(version=int(out[0]), seqs=[int(s) for s in out[1:]])

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
        entries = self.redis.xrange(self.keys.events(run_id), f"0-{after + 1}", "+", count=limit)
        return [_event(entry_id, fields) for entry_id, fields in entries]

    @_guarded
    def wait_events(self, run_id: str, after: int, timeout: float) -> list[StoredEvent]:
        """Block up to `timeout` seconds for events after `after` (XREAD BLOCK)."""
        block_ms = max(1, int(min(timeout, self._block_cap) * 1000))
        answer = self.redis.xread({self.keys.events(run_id): f"0-{after}"}, count=500,
                                  block=block_ms)
        if not answer:
            return []
        return [_event(entry_id, fields) for entry_id, fields in answer[0][1]]

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
    def resolve_approval(self, approval: Approval, expected_version: int, now: float):
        """Compare-and-set pending -> approval.status and release the run's guard, atomically."""
        resolution = {
            "resolution_data": approval.resolution_data,
            "resolved_by": approval.resolved_by,
            "resolved_at": approval.resolved_at,
        }
        keys = [self.keys.run(approval.run_id), self.keys.approval(approval.run_id,
                                                                  approval.approval_id)]
        self.index.hint_resolve(approval, expected_version)
        out = self._resolve(
            keys=keys, args=[expected_version, approval.status, dumps(resolution), repr(now)]
        )
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

    def close(self) -> None:
        if self.cluster:
            self.redis.close()
        else:
            self.redis.connection_pool.disconnect()


def _event(entry_id: str, fields: dict[str, str]) -> StoredEvent:
    return StoredEvent(seq=int(entry_id.split("-", 1)[1]), data=json.loads(fields["e"]))


