"""The operations on runs: each loads, asks the machine, and commits through the store.

Views call exactly one of these. Every refusal is a domain error raised before anything is
written; every write is a compare-and-set, retried from a fresh read when it loses, so the
machine decides again on what is really stored (the loser of a race sees `run is already
continued`, never a second execution).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from app.runtime.agent import Agent
from app.runtime.documents import envelope, epoch, event, message, new_id, waiting_calls
from app.runtime.executor import RunExecutor
from app.runtime.handoff import Channels, KeptPause, RunChannel
from app.runtime.loop import announce_first_call, execute
from app.runtime.resolution import ToolInputError, resolve_pause
from app.runtime.session import (
    APPLY_KEY,
    CANCELLED_BY_CLIENT,
    STARTED_KEY,
    Lifecycle,
    RunSession,
    commit_fields,
)
from statemachine.errors import (
    ApprovalAlreadyResolved,
    ApprovalPending,
    InvalidTransition,
    RunNotFound,
    StaleRun,
    StoreUnavailable,
)
from statemachine.machine import decide
from statemachine.states import RunState, Trigger
from statemachine.store import (
    APPROVAL_PENDING,
    Approval,
    Commit,
    Remember,
    RunQuery,
    RunRead,
    RunStore,
    SessionLink,
    StoredEvent,
    StoredRun,
)

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 20
LOST_WORKER = "The worker executing this run was lost before it finished (its lease expired)"
WORKER_SHUTDOWN = ("The worker executing this run shut down before the run finished; it was "
                   "stopped at its last committed step")
PAUSE_EXPIRED = "pause expired"
DECISIONS_KEY = "_decisions"  # approval id -> the admin's decision, inside the run's document


class AgentNotFound(Exception):
    """No agent with that id is served (HTTP 404 `Agent not found`)."""


class IdempotencyMismatch(Exception):
    """An Idempotency-Key reused with a different request (HTTP 422)."""


@dataclass(frozen=True)
class Idempotency:
    """A client's Idempotency-Key and the fingerprint of the request that carries it."""

    key: str
    fingerprint: str
    ttl: int


@dataclass(frozen=True)
class Settings:
    lease_seconds: float = 30.0
    pause_ttl_seconds: float | None = None
    retain_seconds: int = 7 * 24 * 3600


@dataclass(frozen=True)
class RunAccess:
    """Who asks about which run: every field given must match, else `Run not found`."""

    agent_id: str
    run_id: str
    session_id: str | None = None
    user_id: str | None = None
    owner: str | None = None


@dataclass(frozen=True)
class Started:
    """A run committed to execute; its stream starts after event `after`.

    `channel` hands over the events of the execution this process started (None for a
    replayed request, whose run may execute elsewhere); `history`, when asked for, holds the
    run's events up to `after`, so a `stream=false` answer is built without another read.
    """

    run_id: str
    after: int
    channel: RunChannel | None = None
    history: list[StoredEvent] | None = None


