"""A RunSession is one worker's hold on an executing run: every write goes through it.

Each write asks the machine first (`decide`), then commits through the store's compare-and-set
with the version this session last wrote. A lost compare-and-set while executing means another
process moved the run (a cancel, or a sweep that found our lease lapsed): the session raises
`RunInterrupted` and the worker stops without writing anything more.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from app.runtime.agent import Agent
from app.runtime.documents import event
from statemachine.errors import StaleRun
from statemachine.machine import decide
from statemachine.states import RunState, Trigger
from statemachine.store import Approval, Commit, RunStore, StoredRun


class RunInterrupted(Exception):
    """The run was moved by someone else while this worker executed it; stop quietly."""


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
        """Decide `trigger` with the machine, then commit it with `events`, or be interrupted."""
        state = decide(self.state, trigger)
        now = time.time()
        self.doc["updated_at"] = int(now)
        new_ids = [a.approval_id for a in approvals or []]
        self.doc["_approval_ids"] = self.approval_ids + new_ids
        commit = Commit(
            run_id=self.run_id,
            expected_version=self.version,
            state=state,
            doc=self.doc,
            now=now,
            events=events,
            approvals=approvals or [],
            expire_approvals=expire_approvals or [],
            approval_ids=self.doc["_approval_ids"],
            reindex=trigger is not Trigger.CHECKPOINT,
            **commit_fields(state, self.life, now),
        )
        try:
            result = self.store.commit(commit)
        except StaleRun:
            raise RunInterrupted(self.run_id) from None
        self.version, self.state = result.version, state
        self.approval_ids = self.doc["_approval_ids"]
