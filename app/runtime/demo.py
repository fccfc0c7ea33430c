"""The demo agents of the contract (section 10): the default `AGENTOS_AGENTS`.

Every tool honours `DEMO_TOOL_LATENCY_MS` and, when `DEMO_TOOL_LOG` is set, appends one line
`<run_id> <tool_call_id> <tool_name>` per execution, so a test can prove a tool ran once.
"""

from __future__ import annotations

import fcntl
import functools
import os
import time
from collections.abc import Callable
from typing import Any

from app.runtime.agent import Agent
from app.runtime.models.scripted import (
    PlannedCall,
    ScriptedModel,
    latest_user_message,
    tool_results,
)
from app.runtime.tools import current_call, tool

REJECTED = "Function call was rejected by the user"


def _record_execution() -> None:
    path = os.environ.get("DEMO_TOOL_LOG")
    call = current_call.get()
    if not path or call is None:
        return
    line = f"{call.run_id} {call.tool_call_id} {call.tool_name}\n"
    with open(path, "a", encoding="utf-8") as log:
        fcntl.flock(log, fcntl.LOCK_EX)
        log.write(line)


def demo_tool(function: Callable[..., Any]) -> Callable[..., Any]:
    """Give a demo tool its artificial latency and its execution log line."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        latency = float(os.environ.get("DEMO_TOOL_LATENCY_MS", "0") or 0) / 1000
        if latency:
            time.sleep(latency)
        _record_execution()
        return function(*args, **kwargs)

    return wrapper


@tool(requires_confirmation=True)
@demo_tool
def send_email(to: str, subject: str) -> str:
    """Send an email (asks for confirmation first)."""
    return f"sent to {to}"


@tool(external_execution=True)
@demo_tool
def get_weather(city: str) -> str:
    """Look up the weather of a city; the client runs it and sends the result."""
    return f"sunny in {city}"


@tool(requires_user_input=True, user_input_fields=["passenger"])
@demo_tool
def book_flight(destination: str, passenger: str) -> str:
    """Book a flight; a person supplies the passenger's name."""
    return f"{passenger} to {destination}"


@tool(requires_approval=True)
@demo_tool
def deploy_app(app: str) -> str:
    """Deploy an application; an admin must approve."""
    return f"deployed {app}"


def _single_tool_script(call: Callable[[str], PlannedCall], done: str, refused: str | None):
    """First turn calls one tool; the next answers `<done> <result>` or `<refused> <note>`."""

    def script(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
        planned = call(latest_user_message(messages))
        result = tool_results(messages).get(planned.name)
        if result is None:
            return [planned]
        if result.get("tool_call_error") and refused is not None:
            return f"{refused} {result['content']}"
        return f"{done} {result['content']}"

    return script


def _echo(messages: list[dict[str, Any]]) -> str:
    return f"Echo: {latest_user_message(messages)}"


def _multi(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
    message = latest_user_message(messages)
    results = tool_results(messages)
    if "send_email" not in results:
        return [PlannedCall("send_email", {"to": "a@example.com", "subject": message}),
                PlannedCall("get_weather", {"city": message})]
    if "deploy_app" not in results:
        return [PlannedCall("deploy_app", {"app": message})]
    return "All done"


def _agent(agent_id: str, description: str, script, tools) -> Agent:
    return Agent(id=agent_id, name=agent_id, description=description,
                 model=ScriptedModel(script), tools=list(tools))


def demo_agents() -> list[Agent]:
    """Fresh demo agents, exactly as the contract's table describes them."""
    return [
        _agent("chat-agent", "Echoes the message.", _echo, []),
        _agent("confirm-agent", "Sends an email once a person confirms.", _single_tool_script(
            lambda m: PlannedCall("send_email", {"to": "a@example.com", "subject": m}),
            "Done:", "Not sent:"), [send_email]),
        _agent("external-agent", "Asks the client to look up the weather.", _single_tool_script(
            lambda m: PlannedCall("get_weather", {"city": m}), "Weather:", None),
            [get_weather]),
        _agent("input-agent", "Books a flight once a person names the passenger.",
               _single_tool_script(lambda m: PlannedCall("book_flight", {"destination": m}),
                                   "Booked:", None), [book_flight]),
        _agent("approval-agent", "Deploys an app once an admin approves.", _single_tool_script(
            lambda m: PlannedCall("deploy_app", {"app": m}), "Deployed:", "Not deployed:"),
            [deploy_app]),
        _agent("multi-agent", "Every pause kind, with a second pause.", _multi,
               [send_email, get_weather, book_flight, deploy_app]),
    ]
