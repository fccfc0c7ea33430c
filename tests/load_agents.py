"""Agents for the capacity and shutdown tests (`AGENTOS_AGENTS=tests.load_agents:agents`).

The demo agents answer at once; `slow-agent`'s model thinks for `SLOW_MODEL_MS` (a run waiting
on a model), and `long-tool-agent` calls a tool that takes `LONG_TOOL_SECONDS` of blocking
work that never yields to gevent (an unpatched sleep stands for a C driver or CPU work).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from app.runtime.agent import Agent
from app.runtime.demo import demo_agents
from app.runtime.models.scripted import PlannedCall, ScriptedModel, tool_results
from app.runtime.tools import tool


def _blocking_sleep(seconds: float) -> None:
    """A sleep that never yields to gevent: stands for a C driver or CPU-bound work."""
    monkey = sys.modules.get("gevent.monkey")
    sleep = monkey.get_original("time", "sleep") if monkey is not None else time.sleep
    sleep(seconds)


@tool
def long_task(name: str) -> str:
    """Work that takes LONG_TOOL_SECONDS and blocks its thread all along."""
    _blocking_sleep(float(os.environ.get("LONG_TOOL_SECONDS", "30")))
    return f"finished {name}"


def _long_script(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
    if "long_task" not in tool_results(messages):
        return [PlannedCall("long_task", {"name": "job"})]
    return "Long task done"


def agents() -> list[Agent]:
    slow = ScriptedModel(lambda messages: "Thought about it",
                         latency_ms=float(os.environ.get("SLOW_MODEL_MS", "20000")))
    return [
        *demo_agents(),
        Agent(id="slow-agent", name="slow-agent", model=slow),
        Agent(id="long-tool-agent", name="long-tool-agent", model=ScriptedModel(_long_script),
              tools=[long_task]),
    ]
