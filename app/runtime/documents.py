"""The JSON shapes of a run: tool objects, messages, events, approvals, the pause sentence.

Pure functions over dicts, so the loop, the service and the views agree on every key.
"""

from __future__ import annotations

import functools
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from app.runtime.tools import CONFIRMATION, EXTERNAL_EXECUTION, USER_INPUT, Tool
from statemachine.store import ENVELOPE_KEYS, Envelope

REJECTED_BY_USER = "Function call was rejected by the user"
REJECTED_BY_ADMIN = "Rejected by an admin"

WAITING_FLAGS = {
    CONFIRMATION: "requires_confirmation",
    USER_INPUT: "requires_user_input",
    EXTERNAL_EXECUTION: "external_execution_required",
}

_PAUSE_SENTENCES = {
    frozenset({CONFIRMATION}): "I need confirmation.",
    frozenset({USER_INPUT}): "I need user input.",
    frozenset({EXTERNAL_EXECUTION}): "it needs external execution.",
    frozenset({CONFIRMATION, USER_INPUT}): "I need confirmation or user input.",
    frozenset({CONFIRMATION, EXTERNAL_EXECUTION}): "I need confirmation or external execution.",
    frozenset({USER_INPUT, EXTERNAL_EXECUTION}): "I need user input or external execution.",
    frozenset({CONFIRMATION, USER_INPUT, EXTERNAL_EXECUTION}):
        "I need confirmation, user input or external execution.",
}


def epoch() -> int:
    return int(time.time())


def new_id() -> str:
    return str(uuid.uuid4())


def tool_object(call_id: str, name: str, args: dict[str, Any], tool: Tool | None) -> dict:
    """A fresh ToolExecution with every key present; a pausing tool's flag is set true."""
    kind = tool.pause_kind if tool else None
    obj: dict[str, Any] = {
        "tool_call_id": call_id,
        "tool_name": name,
        "tool_args": dict(args),
        "tool_call_error": None,
        "result": None,
        "metrics": None,
        "child_run_id": None,
        "stop_after_tool_call": False,
        "created_at": epoch(),
        "requires_confirmation": None,
        "confirmed": None,
        "confirmation_note": None,
        "requires_user_input": None,
        "user_input_schema": None,
        "user_feedback_schema": None,
        "answered": None,
        "external_execution_required": None,
        "external_execution_silent": None,
        "approval_type": None,
        "approval_id": None,
    }
    if kind is not None:
        obj[WAITING_FLAGS[kind]] = True
    if kind == USER_INPUT and tool is not None:
        obj["user_input_schema"] = tool.user_input_schema(args)
    if tool is not None and tool.requires_approval:
        obj["approval_type"] = "required"
        obj["approval_id"] = new_id()
    return obj


def waiting_kind(obj: dict[str, Any]) -> str | None:
    """The pause kind this call is waiting on, or None once resolved (or never paused)."""
    return next((kind for kind, flag in WAITING_FLAGS.items() if obj.get(flag) is True), None)


def waiting_calls(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [obj for obj in tools if waiting_kind(obj) is not None]


def requirements(run_id: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One RunRequirement (the reference's `to_dict()` shape) per call waiting now.

    Derived from the stored calls, never stored itself, so it cannot disagree with `tools`;
    its id is a name-based uuid of (run, call): the same requirement keeps the same id.
    """
    return [_requirement(run_id, obj) for obj in waiting_calls(tools)]


@functools.lru_cache(maxsize=4096)
def requirement_id(run_id: str, tool_call_id: str) -> str:
    """The name-based uuid of (run, call); a pause and the answer that shows it ask twice."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"agentos:{run_id}:{tool_call_id}"))


def _requirement(run_id: str, obj: dict[str, Any]) -> dict[str, Any]:
    created = datetime.fromtimestamp(int(obj.get("created_at") or 0), UTC).isoformat()
    requirement: dict[str, Any] = {
        "id": requirement_id(run_id, obj["tool_call_id"]),
        "created_at": created,
        "tool_execution": public_tool(obj),
    }
    if obj.get("user_input_schema") is not None:
        requirement["user_input_schema"] = obj["user_input_schema"]
    # confirmation, confirmation_note and external_execution_result are null while a call
    # waits; the reference's to_dict() drops null keys, and so does this.
    return requirement


def pause_content(tools: list[dict[str, Any]]) -> str:
    """The paused run's `content`, naming every kind paused now."""
    kinds = frozenset(k for k in map(waiting_kind, tools) if k is not None)
    return f"I have tools to execute, but {_PAUSE_SENTENCES[kinds]}"


def message(role: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra, "created_at": epoch()}


def tool_message(obj: dict[str, Any], content: str, error: bool) -> dict[str, Any]:
    return message("tool", content, tool_call_id=obj["tool_call_id"],
                   tool_name=obj["tool_name"], tool_call_error=error)


def approval_doc(run: dict[str, Any], obj: dict[str, Any], pause_type: str) -> dict[str, Any]:
    """The static part of an approval, stored in the same commit that pauses the run."""
    now = epoch()
    return {
        "id": obj["approval_id"],
        "run_id": run["run_id"],
        "session_id": run["session_id"],
        "agent_id": run["agent_id"],
        "user_id": run.get("user_id"),
        "approval_type": "required",
        "pause_type": pause_type,
        "tool_name": obj["tool_name"],
        "tool_args": obj["tool_args"],
        "tool_call_id": obj["tool_call_id"],
        "created_at": now,
    }


def envelope(run: dict[str, Any]) -> Envelope | None:
    """The identity `event` puts in every event of the run (a store keeps it once); None
    for a document without one."""
    values = [run.get(key) for key in ENVELOPE_KEYS]
    return Envelope(*values) if all(isinstance(v, str) for v in values) else None


def event(run: dict[str, Any], name: str, **fields: Any) -> dict[str, Any]:
    """An event payload with the keys every event carries."""
    return compact({
        "created_at": epoch(),
        "event": name,
        "agent_id": run["agent_id"],
        "agent_name": run["agent_name"],
        "run_id": run["run_id"],
        "session_id": run["session_id"],
        **fields,
    })


def public_tool(obj: dict[str, Any]) -> dict[str, Any]:
    """A tool object as clients see it: every key kept, nulls too, but the internal ones
    (a leading underscore)."""
    return {k: v for k, v in obj.items() if k[:1] != "_"}


def compact(value: Any) -> Any:
    """Drop null-valued keys, except inside tool objects, where every key is always present,
    and in user-input fields (a requirement's `user_input_schema`), which the reference's
    client reads key by key. Keys with a leading underscore are internal: always dropped.

    Every event and every answer passes through here (it was a tenth of a create+continue
    pair's instructions, `bench.instructions`), so it walks with plain loops, and a value
    whose type is exactly a JSON scalar is kept without further checks: comprehensions are
    calls of their own, and `isinstance` with a union was the most called function of a pair."""
    if isinstance(value, dict):
        return _compact_dict(value)
    if isinstance(value, list):
        return _compact_list(value)
    return value


_SCALARS = frozenset({str, int, float, bool})


def _compact_dict(value: dict[str, Any]) -> dict[str, Any]:
    if "tool_call_id" in value and "tool_args" in value:  # a tool object
        return public_tool(value)
    if "name" in value and "field_type" in value:  # a user-input field
        return dict(value)
    out = {}
    for key, item in value.items():
        if item is None or key[:1] == "_":
            continue
        out[key] = item if type(item) in _SCALARS else compact(item)
    return out


def _compact_list(value: list[Any]) -> list[Any]:
    return [item if item is None or type(item) in _SCALARS else compact(item)
            for item in value]
