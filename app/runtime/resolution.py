"""Merging a continue's tool objects into the paused calls, and checking nothing is left open.

Runs before any state change: every problem raises `ToolInputError` (HTTP 400) with the
contract's sentence, and the stored run is untouched. The client's objects are merged by
`tool_call_id`: only decision fields are read (`confirmed`, `confirmation_note`, `result`,
`user_input_schema[].value`); anything else the client sent is ignored. An admin's decision
on an approval replaces whatever the client sent for that call.
"""

from __future__ import annotations

import math
from typing import Any

from app.runtime.documents import REJECTED_BY_ADMIN, WAITING_FLAGS, waiting_calls, waiting_kind
from app.runtime.tools import CONFIRMATION, EXTERNAL_EXECUTION, USER_INPUT
from statemachine.store import Approval, dumps

EXECUTE, REJECT, RESULT = "execute", "reject", "result"


class ToolInputError(Exception):
    """A continue's tools do not resolve the pause (HTTP 400); `detail` names the call."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def resolve_pause(
    stored: list[dict[str, Any]],
    client: list[dict[str, Any]],
    approvals: dict[str, Approval],
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Return the updated tool objects and the actions to apply, in call order; `stored`
    is left as it was (a refused continue changes nothing)."""
    tools = [_own_copy(obj) for obj in stored]
    by_id = {obj["tool_call_id"]: obj for obj in tools}
    for sent in client:
        _merge(_target(by_id, sent), sent)
    waiting = waiting_calls(tools)
    decided_by_admin = [o for o in waiting if o.get("approval_id") in approvals]
    if not client and not decided_by_admin:
        raise ToolInputError(
            f"tools is required: the run is waiting for {len(waiting)} tool call(s)"
        )
    for obj in decided_by_admin:
        _apply_approval(obj, approvals[obj["approval_id"]])
    return tools, [[obj["tool_call_id"], _settle(obj)] for obj in waiting]


def _own_copy(obj: dict[str, Any]) -> dict[str, Any]:
    """A call as the resolution may change it: its own dict, and for a waiting call its own
    arguments and input fields (the only nested values a resolution writes); a deep copy of
    every call cost more than the rest of the resolution."""
    mine = dict(obj)
    if waiting_kind(obj) is not None:
        if isinstance(obj.get("tool_args"), dict):
            mine["tool_args"] = dict(obj["tool_args"])
        if isinstance(obj.get("user_input_schema"), list):
            mine["user_input_schema"] = [dict(f) if isinstance(f, dict) else f
                                         for f in obj["user_input_schema"]]
    return mine


def _target(by_id: dict[str, dict[str, Any]], sent: dict[str, Any]) -> dict[str, Any]:
    call_id = sent["tool_call_id"]
    obj = by_id.get(call_id)
    if obj is None:
        raise ToolInputError(f"Tool call {call_id} is not part of this run")
    if waiting_kind(obj) is None:
        raise ToolInputError(f"Tool call {_name(obj)} is not waiting for input")
    return obj


def _merge(obj: dict[str, Any], sent: dict[str, Any]) -> None:
    """Copy the client's decision fields onto the stored call."""
    kind = waiting_kind(obj)
    if kind == CONFIRMATION:
        if "confirmed" in sent:
            obj["confirmed"] = sent["confirmed"]
        if sent.get("confirmation_note") is not None:
            obj["confirmation_note"] = sent["confirmation_note"]
    elif kind == EXTERNAL_EXECUTION and sent.get("result") is not None:
        obj["result"] = sent["result"]
    elif kind == USER_INPUT:
        _merge_values(obj, _values_of(sent.get("user_input_schema") or []))


def _values_of(schema: list[dict[str, Any]]) -> dict[str, Any]:
    return {f["name"]: f.get("value") for f in schema if f.get("value") is not None}


def _merge_values(obj: dict[str, Any], values: dict[str, Any]) -> None:
    for field in obj.get("user_input_schema") or []:
        if values.get(field["name"]) is not None:
            field["value"] = values[field["name"]]


