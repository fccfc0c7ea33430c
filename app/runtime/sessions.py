"""The operations on sessions: create, read, list, update, and delete with their runs.

A session groups the runs that share its `session_id`. Its record is written by the store
(made by `POST /sessions` or by the first run that names it); deleting it deletes its runs,
and each run's fate is decided by the machine (`Trigger.DELETE`): a paused run is cancelled
in the same step as it is deleted, a final one is deleted as it is, and an executing one
stops the whole deletion before anything is written (409).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from app.runtime.documents import event, new_id
from app.runtime.service import CAS_ATTEMPTS, RunService
from statemachine.errors import InvalidTransition, RunNotFound, SessionNotFound, StaleRun
from statemachine.machine import decide
from statemachine.states import Trigger
from statemachine.store import (
    RunRemoval,
    SessionQuery,
    StoredRun,
    StoredSession,
)

# The runs one answer reads: a session's run list (the newest, oldest first), its detail's
# chat history, and the most one deletion takes at once.
SESSION_RUNS_LIMIT = 1000
HISTORY_RUNS_LIMIT = 100
DELETE_RUNS_LIMIT = 10_000
SESSION_DELETED = "session deleted"


class SessionBusy(Exception):
    """A run of the session is executing, so the session cannot be deleted (HTTP 409)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id


class SessionTooLarge(Exception):
    """A session with more runs than one deletion takes (HTTP 409)."""


@dataclass(frozen=True)
class SessionAccess:
    """Who asks about which session: a JWT user (`owner`) sees only its own; `user_id` is a
    filter the caller chose (a mismatch is the same `Session not found`)."""

    session_id: str
    owner: str | None = None
    user_id: str | None = None


@dataclass(frozen=True)
class NewSession:
    """What `POST /sessions` asks for (Agno's CreateSessionRequest, minus teams/workflows)."""

    session_id: str | None = None
    session_name: str | None = None
    session_state: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    user_id: str | None = None
    agent_id: str | None = None


class SessionService:
    """Sessions of the served agents, on top of the run service's store and machine."""

    def __init__(self, runs: RunService) -> None:
        self.runs = runs
        self.store = runs.store

    def create(self, new: NewSession) -> StoredSession:
        """A new session record; an id that is already stored is a conflict, never replaced."""
        if new.agent_id is not None:
            self.runs.agent(new.agent_id)
        now = time.time()
        session = StoredSession(
            session_id=new.session_id or new_id(), agent_id=new.agent_id,
            user_id=new.user_id, created_at=now, updated_at=now, name=new.session_name,
            session_state=new.session_state or {}, metadata=new.metadata)
        self.store.create_session(session)
        return session

    def visible(self, access: SessionAccess) -> StoredSession:
        """The session, if the caller may see it; else `Session not found`."""
        session = self.store.get_session(access.session_id)
        for wanted in (access.owner, access.user_id):
            if wanted is not None and session.user_id != wanted:
                raise SessionNotFound(access.session_id)
        return session

    def list(self, query: SessionQuery) -> tuple[list[StoredSession], int]:
        return self.store.list_sessions(query)

    def update(self, access: SessionAccess, changes: dict[str, Any]) -> StoredSession:
        """Set name, session_state and/or metadata; nothing given changes only updated_at."""
        self.visible(access)
        return self.store.update_session(access.session_id, changes, time.time())

    def session_runs(self, access: SessionAccess,
                     limit: int = SESSION_RUNS_LIMIT) -> list[StoredRun]:
        """The session's runs the caller may see, oldest first, each settled (a run whose
        worker was lost or whose pause expired is ended before it is shown)."""
        self.visible(access)
        runs = self.store.session_runs(access.session_id, limit)
        return [self.runs.settled(run) for run in runs
                if access.owner is None or run.user_id == access.owner]

    def session_run(self, access: SessionAccess, run_id: str) -> StoredRun:
        """One run of the session; a run of another session is `Run not found`."""
        self.visible(access)
        run = self.store.get_run(run_id)
        if run.session_id != access.session_id or (
                access.owner is not None and run.user_id != access.owner):
            raise RunNotFound(run_id)
        return self.runs.settled(run)

    # -- delete ---------------------------------------------------------------------------

    def delete(self, access: SessionAccess) -> None:
        """Delete the session and its runs, re-deciding from a fresh read when a run moved."""
        for _ in range(CAS_ATTEMPTS):
            self.visible(access)
            removals = self._plan(access.session_id)
            try:
                self.store.delete_session(access.session_id, removals, time.time(),
                                          self.runs.settings.retain_seconds)
                return
            except StaleRun:
                continue
        raise StaleRun(access.session_id)

    def delete_many(self, session_ids: list[str], owner: str | None,
                    user_id: str | None) -> None:
        """Delete each visible session; ids the caller cannot see are skipped, as the
        reference skips unknown ids. Every session is checked for an executing run before
        the first one is deleted."""
        accesses = [SessionAccess(sid, owner, user_id) for sid in dict.fromkeys(session_ids)]
        visible = [a for a in accesses if self._exists_for(a)]
        for access in visible:
            self._plan(access.session_id)
        for access in visible:
            try:
                self.delete(access)
            except SessionNotFound:
                continue

    def _exists_for(self, access: SessionAccess) -> bool:
        try:
            self.visible(access)
        except SessionNotFound:
            return False
        return True

    def _plan(self, session_id: str) -> list[RunRemoval]:
        """Ask the machine about every run of the session; nothing is written here."""
        runs = self.store.session_runs(session_id, DELETE_RUNS_LIMIT + 1)
        if len(runs) > DELETE_RUNS_LIMIT:
            raise SessionTooLarge(session_id)
        return [self._removal(self.runs.settled(run)) for run in runs]

    @staticmethod
    def _removal(run: StoredRun) -> RunRemoval:
        """The machine's verdict on one run; a run it moves (a paused one, cancelled) ends
        with a `RunCancelled` that the deletion announces (webhooks), as a cancel would."""
        try:
            state = decide(run.state, Trigger.DELETE, admin_pending=run.admin_pending)
        except InvalidTransition:
            raise SessionBusy(run.run_id) from None
        approval_ids = list(run.doc.get("_approval_ids", []))
        ended = [] if state is run.state else [
            event(run.doc, "RunCancelled", reason=SESSION_DELETED)]
        return RunRemoval(run_id=run.run_id, agent_id=run.agent_id,
                          expected_version=run.version,
                          expire_approvals=approval_ids if run.admin_pending else [],
                          approval_ids=approval_ids, state=state, events=ended)
