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

Events are batched (see `batching`): `emit` keeps an event pending until the batch is due, a
`write` (a change of state) commits the pending events with its own, and a checkpoint writes
the document only when it changed since the last commit. Each commit's events are then handed
to the run's channel (see `handoff`) for the followers in this process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from app.runtime.agent import Agent
from app.runtime.batching import BATCH_EVENTS, BATCH_SECONDS, FLUSHER
from app.runtime.documents import envelope, event
from app.runtime.handoff import RunChannel
from statemachine.blocking import gevent_active
from statemachine.errors import (
    CancelRequested,
    InvalidTransition,
    RunNotFound,
    StaleRun,
    StoreUnavailable,
)
from statemachine.machine import decide
from statemachine.states import RunState, Trigger
from statemachine.store import (
    Approval,
    Commit,
    CommitResult,
    RunStore,
    StoredEvent,
    StoredRun,
    dumps,
)

log = logging.getLogger(__name__)

CANCELLED_BY_CLIENT = "cancelled by client"
APPLY_KEY = "_apply"
STARTED_KEY = "_started"  # the call whose ToolCallStarted the continue's own commit wrote
_RETRY_FIRST, _RETRY_MAX = 0.05, 0.5
SLICE_SECONDS = 0.002
"""The longest a run's own work (a model that streams from memory, say) keeps its worker
without letting the worker's other requests and streams run; a commit lets them run too."""
YIELD_SECONDS = 0.0001
"""A timed sleep, not `sleep(0)`: gevent may resume a greenlet that slept 0 without polling
the sockets, and a request that waits to be read is only seen by the poll."""
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