def _apply_approval(obj: dict[str, Any], approval: Approval) -> None:
    """The admin's decision wins: approved confirms (with any data), rejected rejects."""
    data = approval.resolution_data or {}
    kind = waiting_kind(obj)
    if approval.status != "approved":
        obj["confirmed"] = False
        obj["confirmation_note"] = admin_note(data.get("note"))
        obj["_admin_rejected"] = True
        return
    obj["confirmed"] = True
    if kind == USER_INPUT and isinstance(data.get("values"), dict):
        _merge_values(obj, data["values"])
    if kind == EXTERNAL_EXECUTION and data.get("result") is not None:
        obj["result"] = str(data["result"])


def admin_note(note: Any) -> str:
    """An admin's note as the tool object's string: text as is, other JSON as compact JSON
    (never a Python repr); none or empty means the default sentence."""
    if note is None or note == "":
        return REJECTED_BY_ADMIN
    return note if isinstance(note, str) else dumps(note)


def _settle(obj: dict[str, Any]) -> str:
    """Check the call is resolved, clear its waiting flag, and say what to do with it."""
    kind = waiting_kind(obj)
    if obj.pop("_admin_rejected", False):
        action = REJECT
    elif kind == CONFIRMATION:
        action = _settle_confirmation(obj)
    elif kind == EXTERNAL_EXECUTION:
        action = _settle_external(obj)
    else:
        action = _settle_user_input(obj)
    obj[WAITING_FLAGS[kind]] = False
    return action


def _settle_confirmation(obj: dict[str, Any]) -> str:
    if obj.get("confirmed") is None:
        raise ToolInputError(f"Tool call {_name(obj)} requires confirmed true or false")
    return EXECUTE if obj["confirmed"] else REJECT


def _settle_external(obj: dict[str, Any]) -> str:
    if obj.get("result") is None:
        raise ToolInputError(
            f"Tool call {_name(obj)} requires a result from external execution"
        )
    obj["tool_call_error"] = False
    return RESULT


def _settle_user_input(obj: dict[str, Any]) -> str:
    for field in obj.get("user_input_schema") or []:
        if field.get("value") is None:
            raise ToolInputError(f"Tool call {_name(obj)} requires a value for {field['name']}")
        field["value"] = _coerce(obj, field)
        obj["tool_args"][field["name"]] = field["value"]
    obj["answered"] = True
    return EXECUTE


_COERCERS = {
    "str": lambda v: v if isinstance(v, str) else _scalar_text(v),
    "int": lambda v: int(v) if not isinstance(v, bool | float | list | dict) else _bad(),
    "float": lambda v: _finite(float(v)) if not isinstance(v, bool | list | dict) else _bad(),
    "bool": lambda v: v if isinstance(v, bool) else _text_bool(v),
    "list": lambda v: v if isinstance(v, list) else _bad(),
    "dict": lambda v: v if isinstance(v, dict) else _bad(),
}


def _coerce(obj: dict[str, Any], field: dict[str, Any]) -> Any:
    """A field's value as its declared type; a value that cannot be one is a 400."""
    field_type = field.get("field_type") or "str"
    try:
        return _COERCERS.get(field_type, _COERCERS["str"])(field["value"])
    except (TypeError, ValueError):
        raise ToolInputError(
            f"Invalid structure or content for tools: value of {field['name']} in tool call "
            f"{obj['tool_call_id']} must be of type {field_type}"
        ) from None


def _scalar_text(value: Any) -> str:
    if isinstance(value, list | dict):
        raise ValueError("not a scalar")
    return str(value).lower() if isinstance(value, bool) else str(value)


def _text_bool(value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError("not a boolean")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _bad() -> Any:
    raise ValueError("wrong type")


def _name(obj: dict[str, Any]) -> str:
    return f"{obj['tool_call_id']} ({obj['tool_name']})"
