"""What clients see of stored records: the run object (5.7) and the approval object (6)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from app.runtime.agent import Agent
from app.runtime.documents import compact, requirements
from statemachine.states import RunState
from statemachine.store import Approval, StoredEvent, StoredRun, StoredSession

APPROVAL_KEYS = (
    "id", "run_id", "session_id", "agent_id", "user_id", "status", "approval_type",
    "pause_type", "tool_name", "tool_args", "resolution_data", "resolved_by", "resolved_at",
    "created_at", "updated_at", "run_status",
)


def run_object(run: StoredRun, events: list[StoredEvent]) -> dict[str, Any]:
    """The run as JSON: its document, wire status, and every event stored so far (each
    already compact: `documents.event` made it so)."""
    body = dict(run.doc)
    body["status"] = run.state.wire_status
    body["updated_at"] = int(run.updated_at)
    if run.state is RunState.PAUSED:
        body["requirements"] = requirements(run.run_id, run.doc["tools"])
    body = compact(body)
    body["events"] = [e.data for e in events]
    return body


def agent_object(agent: Agent, db_id: str) -> dict[str, Any]:
    """The reference's AgentResponse: its tools nested under `tools`, as Agno's client reads."""
    return compact({
        "id": agent.id,
        "name": agent.display_name,
        "db_id": db_id,
        "description": agent.description,
        "model": {"name": type(agent.model).__name__, "model": agent.model.id,
                  "provider": agent.model.provider},
        "tools": {"tools": [tool.describe() for tool in agent.tools]},
    })


def agent_summary(agent: Agent, db_id: str) -> dict[str, Any]:
    """The reference's AgentSummaryResponse, as `/config` lists the agents."""
    return compact({"id": agent.id, "name": agent.display_name,
                    "description": agent.description, "db_id": db_id})


def config_object(os_id: str, agents: list[Agent], db_id: str) -> dict[str, Any]:
    """The reference's ConfigResponse: one database, which holds the sessions too."""
    return {
        "os_id": os_id,
        "name": "AgentOS API",
        "databases": [db_id],
        "os_database": db_id,
        "session": {"dbs": [{"db_id": db_id, "domain_config": {"display_name": "Sessions"},
                             "tables": ["sessions"]}]},
        "agents": [agent_summary(agent, db_id) for agent in agents],
        "teams": [],
        "workflows": [],
        "interfaces": [],
    }


def approval_object(approval: Approval, run_status: str | None) -> dict[str, Any]:
    """Every key present, nulls included, as the contract's approval object says."""
    values = {
        **approval.doc,
        "status": approval.status,
        "resolution_data": approval.resolution_data,
        "resolved_by": approval.resolved_by,
        "resolved_at": approval.resolved_at,
        "updated_at": approval.updated_at or approval.doc.get("created_at"),
        "run_status": run_status,
    }
    return {key: values.get(key) for key in APPROVAL_KEYS}


def approval_status(approval: Approval) -> dict[str, Any]:
    return {
        "approval_id": approval.approval_id,
        "status": approval.status,
        "run_id": approval.run_id,
        "resolved_at": approval.resolved_at,
        "resolved_by": approval.resolved_by,
    }


# -- sessions: the shapes of Agno 2.5.6's session models ------------------------------------

# Runs in these states add nothing to a session's chat history (as in the reference).
_HISTORY_SKIPS = frozenset({"PAUSED", "CANCELLED", "ERROR"})
_HISTORY_ROLES = frozenset({"user", "assistant"})
_TOKEN_KEYS = ("input_tokens", "output_tokens", "total_tokens")


def iso_time(epoch_seconds: float) -> str:
    """A UTC time as the reference's models serialize a datetime: `2025-09-05T16:02:09Z`."""
    return datetime.fromtimestamp(int(epoch_seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def session_item(session: StoredSession) -> dict[str, Any]:
    """One entry of `GET /sessions` (SessionSchema)."""
    return {
        "session_id": session.session_id,
        "session_name": session.display_name,
        "session_state": session.session_state,
        "created_at": iso_time(session.created_at),
        "updated_at": iso_time(session.updated_at),
    }


def session_page(sessions: list[StoredSession], total: int, page: int, limit: int,
                 search_ms: float) -> dict[str, Any]:
    return {"data": [session_item(s) for s in sessions], "meta": {
        "page": page, "limit": limit, "total_pages": math.ceil(total / limit) if total else 0,
        "total_count": total, "search_time_ms": round(search_ms, 3)}}


def session_detail(session: StoredSession, runs: list[StoredRun],
                   agent: Agent | None) -> dict[str, Any]:
    """`GET /sessions/{id}` (AgentSessionDetailSchema): the record and its chat history."""
    metrics = _session_metrics(runs)
    return compact({
        "user_id": session.user_id,
        "agent_session_id": session.session_id,
        "session_id": session.session_id,
        "session_name": session.display_name,
        "session_state": session.session_state,
        "agent_id": session.agent_id,
        "total_tokens": metrics.get("total_tokens"),
        "agent_data": _agent_data(agent),
        "metrics": metrics,
        "metadata": session.metadata,
        "chat_history": _chat_history(runs),
        "created_at": iso_time(session.created_at),
        "updated_at": iso_time(session.updated_at),
    })


def _chat_history(runs: list[StoredRun]) -> list[dict[str, Any]]:
    return [dict(m) for run in runs if run.state.wire_status not in _HISTORY_SKIPS
            for m in run.doc.get("messages", []) if m.get("role") in _HISTORY_ROLES]


def _session_metrics(runs: list[StoredRun]) -> dict[str, int]:
    totals = dict.fromkeys(_TOKEN_KEYS, 0)
    for run in runs:
        for key in _TOKEN_KEYS:
            totals[key] += int((run.doc.get("metrics") or {}).get(key) or 0)
    return totals


def _agent_data(agent: Agent | None) -> dict[str, Any] | None:
    if agent is None:
        return None
    return {"name": agent.display_name, "agent_id": agent.id, "model": {
        "provider": agent.model.provider, "name": type(agent.model).__name__,
        "id": agent.model.id}}


def session_run(run: StoredRun, events: list[StoredEvent]) -> dict[str, Any]:
    """A run as the session endpoints show it (RunSchema)."""
    doc = run.doc
    return compact({
        "run_id": run.run_id,
        "agent_id": run.agent_id,
        "user_id": run.user_id,
        "status": run.state.wire_status,
        "run_input": (doc.get("input") or {}).get("input_content"),
        "content": doc.get("content"),
        "run_response_format": "text" if doc.get("content_type", "str") == "str" else "json",
        "metrics": doc.get("metrics") or {},
        "messages": doc.get("messages") or None,
        "tools": doc.get("tools") or None,
        "events": [e.data for e in events] or None,
        "created_at": iso_time(run.created_at),
        "session_state": doc.get("session_state"),
        **{key: [] for key in ("reasoning_steps", "references", "reasoning_messages",
                               "images", "videos", "audio", "files")},
        "input_media": {"images": [], "videos": [], "audios": [], "files": []},
    })
