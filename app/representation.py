"""What clients see of stored records: the run object (5.7) and the approval object (6)."""

from __future__ import annotations

from typing import Any

from app.runtime.agent import Agent
from app.runtime.documents import compact, requirements
from statemachine.states import RunState
from statemachine.store import Approval, StoredEvent, StoredRun

APPROVAL_KEYS = (
    "id", "run_id", "session_id", "agent_id", "user_id", "status", "approval_type",
    "pause_type", "tool_name", "tool_args", "resolution_data", "resolved_by", "resolved_at",
    "created_at", "updated_at", "run_status",
)


def run_object(run: StoredRun, events: list[StoredEvent]) -> dict[str, Any]:
    """The run as JSON: its document, wire status, and every event stored so far."""
    body = dict(run.doc)
    body["status"] = run.state.wire_status
    body["updated_at"] = int(run.updated_at)
    body["events"] = [e.data for e in events]
    if run.state is RunState.PAUSED:
        body["requirements"] = requirements(run.run_id, run.doc["tools"])
    return compact(body)


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