def commit_retrying(store: RunStore, commit: Commit, within: float,
                    uncertain: bool = False) -> CommitResult:
    """`store.commit`, retried on StoreUnavailable for up to `within` seconds.

    A retry that loses its compare-and-set reads the run: if the run carries this commit's
    token, the earlier attempt landed (only its answer was lost) and that is a success.
    `uncertain` says an earlier call already tried this very commit without an answer.
    """
    if commit.token is None:
        commit.token = os.urandom(16).hex()  # an opaque nonce, not a record id
    deadline, delay = time.monotonic() + within, _RETRY_FIRST
    while True:
        try:
            return store.commit(commit)
        except StaleRun:
            landed = _landed(store, commit) if uncertain else None
            if landed is None:
                raise
            return landed
        except StoreUnavailable as exc:
            uncertain = True
            if time.monotonic() + delay >= deadline:
                raise
            log.warning("run %s: commit failed (%s); retrying", commit.run_id, exc)
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
    """The executing run as this worker sees it: state, version and document.

    Its thread and the background flusher both commit through it, one at a time (`_lock`).
    """

    def __init__(self, store: RunStore, agent: Agent, run: StoredRun, life: Lifecycle,
                 channel: RunChannel | None = None, doc_json: str | None = None) -> None:
        self.store = store
        self.agent = agent
        self.life = life
        self.run_id = run.run_id
        self.state = run.state
        self.version = run.version
        self.doc = run.doc
        self.approval_ids: list[str] = list(run.doc.get("_approval_ids", []))
        self.channel = channel
        self._run = run
        self._written = doc_json or dumps(run.doc)  # the document as stored
        self._last_seq = run.last_seq
        self._updated_at = run.updated_at
        self._envelope = envelope(run.doc)
        self._pending: list[dict[str, Any]] = []
        self._pending_since = 0.0
        self._inflight: Commit | None = None  # a checkpoint tried without a known outcome
        self._failure: Exception | None = None  # what a background flush met, for this thread
        self._lock = threading.RLock()
        self._slice_since = 0.0  # when the run last waited (0: not yet working)

    def event(self, name: str, **fields: Any) -> dict[str, Any]:
        return event(self.doc, name, **fields)

    def emit(self, name: str, *, flush: bool = False, **fields: Any) -> None:
        """Append one event; committed with its batch, at once with `flush` (before a side
        effect that its commit must precede)."""
        with self._lock:
            self._raise_failure()
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append(self.event(name, **fields))
            if flush or len(self._pending) >= BATCH_EVENTS or self._batch_due():
                self._cancellable(lambda: self._flush(self.life.lease_seconds))
            else:
                FLUSHER.watch(self, self._pending_since + BATCH_SECONDS)
        self._share_the_worker()

    def _share_the_worker(self) -> None:
        """Yield once the run has worked for a slice without waiting on anything (outside
        the lock, so the flusher is not held up): under gevent nothing else in the worker
        runs until a greenlet waits, and a model that yields deltas from memory never does
        between its commits. A fast turn ends within its first slice and never yields; OS
        threads need no help (the interpreter switches them)."""
        now = time.monotonic()
        if not self._slice_since:
            self._slice_since = now
        elif now - self._slice_since >= SLICE_SECONDS:
            if gevent_active():
                time.sleep(YIELD_SECONDS)
            self._slice_since = time.monotonic()

    def write(
        self,
        trigger: Trigger,
        events: list[dict[str, Any]],
        approvals: list[Approval] | None = None,
        expire_approvals: list[str] | None = None,
    ) -> None:
        """Decide `trigger` with the machine, then commit it with the pending events and
        `events` in one atomic step, or be interrupted.

        A cancel request recorded on the run refuses the commit; the run is then cancelled
        here and `RunCancelledHere` stops the loop.
        """
        with self._lock:
            self._raise_failure()
            state = decide(self.state, trigger)

            def commit() -> None:
                self._settle_inflight(self.life.lease_seconds)
                new_ids = [a.approval_id for a in approvals or []]
                pending, self._pending = self._pending, []
                change = self._commit(state, pending + events, approvals or [],
                                      expire_approvals or [], self.approval_ids + new_ids)
                change.reindex = trigger is not Trigger.CHECKPOINT
                self._apply(change, state, self.life.lease_seconds)

            self._cancellable(commit)

    def flush_due(self) -> None:
        """The flusher's call: commit the pending batch if its window has passed.

        One attempt: on an outage the batch stays (as an in-flight commit, retried by the
        next flush with its token) and the flusher comes back after another window. What
        must stop the run (another process moved it, a cancel request) is kept for the
        run's own thread, which raises it at its next step.
        """
        if not self._lock.acquire(blocking=False):
            FLUSHER.watch(self, time.monotonic() + BATCH_SECONDS)
            return
        try:
            if self._failure is not None or not (self._pending or self._inflight):
                return
            if not self._batch_due():
                FLUSHER.watch(self, self._pending_since + BATCH_SECONDS)
                return
            self._flush(0.0, from_flusher=True)
        except StoreUnavailable:
            FLUSHER.watch(self, time.monotonic() + BATCH_SECONDS)
        except Exception as exc:  # noqa: BLE001 - raised in the run's own thread instead
            self._failure = exc
        finally:
            self._lock.release()

    def finish(self) -> None:
        """The execution is over: no background flush comes any more, the channel closes."""
        FLUSHER.forget(self)
        with self._lock:
            self._pending = []
        if self.channel is not None:
            self.channel.close()

    def _stored(self, pending_approvals: int) -> StoredRun:
        """The run as the last commit stored it (for a channel's `final`)."""
        return replace(self._run, state=self.state, version=self.version, doc=self.doc,
                       pending_approvals=pending_approvals,
                       admin_pending=pending_approvals > 0,
                       updated_at=self._updated_at, last_seq=self._last_seq,
                       lease_owner=None, lease_until=None,
                       paused_at=self._updated_at if self.state is RunState.PAUSED else None)

    def _batch_due(self) -> bool:
        return time.monotonic() - self._pending_since >= BATCH_SECONDS

    def _raise_failure(self) -> None:
        """Raise here what a background flush met (a cancel request is honoured first)."""
        failure, self._failure = self._failure, None
        if isinstance(failure, CancelRequested):
            self._cancel()
            raise RunCancelledHere(self.run_id)
        if failure is not None:
            raise failure

    def _cancellable(self, step: Callable[[], None]) -> None:
        """Run a committing step; a cancel request that refuses it ends the run here."""
        try:
            step()
        except CancelRequested:
            self._cancel()
            raise RunCancelledHere(self.run_id) from None

    def _flush(self, within: float, from_flusher: bool = False) -> None:
        """Commit the pending events as a checkpoint (after any in-flight one).

        The flusher's checkpoint carries events only: the run's own thread may be changing
        the document right now (its next commit writes it), and only that thread touches it.
        """
        self._settle_inflight(within)
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._inflight = self._commit(self.state, pending, [], [], self.approval_ids,
                                      with_doc=not from_flusher)
        self._inflight.reindex = False
        self._settle_inflight(within, tried=False)

    def _settle_inflight(self, within: float, tried: bool = True) -> None:
        if self._inflight is not None:
            self._apply(self._inflight, self.state, within, uncertain=tried)

    def _commit(self, state: RunState, events: list[dict[str, Any]],
                approvals: list[Approval], expire: list[str], approval_ids: list[str],
                with_doc: bool = True) -> Commit:
        """The commit of `events` in `state`; the document goes with it when the state
        changes or when the document changed since the last commit (never `with_doc`
        False: the document is then neither read nor touched)."""
        now = time.time()
        encoded = None
        if with_doc:
            self.doc["_approval_ids"] = approval_ids
            if state is not self.state or approvals or expire:
                self.doc["updated_at"] = int(now)
            encoded = dumps(self.doc)
        changed = with_doc and (state is not self.state or encoded != self._written)
        commit = Commit(run_id=self.run_id, expected_version=self.version, state=state,
                        doc=self.doc if changed else None, now=now, events=events,
                        approvals=approvals, expire_approvals=expire,
                        approval_ids=approval_ids, agent_id=self._run.agent_id,
                        envelope=self._envelope,
                        doc_json=encoded if changed else None,
                        **commit_fields(state, self.life, now))
        commit.honour_cancel = True
        return commit

    def _apply(self, commit: Commit, state: RunState, within: float,
               uncertain: bool = False) -> None:
        """Commit (retrying within `within`), then hand the events to this run's followers."""
        self._inflight = commit
        if self.channel is not None:
            self.channel.begin_commit()
        try:
            result = commit_retrying(self.store, commit, within, uncertain)
        except StaleRun:
            self._inflight = None
            raise RunInterrupted(self.run_id) from None
        except CancelRequested:
            self._inflight = None
            raise
        finally:
            if self.channel is not None:
                self.channel.end_commit()
        self._inflight = None
        self._slice_since = time.monotonic()  # the commit waited: others had their turn
        self.version, self.state = result.version, state
        self.approval_ids = commit.approval_ids
        self._updated_at = commit.now
        if commit.doc is not None:
            self._written = commit.encoded_doc()
        if result.seqs:
            self._last_seq = result.seqs[-1]
        if self.channel is not None:
            ended = not state.is_executing
            self.channel.publish([StoredEvent(seq, data) for seq, data
                                  in zip(result.seqs, commit.events, strict=True)],
                                 final=self._stored(len(commit.approvals)) if ended else None,
                                 final_doc=self._written if ended else None)

    def _cancel(self) -> None:
        """End the run CANCELLED on a cancel request, from the version the request wrote.

        Retried from a fresh read while other requests (a repeated cancel) move the version;
        a run that ended meanwhile (a sweep) is left as it is. Pending events are dropped:
        the run's log goes from its last commit to its cancellation.
        """
        self.doc.pop(APPLY_KEY, None)
        self.doc.pop(STARTED_KEY, None)
        self._pending, self._inflight = [], None
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
            commit.honour_cancel = False
            try:
                self._apply(commit, state, self.life.lease_seconds)
                return
            except RunInterrupted:
                continue
        raise RunInterrupted(self.run_id)