class RunService:
    """Create, continue, cancel, read and sweep runs of the served agents."""

    def __init__(self, store: RunStore, agents: dict[str, Agent], settings: Settings,
                 executor: RunExecutor) -> None:
        self.store = store
        self.agents = agents
        self.settings = settings
        self.executor = executor
        self.channels = Channels()

    @property
    def life(self) -> Lifecycle:
        return Lifecycle(self.executor.owner, self.settings.lease_seconds,
                         self.settings.retain_seconds)

    def agent(self, agent_id: str) -> Agent:
        try:
            return self.agents[agent_id]
        except KeyError:
            raise AgentNotFound(agent_id) from None

    # -- create ---------------------------------------------------------------------------

    def create_run(self, agent_id: str, text: str, session_id: str | None,
                   user_id: str | None, idempotency: Idempotency | None = None,
                   caller: str = "", *, exclusive: bool = False) -> Started:
        """Store a new RUNNING run with `RunStarted`, then execute it in the background.

        The run's session is made (or joined) by the store in the same write where it can
        (SQLite), else as a hint written just before (Redis, see `RedisRunStore.create_run`).
        `exclusive` (an authenticated user) refuses to join another user's session.

        With an Idempotency-Key the run's id is named by (agent, caller, key), and the key's
        outcome is remembered in the create's own write: a retry, even one racing the first
        attempt, finds that run and replays its stream instead of making a second one.
        """
        agent = self.agent(agent_id)
        run_id = new_id() if idempotency is None else idempotent_run_id(
            agent_id, caller, idempotency.key)
        for _ in range(2):
            replay = self._replay(run_id, idempotency)
            if replay is not None:
                return replay
            try:
                return self._create(agent, run_id, text, session_id, user_id, idempotency,
                                    exclusive)
            except StaleRun:
                if idempotency is None:
                    raise
        raise IdempotencyMismatch(idempotency.key if idempotency else "")

    def _create(self, agent: Agent, run_id: str, text: str, session_id: str | None,
                user_id: str | None, idempotency: Idempotency | None,
                exclusive: bool) -> Started:
        run = self._new_run(agent, run_id, text, session_id or new_id(), user_id)
        started = event(run.doc, "RunStarted", model=agent.model.id,
                        model_provider=agent.model.provider)
        remember = None if idempotency is None else Remember(
            idempotency.key, {"fingerprint": idempotency.fingerprint, "after": 0},
            idempotency.ttl)
        link = SessionLink(run.session_id, agent.id, user_id, text, run.created_at, exclusive)
        self.executor.reserve()
        try:
            result = self.store.create_run(run, [started], session=link, remember=remember)
        except BaseException:
            self.executor.release()
            raise
        run.version, run.last_seq = result.version, result.seqs[-1]
        channel = self._execute(agent, run, [StoredEvent(result.seqs[0], started)], history=[])
        return Started(run.run_id, after=0, channel=channel, history=[])

    def _new_run(self, agent: Agent, run_id: str, text: str, session_id: str,
                 user_id: str | None):
        now = time.time()
        doc = {
            "run_id": run_id, "agent_id": agent.id, "agent_name": agent.display_name,
            "session_id": session_id, "user_id": user_id, "content": None,
            "content_type": "str", "model": agent.model.id,
            "model_provider": agent.model.provider, "created_at": int(now),
            "updated_at": int(now), "input": {"input_content": text},
            "messages": [message("user", text)], "tools": [], "metrics": {},
            "session_state": {},
        }
        fields = commit_fields(RunState.RUNNING, self.life, now)
        return StoredRun(run_id=run_id, agent_id=agent.id, session_id=session_id,
                         user_id=user_id, state=RunState.RUNNING, version=1, created_at=now,
                         updated_at=now, doc=doc, lease_owner=fields["lease_owner"],
                         lease_until=fields["lease_until"])

    def _execute(self, agent: Agent, run: StoredRun, events: list[StoredEvent],
                 doc_json: str | None = None,
                 history: list[StoredEvent] | None = None) -> RunChannel:
        """Execute `run` here; its channel starts with `events`, the ones that started it
        (`doc_json`: the document as the commit that started it wrote it; `history`: the
        run's events before them, when known)."""
        channel = self.channels.open(run.run_id, events, history)
        session = RunSession(self.store, agent, run, self.life, channel, doc_json)

        def work() -> None:
            try:
                execute(session)
            finally:
                session.finish()
                self.channels.close(channel)

        self.executor.submit(run.run_id, work)
        return channel

    # -- continue -------------------------------------------------------------------------

    def continue_run(self, access: RunAccess, tools: list[dict[str, Any]],
                     idempotency: Idempotency | None = None, *,
                     history: bool = False) -> Started:
        """PAUSED -> CONTINUED with the client's decisions, exactly once across processes.

        With an Idempotency-Key, the outcome is remembered in the same commit, and a retry
        (even one that raced the first attempt and lost) gets the first attempt's stream.
        The run, the remembered outcome and (with `history`) the run's events are one read,
        or none: without a key, the copy this process kept of the run's pause is decided on
        first (see `_continue_kept`), and the store is read only when that copy cannot say.
        """
        agent = self.agent(access.agent_id)
        kept = self.channels.kept.take(access.run_id) if idempotency is None else None
        if kept is not None:
            started = self._continue_kept(agent, access, kept, tools)
            if started is not None:
                return started
        for _ in range(CAS_ATTEMPTS):
            read = self._visible_read(access, history, idempotency)
            replay = self._replayed(read.run.run_id, idempotency, read.remembered)
            if replay is not None:
                return replay
            try:
                return self._continue_from(agent, read, tools, idempotency)
            except StaleRun:
                continue
        raise StaleRun(access.run_id)

    def _continue_kept(self, agent: Agent, access: RunAccess, kept: KeptPause,
                       tools: list[dict[str, Any]]) -> Started | None:
        """The continue decided on the copy this process kept of the pausing commit, with no
        read; None where the copy must not decide: it would refuse (the run may have moved
        since: an admin's decision, say), it lost its compare-and-set, the run is gone, or
        its pause is due to be settled. The store's truth decides then, as without a copy."""
        if not _visible(kept.run, access) or self._due_to_settle(kept.run, time.time()):
            return None
        try:
            return self._continue_from(agent, RunRead(kept.run, kept.events), tools, None)
        except (InvalidTransition, ApprovalPending, ToolInputError, StaleRun, RunNotFound):
            return None

    def _continue_from(self, agent: Agent, read: RunRead, tools: list[dict[str, Any]],
                       idempotency: Idempotency | None) -> Started:
        """Decide and commit the continue on `read`; StaleRun when its version moved."""
        run = read.run
        decide(run.state, Trigger.CONTINUE, admin_pending=run.admin_pending)
        resolved, actions = resolve_pause(run.doc["tools"], tools, self._decided(run))
        doc = {**run.doc, "tools": resolved, APPLY_KEY: actions}
        after = run.last_seq
        run, events, doc_json = self._commit_continue(run, doc, idempotency)
        channel = self._execute(agent, run, events, doc_json, history=read.events)
        return Started(run.run_id, after=after, channel=channel, history=read.events)

    def _visible_read(self, access: RunAccess, history: bool,
                      idempotency: Idempotency | None) -> RunRead:
        """`visible_run`, with the events and the remembered outcome in the same read."""

        def read() -> RunRead:
            return self.store.read_run(access.run_id, events_after=0 if history else None,
                                       recall=idempotency.key if idempotency else None)

        found = read()
        if not _visible(found.run, access):
            raise RunNotFound(access.run_id)
        return read() if self._settle(found.run) else found

    def _replay(self, run_id: str, idempotency: Idempotency | None) -> Started | None:
        if idempotency is None:
            return None
        return self._replayed(run_id, idempotency, self.store.recall(run_id, idempotency.key))

    @staticmethod
    def _replayed(run_id: str, idempotency: Idempotency | None,
                  remembered: dict[str, Any] | None) -> Started | None:
        if idempotency is None or remembered is None:
            return None
        if remembered["fingerprint"] != idempotency.fingerprint:
            raise IdempotencyMismatch(idempotency.key)
        return Started(run_id, after=int(remembered["after"]))

    def _commit_continue(self, run: StoredRun, doc: dict[str, Any],
                         idempotency: Idempotency | None
                         ) -> tuple[StoredRun, list[StoredEvent], str]:
        now = time.time()
        doc["updated_at"] = int(now)
        remember = None
        if idempotency is not None:
            remember = Remember(idempotency.key, {"fingerprint": idempotency.fingerprint,
                                                  "after": run.last_seq}, idempotency.ttl)
        commit = Commit(run_id=run.run_id, expected_version=run.version,
                        state=RunState.CONTINUED, doc=doc, now=now,
                        events=[event(doc, "RunContinued"), *announce_first_call(doc)],
                        approval_ids=doc.get("_approval_ids", []), remember=remember,
                        envelope=envelope(doc),
                        **commit_fields(RunState.CONTINUED, self.life, now))
        self.executor.reserve()
        try:
            result = self.store.commit(commit)
        except BaseException:
            self.executor.release()
            raise
        run.version, run.state, run.doc, run.last_seq = (
            result.version, RunState.CONTINUED, doc, result.seqs[-1])
        run.updated_at = now
        return run, [StoredEvent(seq, data) for seq, data
                     in zip(result.seqs, commit.events, strict=True)], commit.encoded_doc()

    def _decided(self, run: StoredRun) -> dict[str, Approval]:
        """The admins' decisions on the calls waiting now, by approval id, as the resolve
        wrote them into the run (the approval record itself may have been deleted since)."""
        decisions = run.doc.get(DECISIONS_KEY, {})
        decided = {}
        for obj in waiting_calls(run.doc["tools"]):
            found = decisions.get(obj.get("approval_id"))
            if found is not None:
                decided[obj["approval_id"]] = Approval(
                    approval_id=obj["approval_id"], run_id=run.run_id, status=found["status"],
                    doc={}, resolution_data=found.get("resolution_data"))
        return decided

    # -- cancel ---------------------------------------------------------------------------

    def cancel_run(self, access: RunAccess) -> None:
        """Cancel a paused run at once, or an executing one at its worker's next step.

        An executing run gets a cancel request, recorded only while the run is still in the
        state read; its worker's next write is refused because of it (in the same atomic
        step) and the worker ends the run CANCELLED. So a cancel never loses to checkpoints,
        and it loses cleanly (409) to a final state written before it.
        """
        self.agent(access.agent_id)
        for _ in range(CAS_ATTEMPTS):
            run = self.visible_run(access)
            decide(run.state, Trigger.CANCEL, admin_pending=run.admin_pending)
            try:
                if run.state.is_executing:
                    self.store.request_cancel(run.run_id, run.state, time.time())
                else:
                    self._end(run, Trigger.CANCEL, "RunCancelled", reason=CANCELLED_BY_CLIENT)
                return
            except StaleRun:
                continue
        raise StaleRun(access.run_id)

    def _end(self, run: StoredRun, trigger: Trigger, name: str, *,
             lease_lapsed_by: float | None = None, **fields: Any) -> None:
        """Move `run` to a final state decided by the machine, expiring pending approvals.

        `lease_lapsed_by` makes the store apply it only while the lease is still lapsed.
        """
        state = decide(run.state, trigger, admin_pending=run.admin_pending)
        now = time.time()
        doc = dict(run.doc)
        doc.pop(APPLY_KEY, None)
        doc.pop(STARTED_KEY, None)
        doc["updated_at"] = int(now)
        if "content" in fields:
            doc["content"] = fields["content"]
        approval_ids = doc.get("_approval_ids", [])
        self.store.commit(Commit(
            run_id=run.run_id, expected_version=run.version, state=state, doc=doc, now=now,
            events=[event(doc, name, **fields)], approval_ids=approval_ids,
            expire_approvals=approval_ids if run.admin_pending else [],
            lease_lapsed_by=lease_lapsed_by, envelope=envelope(doc),
            **commit_fields(state, self.life, now)))
        self.channels.drop(run.run_id)

    # -- reads ----------------------------------------------------------------------------

    def visible_run(self, access: RunAccess) -> StoredRun:
        """The run, after settling a lapsed lease or an expired pause; else `Run not found`."""
        run = self.store.get_run(access.run_id)
        if not _visible(run, access):
            raise RunNotFound(access.run_id)
        if self._settle(run):
            run = self.store.get_run(access.run_id)
        return run

    def settled(self, run: StoredRun) -> StoredRun:
        """`run` as it stands after settling a lapsed lease or an expired pause."""
        return self.store.get_run(run.run_id) if self._settle(run) else run

    def current_state(self, run_id: str) -> RunState:
        """The run's state after settling a lapsed lease or an expired pause."""
        run = self.store.get_run(run_id)
        if self._settle(run):
            run = self.store.get_run(run_id)
        return run.state

    def list_runs(self, query: RunQuery) -> list[StoredRun]:
        self.agent(query.agent_id)
        return self.store.list_runs(query)

    # -- sweeps ---------------------------------------------------------------------------

    def _settle(self, run: StoredRun) -> bool:
        """End a run whose worker was lost or whose pause expired; True if it was ended."""
        now = time.time()
        try:
            if self._lease_lapsed(run, now):
                self._end_lost(run, now)
                return True
            if self._pause_expired(run, now):
                self._end(run, Trigger.CANCEL, "RunCancelled", reason=PAUSE_EXPIRED)
                return True
        except StaleRun:
            return True
        return False

    def _due_to_settle(self, run: StoredRun, now: float) -> bool:
        return self._lease_lapsed(run, now) or self._pause_expired(run, now)

    @staticmethod
    def _lease_lapsed(run: StoredRun, now: float) -> bool:
        return bool(run.state.is_executing and run.lease_until and run.lease_until <= now)

    def _pause_expired(self, run: StoredRun, now: float) -> bool:
        ttl = self.settings.pause_ttl_seconds
        return bool(run.state is RunState.PAUSED and ttl and run.paused_at and
                    run.paused_at + ttl <= now)

    def _end_lost(self, run: StoredRun, now: float) -> None:
        """End a run whose lease lapsed, compared again in the commit (a renewal may land).

        A run its client asked to cancel ends CANCELLED, as that client was told.
        """
        if run.cancel_requested:
            self._end(run, Trigger.CANCEL, "RunCancelled", lease_lapsed_by=now,
                      reason=CANCELLED_BY_CLIENT)
            return
        self._end(run, Trigger.FAIL, "RunError", lease_lapsed_by=now, content=LOST_WORKER,
                  error_type="WorkerLost")

    def sweep(self) -> None:
        """Settle every run whose lease lapsed or pause expired; purge old finished runs."""
        now = time.time()
        ids = self.store.runs_with_lapsed_lease(now)
        if self.settings.pause_ttl_seconds:
            ids += self.store.runs_paused_before(now - self.settings.pause_ttl_seconds)
        for run_id in ids:
            try:
                self._settle(self.store.get_run(run_id))
            except RunNotFound:
                continue
        self.store.purge_finished(now - self.settings.retain_seconds)

    # -- shutdown -------------------------------------------------------------------------

    def stop_executing(self, grace_seconds: float) -> list[str]:
        """A worker's clean stop: no new runs, `grace_seconds` for the executing ones to pause
        or end, then every run still executing here ends ERROR (`WorkerShutdown`).

        Returns the ids of the runs it ended; their streams end with that `RunError`.
        """
        abandoned = [run_id for run_id in self.executor.drain(grace_seconds)
                     if self._abandon(run_id)]
        if abandoned:
            log.warning("worker shutdown: %d run(s) still executing moved to ERROR: %s",
                        len(abandoned), " ".join(abandoned))
        return abandoned

    def _abandon(self, run_id: str) -> bool:
        """End one run this worker executes; False if it is no longer ours to end."""
        for _ in range(CAS_ATTEMPTS):
            try:
                run = self.store.get_run(run_id)
                if not run.state.is_executing or run.lease_owner != self.executor.owner:
                    return False
                if run.cancel_requested:  # its client was told it would be cancelled
                    self._end(run, Trigger.CANCEL, "RunCancelled", reason=CANCELLED_BY_CLIENT)
                    return True
                self._end(run, Trigger.FAIL, "RunError", content=WORKER_SHUTDOWN,
                          error_type="WorkerShutdown")
                return True
            except StaleRun:
                continue  # its loop committed a step meanwhile: decide again on the new one
            except (RunNotFound, StoreUnavailable) as exc:
                log.error("worker shutdown: run %s could not be ended (%s); its lease will "
                          "lapse", run_id, type(exc).__name__)
                return False
        return False

    # -- approvals ------------------------------------------------------------------------

    def resolve_approval(self, approval_id: str, status: str, data: dict[str, Any] | None,
                         resolved_by: str) -> Approval:
        """pending -> approved|rejected, releasing the run's guard in the same atomic step."""
        for _ in range(CAS_ATTEMPTS):
            approval = self.store.get_approval(approval_id)
            if approval.status != APPROVAL_PENDING:
                raise ApprovalAlreadyResolved(approval.status)
            run = self.store.get_run(approval.run_id)
            if self._settle(run):
                continue
            decide(run.state, Trigger.RESOLVE_APPROVAL)
            approval.status, approval.resolution_data = status, data
            approval.resolved_by, approval.resolved_at = resolved_by, epoch()
            now = time.time()
            try:
                self.store.resolve_approval(approval, run.version, now,
                                            run_doc=_with_decision(run.doc, approval, now))
            except StaleRun:
                continue
            return self.store.get_approval(approval_id)
        raise StaleRun(approval_id)

    def delete_approval(self, approval_id: str) -> None:
        """Delete a resolved approval: its decision lives on in the run (a pending one: 409)."""
        self.store.delete_approval(approval_id)


def _with_decision(doc: dict[str, Any], approval: Approval, now: float) -> dict[str, Any]:
    """The run's document with the admin's decision recorded, for the resolve's own write.

    A later continue applies the decision from here, so deleting the approval loses nothing.
    """
    decisions = {**doc.get(DECISIONS_KEY, {}), approval.approval_id: {
        "status": approval.status, "resolution_data": approval.resolution_data}}
    return {**doc, DECISIONS_KEY: decisions, "updated_at": int(now)}


def idempotent_run_id(agent_id: str, caller: str, key: str) -> str:
    """The id a create with this Idempotency-Key gets: the same for every retry of it, and
    never the same for two callers (a JWT user's `sub` is part of the name)."""
    name = "\x00".join(("agentos-create", agent_id, caller, key))
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def _visible(run: StoredRun, access: RunAccess) -> bool:
    checks = (
        (access.agent_id, run.agent_id),
        (access.session_id, run.session_id),
        (access.user_id, run.user_id),
        (access.owner, run.user_id),
    )
    return all(wanted is None or wanted == actual for wanted, actual in checks)

