"""The webhook outbox: which committed facts become notifications, and how an entry looks.

A store with its outbox enabled writes these entries in the same atomic step as the commit
(or approval resolution) they describe, so a notification exists exactly when its fact does.
This module only names the facts; it decides nothing about runs. Entries are delivered at
least once by `app.runtime.notifications`, each carrying its `id` for deduplication.
"""

from __future__ import annotations

import json
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from statemachine.store import Approval, Commit, dumps

OUTBOX_SHARDS = 8

RUN_EVENT_TYPES = {
    "RunPaused": "run.paused",
    "RunCompleted": "run.completed",
    "RunError": "run.error",
    "RunCancelled": "run.cancelled",
}
APPROVAL_CREATED = "approval.created"
APPROVAL_RESOLVED = "approval.resolved"

_RUN_FIELDS = ("run_id", "agent_id", "agent_name", "session_id", "user_id")
_APPROVAL_FIELDS = ("id", "run_id", "session_id", "agent_id", "user_id", "approval_type",
                    "pause_type", "tool_name", "tool_args")


@dataclass
class OutboxEntry:
    """One notification waiting to be delivered; `payload` is the exact body that is POSTed."""

    entry_id: str
    run_id: str
    payload: str
    created_at: float
    attempts: int = 0

    @property
    def type(self) -> str:
        return str(json.loads(self.payload)["type"])


def shard_of(run_id: str) -> int:
    """The outbox shard a run's entries are indexed under (stable across processes)."""
    return zlib.crc32(run_id.encode()) % OUTBOX_SHARDS


def _entry(run_id: str, kind: str, data: dict[str, Any], now: float) -> OutboxEntry:
    entry_id = f"msg_{uuid.uuid4().hex}"
    body = {"type": kind, "timestamp": datetime.fromtimestamp(now, UTC).isoformat(),
            "data": data}
    return OutboxEntry(entry_id=entry_id, run_id=run_id, payload=dumps(body), created_at=now)


def _run_data(event: dict[str, Any], status: str) -> dict[str, Any]:
    data = {key: event.get(key) for key in _RUN_FIELDS}
    data["status"] = status
    for key in ("content", "reason", "error_type", "tools"):
        if key in event:
            data[key] = event[key]
    return data


def commit_entries(commit: Commit) -> list[OutboxEntry]:
    """Notifications for the facts a commit writes: pauses, ends, approvals created."""
    entries = []
    for approval in commit.approvals:
        data = {key: approval.doc.get(key) for key in _APPROVAL_FIELDS}
        data["status"] = approval.status
        entries.append(_entry(commit.run_id, APPROVAL_CREATED, data, commit.now))
    for event in commit.events:
        kind = RUN_EVENT_TYPES.get(str(event.get("event")))
        if kind is not None:
            data = _run_data(event, commit.state.wire_status)
            entries.append(_entry(commit.run_id, kind, data, commit.now))
    return entries


def resolution_entry(approval: Approval, now: float) -> OutboxEntry:
    """The notification of an approval resolved (written with the resolution itself)."""
    data = {key: approval.doc.get(key) for key in _APPROVAL_FIELDS}
    data.update(status=approval.status, resolved_by=approval.resolved_by,
                resolved_at=approval.resolved_at, resolution_data=approval.resolution_data)
    return _entry(approval.run_id, APPROVAL_RESOLVED, data, now)
