"""An Agent: an id, a model, tools and instructions; loaded from `AGENTOS_AGENTS`."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from app.runtime.models import Model
from app.runtime.tools import Tool


@dataclass
class Agent:
    """What the server runs. `id` appears in every URL; tools are looked up by name."""

    id: str
    model: Model
    name: str | None = None
    description: str | None = None
    tools: list[Tool] = field(default_factory=list)
    instructions: str | None = None
    max_turns: int = 10

    def __post_init__(self) -> None:
        names = [t.name for t in self.tools]
        if len(names) != len(set(names)):
            raise ValueError(f"agent {self.id}: two tools share a name")

    @property
    def display_name(self) -> str:
        return self.name or self.id

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


def load_agents(spec: str) -> dict[str, Agent]:
    """Import `package.module:attribute` (a list of agents, or a callable returning one)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"AGENTOS_AGENTS must look like package.module:attribute, not {spec!r}")
    value = getattr(importlib.import_module(module_name), attribute)
    agents: Iterable[Agent] = value() if callable(value) else value
    by_id: dict[str, Agent] = {}
    for agent in agents:
        if not isinstance(agent, Agent):
            raise TypeError(f"{spec} holds {type(agent).__name__}, not Agent")
        if agent.id in by_id:
            raise ValueError(f"{spec}: two agents share the id {agent.id!r}")
        by_id[agent.id] = agent
    return by_id
