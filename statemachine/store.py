"""The RunStore protocol and the records it stores.

A store performs atomic compare-and-set commits on a run's version; it never decides whether
a move is allowed (that is `machine.decide`). Every write to a run, state change or not, is
one `Commit`: checked against the version the writer read, applied whole (state, document,
events, approvals, lease) or not at all, and bumping the version by one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from statemachine.errors import (
    ApprovalAlreadyResolved,
    ApprovalNotFound,
    RunNotFound,
    StaleRun,
)
from statemachine.states import RunState

if TYPE_CHECKING:
    from statemachine.outbox import OutboxEntry

APPROVAL_PENDING = "pending"
APPROVAL_EXPIRED = "expired"


@dataclass
class StoredRun:
    """A run as the store holds it: indexed columns, lifecycle fields and the JSON document."""

    run_id: str
    agent_id: str
    session_id: str
    user_id: str | None
    state: RunState
    version: int
    created_at: float
    updated_at: float
    doc: dict[str, Any]
    admin_pending: bool = False
    pending_approvals: int = 0
    last_seq: int = 0
    lease_owner: str | None = None
    lease_until: float | None = None
    paused_at: float | None = None
    cancel_requested: bool = False
    commit_token: str | None = None


@dataclass
class StoredEvent:
    """One event of a run's log; `seq` is the run-scoped id (1, 2, 3 ...)."""

    seq: int
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.data.get("event", ""))


@dataclass
class Approval:
    """An admin approval: `doc` has the static fields; the rest is its resolution."""

    approval_id: str
    run_id: str
    status: str
    doc: dict[str, Any]
    resolution_data: dict[str, Any] | None = None
    resolved_by: str | None = None
    resolved_at: int | None = None
    updated_at: int | None = None


@dataclass(frozen=True)
class Remember:
    """An outcome remembered under (run, key) in the same commit, for `ttl` seconds."""

    key: str
    value: dict[str, Any]
    ttl: int


@dataclass
class Commit:
    """One atomic write to a run, applied only if the run is still at `expected_version`.

    `doc` None leaves the stored document as it is: a checkpoint that only appends events
    (the deltas of a streamed answer) costs those events, not a rewrite of the run; then
    `agent_id` names the run's agent for the Redis indexes. `envelope`, the run's identity
    as its events carry it, lets a store keep it once instead of in every event. `doc_json`,
    when given, is the document already encoded (whoever compared it with the stored one
    need not encode twice).
    `lease_owner`/`lease_until` and `paused_at` are always written: None clears them.
    `approvals` are created pending (and count towards the admin guard); `expire_approvals`
    names pending approvals of this run that stop being resolvable; `approval_ids` lists all
    of the run's approvals (a final commit's `retain_seconds` applies to them too).
    `remember` stores an outcome under an idempotency key of the run, atomically with the
    rest. `reindex` False skips the Redis index hints: a checkpoint within one executing
    state, whose index entry the lease renewal keeps fresh.

    Conditions compared inside the same atomic step, so that no read-then-decide race can
    slip between them and the write: `honour_cancel` refuses the commit (CancelRequested)
    while a cancel request is recorded on the run (the executing worker's writes set it, so
    a cancel wins against any number of checkpoints); `lease_lapsed_by` applies the commit
    only if the stored lease is still lapsed at that time (a renewal that landed after the
    sweep read the run makes the sweep's commit stale). `token`, when given, is stored with
    the run so a writer whose answer was lost can tell whether its commit landed. Every
    commit that is applied clears the run's cancel request.
    """

    run_id: str
    expected_version: int
    state: RunState
    doc: dict[str, Any] | None
    now: float
    events: list[dict[str, Any]] = field(default_factory=list)
    approvals: list[Approval] = field(default_factory=list)
    expire_approvals: list[str] = field(default_factory=list)
    approval_ids: list[str] = field(default_factory=list)
    lease_owner: str | None = None
    lease_until: float | None = None
    paused_at: float | None = None
    retain_seconds: int | None = None
    remember: Remember | None = None
    reindex: bool = True
    honour_cancel: bool = False
    lease_lapsed_by: float | None = None
    token: str | None = None
    agent_id: str | None = None
    doc_json: str | None = None
    envelope: Envelope | None = None

    def encoded_doc(self) -> str:
        """The document as the store writes it; '' when the commit keeps the stored one."""
        if self.doc is None:
            return ""
        if self.doc_json is None:
            self.doc_json = dumps(self.doc)
        return self.doc_json


ENVELOPE_KEYS = ("agent_id", "agent_name", "run_id", "session_id")


