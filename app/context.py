"""The per-app bundle (settings, store, agents, service) kept in `app.extensions`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app

from app.runtime.agent import Agent
from app.runtime.executor import RunExecutor
from app.runtime.notifications import Deliverer
from app.runtime.service import RunService
from app.runtime.sessions import SessionService
from statemachine.store import RunStore


@dataclass
class AgentOS:
    settings: dict[str, Any]
    store: RunStore
    agents: dict[str, Agent]
    service: RunService
    executor: RunExecutor
    instantiated_at: str
    sessions: SessionService
    deliverer: Deliverer | None = None
    gauges: Any = None

    @property
    def db_id(self) -> str:
        """The one database id the reference's clients see (agents' `db_id`, `/config`)."""
        return f"{self.settings['AGENTOS_ID']}-db"


def agentos() -> AgentOS:
    return current_app.extensions["agentos"]
