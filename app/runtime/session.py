"""A RunSession is one worker's hold on an executing run: every write goes through it.

Each write asks the machine first (`decide`), then commits through the store's compare-and-set
with the version this session last wrote. A lost compare-and-set while executing means another
process moved the run (a sweep that found our lease lapsed, say): the session raises
`RunInterrupted` and the worker stops without writing anything more. A cancel request is
different: the store refuses our write because of it (compared in the same atomic step), and
the session ends the run CANCELLED itself, so a cancel wins however often the run writes.

A store that fails (outage, lock timeout) is retried for up to one lease: within that time no
other worker may take the run over, and every write carries a token, so a retry whose first
attempt landed without an answer recognises its own commit instead of reading it as a loss.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from app.runtime.agent import Agent
from app.runtime.documents import event
from statemachine.errors import (
    CancelRequested,
    InvalidTransition,
    RunNotFound,
    StaleRun,
    StoreUnavailable,
)
from statemachine.machine import decide
from statemachine.states import RunState, Trigger
from statemachine.store import Approval, Commit, CommitResult, RunStore, StoredRun

log = logging.getLogger(__name__)

CANCELLED_BY_CLIENT = "cancelled by client"
APPLY_KEY = "_apply"
_RETRY_FIRST, _RETRY_MAX = 0.05, 0.5
_CANCEL_ATTEMPTS = 5


class RunInterrupted(Exception):
    """The run was moved by someone else while this worker executed it; stop quietly."""


class RunCancelledHere(RunInterrupted):
    """This worker honoured a cancel request: the run is CANCELLED, the loop stops."""


@dataclass(frozen=True)
class Lifecycle:
    """The timing settings every commit needs."""

    owner: str
    lease_seconds: float
    retain_seconds: int


def commit_fields(state: RunState, life: Lifecycle, now: float) -> dict[str, Any]:
    """Lease, pause time and retention that follow from the state being written."""
    return {
        "lease_owner": life.owner if state.is_executing else None,
        "lease_until": now + life.lease_seconds if state.is_executing else None,
        "paused_at": now if state is RunState.PAUSED else None,
        "retain_seconds": life.retain_seconds if state.is_final else None,
    }


def commit_retrying(store: RunStore, commit: Commit, within: float) -> CommitResult:
    """`store.commit`, retried on StoreUnavailable for up to `within` seconds.

    A retry that loses its compare-and-set reads the run: if the run carries this commit's
    token, the earlier attempt landed (only its answer was lost) and that is a success.
    """
    if commit.token is None:
        commit.token = uuid.uuid4().hex
    deadline, delay, uncertain = time.monotonic() + within, _RETRY_FIRST, False
    while True:
        try:
            return store.commit(commit)
        except StaleRun:
            landed = _landed(store, commit) if uncertain else None
            if landed is None:
                raise
            return landed
        except StoreUnavailable as exc:
            if time.monotonic() + delay >= deadline:
                raise
            log.warning("run %s: commit failed (%s); retrying", commit.run_id, exc)
            uncertain = True
            time.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)


def _landed(store: RunStore, commit: Commit) -> CommitResult | None:
    """The result of `commit` if the stored run shows it was applied, else None."""
    try:
        run = store.get_run(commit.run_id)
    except (RunNotFound, StoreUnavailable):
        return None
    if run.commit_token != commit.token:
        return None
    first = run.last_seq - len(commit.events) + 1
    return CommitResult(version=commit.expected_version + 1,
                        seqs=list(range(first, run.last_seq + 1)))


class RunSession:
    """The executing run as this worker sees it: state, version and document."""

    def __init__(self, store: RunStore, agent: Agent, run: StoredRun, life: Lifecycle) -> None:
        self.store = store
        self.agent = agent
        self.life = life
        self.run_id = run.run_id
        self.state = run.state
        self.version = run.version
        self.doc = run.doc
        self.approval_ids: list[str] = list(run.doc.get("_approval_ids", []))

    def event(self, name: str, **fields: Any) -> dict[str, Any]:
        return event(self.doc, name, **fields)

    def emit(self, name: str, **fields: Any) -> None:
        """Append one event (and the current document) while the run executes."""
        self.write(Trigger.CHECKPOINT, [self.event(name, **fields)])

    def write(
        self,
        trigger: Trigger,
        events: list[dict[str, Any]],
        approvals: list[Approval] | None = None,
        expire_approvals: list[str] | None = None,
    ) -> None:
        """Decide `trigger` with the machine, then commit it with `events`, or be interrupted.

        A cancel request recorded on the run refuses the commit; the run is then cancelled
        here and `RunCancelledHere` stops the loop.
        """
        state = decide(self.state, trigger)
        new_ids = [a.approval_id for a in approvals or []]
        commit = self._commit(state, events, approvals or [], expire_approvals or [],
                              self.approval_ids + new_ids)
        commit.honour_cancel = True
        commit.reindex = trigger is not Trigger.CHECKPOINT
        try:
            self._apply(commit, state)
        except CancelRequested:
            self._cancel()
            raise RunCancelledHere(self.run_id) from None

    def _commit(self, state: RunState, events: list[dict[str, Any]],
                approvals: list[Approval], expire: list[str], approval_ids: list[str]) -> Commit:
        now = time.time()
        self.doc["updated_at"] = int(now)
        self.doc["_approval_ids"] = approval_ids
        return Commit(run_id=self.run_id, expected_version=self.version, state=state,
                      doc=self.doc, now=now, events=events, approvals=approvals,
                      expire_approvals=expire, approval_ids=approval_ids,
                      **commit_fields(state, self.life, now))

    def _apply(self, commit: Commit, state: RunState) -> None:
        try:
            result = commit_retrying(self.store, commit, self.life.lease_seconds)
        except StaleRun:
            raise RunInterrupted(self.run_id) from None
        self.version, self.state = result.version, state
        self.approval_ids = commit.approval_ids

    def _cancel(self) -> None:
        """End the run CANCELLED on a cancel request, from the version the request wrote.

        Retried from a fresh read while other requests (a repeated cancel) move the version;
        a run that ended meanwhile (a sweep) is left as it is.
        """
        self.doc.pop(APPLY_KEY, None)
        for _ in range(_CANCEL_ATTEMPTS):
            run = self.store.get_run(self.run_id)
            try:
                state = decide(run.state, Trigger.CANCEL)
            except InvalidTransition:
                raise RunInterrupted(self.run_id) from None
            self.version = run.version
            commit = self._commit(state, [self.event("RunCancelled",
                                                     reason=CANCELLED_BY_CLIENT)],
                                  [], [], self.approval_ids)
            try:
                self._apply(commit, state)
                return
            except RunInterrupted:
                continue
        raise RunInterrupted(self.run_id)