@dataclass(frozen=True)
class Envelope:
    """The keys every event of a run carries after `created_at` and `event`, with the same
    values: the run's identity. A store may keep them once per run and put them back when
    it reads an event (`strip` / `dress`), in the same place, so the event reads as sent."""

    agent_id: str
    agent_name: str
    run_id: str
    session_id: str

    def strip(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """`event` without its envelope, or None when it does not carry exactly this one
        in that place (then it is stored whole)."""
        keys = list(event)
        if keys[2:6] != list(ENVELOPE_KEYS) or keys[:2] != ["created_at", "event"]:
            return None
        if (event["agent_id"], event["agent_name"], event["run_id"], event["session_id"]) \
                != (self.agent_id, self.agent_name, self.run_id, self.session_id):
            return None
        return {k: v for k, v in event.items() if k not in ENVELOPE_KEYS}

    def dress(self, stripped: dict[str, Any]) -> dict[str, Any]:
        """The event `strip` took the envelope from, key order and all."""
        rest = iter(stripped.items())
        head = [next(rest), next(rest)]
        return {**dict(head), "agent_id": self.agent_id, "agent_name": self.agent_name,
                "run_id": self.run_id, "session_id": self.session_id, **dict(rest)}


@dataclass
class CommitResult:
    version: int
    seqs: list[int]


@dataclass
class RunRead:
    """One read of a run: the run, its events after `after` when asked for, and the outcome
    remembered under an idempotency key when one was named (None if none is)."""

    run: StoredRun
    events: list[StoredEvent] | None = None
    remembered: dict[str, Any] | None = None


@dataclass
class RunQuery:
    """Filters and paging for listing runs, newest first."""

    agent_id: str
    session_id: str | None = None
    user_id: str | None = None
    states: frozenset[RunState] | None = None
    limit: int = 100
    offset: int = 0


@dataclass
class ApprovalQuery:
    status: str | None = None
    agent_id: str | None = None
    user_id: str | None = None
    run_id: str | None = None
    session_id: str | None = None
    limit: int = 20
    offset: int = 0


SESSION_SORTS = ("created_at", "updated_at")


@dataclass
class StoredSession:
    """A session: the runs sharing its id, with the fields clients set on it.

    `name` is the name a client gave (create, rename, patch); until then the session is named
    by `first_message`, the message of the first run that joined it.
    """

    session_id: str
    agent_id: str | None
    user_id: str | None
    created_at: float
    updated_at: float
    name: str | None = None
    first_message: str | None = None
    session_state: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None

    @property
    def display_name(self) -> str:
        return self.name if self.name is not None else (self.first_message or "")


@dataclass(frozen=True)
class SessionLink:
    """What a new run tells the store about its session, written with (or before) the run.

    The session is made if it is new (owned by `user_id`, of `agent_id`, named by `message`
    until renamed); an existing one gets the run and a new `updated_at`. With `exclusive`
    (the user is authenticated, JWT mode) a session that belongs to another user is refused
    (`SessionOwnedElsewhere`, and the run is not stored); without it user ids are only
    labels the client chose, and runs of several of them may share a session.
    """

    session_id: str
    agent_id: str
    user_id: str | None
    message: str
    now: float
    exclusive: bool = False


@dataclass
class SessionQuery:
    """Filters, order and paging for listing sessions."""

    agent_id: str | None = None
    user_id: str | None = None
    name_contains: str | None = None
    sort_by: str = "created_at"
    descending: bool = True
    limit: int = 20
    offset: int = 0


@dataclass(frozen=True)
class RunRemoval:
    """One run of a session being deleted, as the machine decided it at `expected_version`.

    `expire_approvals` are its pending approvals (a paused run is cancelled by the deletion);
    `approval_ids` all of its approvals, which outlive the run for `retain_seconds` so the
    approvals queue still shows how they ended. `state` is the state the machine ended it
    in and `events` what its end announces (a cancelled run's `RunCancelled`): they are not
    stored, but become webhook notifications in the same step, as a commit's would.
    """

    run_id: str
    agent_id: str
    expected_version: int
    expire_approvals: list[str] = field(default_factory=list)
    approval_ids: list[str] = field(default_factory=list)
    state: RunState | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    def as_commit(self, now: float) -> Commit:
        """The deletion as the commit it stands for, for the outbox's `commit_entries`."""
        return Commit(run_id=self.run_id, expected_version=self.expected_version,
                      state=self.state or RunState.CANCELLED, doc={}, now=now,
                      events=self.events)


class RunStore(Protocol):
    """What the runtime needs from a store; both implementations pass the same contract tests."""

    def ping(self) -> None: ...

    def create_run(self, run: StoredRun, events: list[dict[str, Any]],
                   session: SessionLink | None = None,
                   remember: Remember | None = None) -> CommitResult: ...

    def get_run(self, run_id: str) -> StoredRun: ...

    def read_run(self, run_id: str, *, events_after: int | None = None,
                 recall: str | None = None) -> RunRead: ...

    def commit(self, commit: Commit) -> CommitResult: ...

    def read_events(self, run_id: str, after: int = 0, limit: int = 1000) -> list[StoredEvent]: ...

    def wait_events(self, run_id: str, after: int, timeout: float) -> list[StoredEvent]: ...

    def list_runs(self, query: RunQuery) -> list[StoredRun]: ...

    def request_cancel(self, run_id: str, expected_state: RunState, now: float) -> int: ...

    def renew_leases(self, owner: str, run_ids: Iterable[str], until: float) -> None: ...

    def runs_with_lapsed_lease(self, now: float, limit: int = 100) -> list[str]: ...

    def runs_paused_before(self, before: float, limit: int = 100) -> list[str]: ...

    def get_approval(self, approval_id: str) -> Approval: ...

    def list_approvals(self, query: ApprovalQuery) -> tuple[list[Approval], int]: ...

    def count_pending_approvals(self, user_id: str | None = None) -> int: ...

    def resolve_approval(
        self, approval: Approval, expected_version: int, now: float,
        run_doc: dict[str, Any] | None = None,
    ) -> CommitResult: ...

    def delete_approval(self, approval_id: str) -> None: ...

    def recall(self, run_id: str, key: str) -> dict[str, Any] | None: ...

    def purge_finished(self, before: float) -> int: ...

    def create_session(self, session: StoredSession) -> None: ...

    def get_session(self, session_id: str) -> StoredSession: ...

    def update_session(self, session_id: str, changes: dict[str, Any],
                       now: float) -> StoredSession: ...

    def list_sessions(self, query: SessionQuery) -> tuple[list[StoredSession], int]: ...

    def session_runs(self, session_id: str, limit: int = 1000) -> list[StoredRun]: ...

    def delete_session(self, session_id: str, runs: list[RunRemoval], now: float,
                       retain_seconds: int) -> None: ...

    # The webhook outbox (statemachine/outbox.py): written by commits when enabled.

    def claim_outbox(
        self, now: float, lease_until: float, limit: int = 50
    ) -> list[OutboxEntry]: ...

    def settle_outbox(self, entry: OutboxEntry, *, delivered: bool,
                      retry_at: float | None = None, error: str | None = None) -> None: ...

    def failed_outbox(self, run_id: str) -> list[dict[str, Any]]: ...

    def count_paused_runs(self, limit: int = 10_000) -> int: ...

    def close(self) -> None: ...


def read_all_events(store: RunStore, run_id: str, page: int = 1000,
                    after: int = 0) -> list[StoredEvent]:
    """Every stored event of a run (after `after`), read page by page (a run object is never
    truncated)."""
    events: list[StoredEvent] = []
    while True:
        batch = store.read_events(run_id, events[-1].seq if events else after, page)
        events.extend(batch)
        if len(batch) < page:
            return events


def run_matches(run: StoredRun, query: RunQuery) -> bool:
    return (
        (query.session_id is None or run.session_id == query.session_id)
        and (query.user_id is None or run.user_id == query.user_id)
        and (query.states is None or run.state in query.states)
    )


def approval_matches(approval: Approval, query: ApprovalQuery) -> bool:
    doc = approval.doc
    checks = (
        (query.status, approval.status),
        (query.agent_id, doc.get("agent_id")),
        (query.user_id, doc.get("user_id")),
        (query.run_id, doc.get("run_id")),
        (query.session_id, doc.get("session_id")),
    )
    return all(wanted is None or wanted == actual for wanted, actual in checks)


def session_matches(session: StoredSession, query: SessionQuery) -> bool:
    """The filters of `query` that an index entry must still satisfy when it is read."""
    return (
        (query.agent_id is None or session.agent_id == query.agent_id)
        and (query.user_id is None or session.user_id == query.user_id)
        and (query.name_contains is None
             or query.name_contains.casefold() in session.display_name.casefold())
    )


SESSION_FIELDS = ("name", "session_state", "metadata")


def lease_lapsed(run: StoredRun, now: float) -> bool:
    return run.state.is_executing and run.lease_until is not None and run.lease_until <= now


def paused_before(run: StoredRun, before: float) -> bool:
    return run.state is RunState.PAUSED and run.paused_at is not None and run.paused_at <= before


def resolve_outcome(code: int, approval: Approval, status: str | None) -> CommitResult:
    """Turn a store's resolve outcome code (see `lua.py`) into a result or a domain error."""
    code = int(code)
    if code == -1:
        raise RunNotFound(approval.run_id)
    if code == -3:
        raise ApprovalNotFound(approval.approval_id)
    if code == -4:
        raise ApprovalAlreadyResolved(str(status))
    if code == -2:
        raise StaleRun(approval.run_id)
    return CommitResult(version=code, seqs=[])


_LONG_DIGITS = re.compile(r"\d{19}")


def dumps(value: Any) -> str:
    """Compact JSON, the one encoding every store writes: orjson's, several times faster
    than the standard library's, which writes what orjson refuses (integers beyond 64 bits,
    keys that are not strings)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def loads(text: str) -> Any:
    """A stored JSON text read back: by orjson, unless it holds a run of 19 digits or more,
    which may be an integer beyond 64 bits that orjson would read as a float (the standard
    library reads it exactly; such texts were written by it too, see `dumps`)."""
    if _LONG_DIGITS.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)
