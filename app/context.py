"""The per-app bundle (settings, store, agents, service) kept in `app.extensions`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app

from app.runtime.agent import Agent
from app.runtime.executor import RunExecutor
from app.runtime.service import RunService
from app.runtime.sessions import SessionService
from statemachine.store import RunStore

# The id of this server's one database, as `/config` names it and `db_id` queries must say.
DB_ID = "agentos-db"


@dataclass
class AgentOS:
    settings: dict[str, Any]
    store: RunStore
    agents: dict[str, Agent]
    service: RunService
    executor: RunExecutor
    instantiated_at: str
    sessions: SessionService


def agentos() -> AgentOS:
    return current_app.extensions["agentos"]
