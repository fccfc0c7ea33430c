"""Tools: plain functions with pause flags, described to the model by their signature."""

from __future__ import annotations

import contextvars
import inspect
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from statemachine.blocking import Offload

CONFIRMATION = "confirmation"
USER_INPUT = "user_input"
EXTERNAL_EXECUTION = "external_execution"

_FIELD_TYPES: dict[type, tuple[str, str]] = {
    str: ("str", "string"),
    int: ("int", "integer"),
    float: ("float", "number"),
    bool: ("bool", "boolean"),
    list: ("list", "array"),
    dict: ("dict", "object"),
}


@dataclass(frozen=True)
class ToolCallContext:
    """Which call is executing, for tools that log or correlate (see `current_call`)."""

    run_id: str
    tool_call_id: str
    tool_name: str


current_call: contextvars.ContextVar[ToolCallContext | None] = contextvars.ContextVar(
    "current_call", default=None
)

# Under gevent a tool's own code may block without yielding (a C driver, CPU work, a sleep in
# a C library): each call runs in one of these OS threads, so it never freezes the worker's
# requests, streams or lease renewals. Without gevent a tool runs in its run's thread.
TOOL_THREADS = Offload(int(os.environ.get("TOOL_THREADS", "64") or 64), "tools")


def run_tool(tool: Callable[..., Any], arguments: dict[str, Any]) -> Any:
    """Call `tool(**arguments)` where blocking cannot stall other work (`current_call` kept)."""
    return TOOL_THREADS.run(tool, **arguments)


@dataclass(frozen=True)
class Parameter:
    name: str
    field_type: str
    json_type: str
    required: bool
    description: str | None = None


@dataclass(frozen=True)
class Tool:
    """A callable the model may ask for, and how a call to it must wait, if at all."""

    name: str
    description: str
    function: Callable[..., Any]
    parameters: tuple[Parameter, ...] = ()
    requires_confirmation: bool = False
    external_execution: bool = False
    requires_user_input: bool = False
    user_input_fields: tuple[str, ...] = ()
    requires_approval: bool = False

    @property
    def pause_kind(self) -> str | None:
        """The kind of pause a call makes; an approval waits like a confirmation."""
        if self.requires_user_input:
            return USER_INPUT
        if self.external_execution:
            return EXTERNAL_EXECUTION
        if self.requires_confirmation or self.requires_approval:
            return CONFIRMATION
        return None

    def json_schema(self) -> dict[str, Any]:
        """The parameters as a JSON schema object, from the signature's type hints."""
        properties = {
            p.name: {"type": p.json_type, **({"description": p.description} if p.description
                                             else {})}
            for p in self.parameters
        }
        required = [p.name for p in self.parameters if p.required]
        return {"type": "object", "properties": properties, "required": required}

    def definition(self) -> dict[str, Any]:
        """What the model is told about the tool."""
        return {"name": self.name, "description": self.description,
                "parameters": self.json_schema()}

    def describe(self) -> dict[str, Any]:
        """What `GET /agents` shows of the tool."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": self.json_schema(),
            "requires_confirmation": self.requires_confirmation or self.requires_approval,
            "requires_user_input": self.requires_user_input,
            "external_execution": self.external_execution,
            "requires_approval": self.requires_approval,
        }

    def user_input_schema(self, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        """The fields a person must fill in, with any value the model already gave."""
        names = self.user_input_fields or tuple(p.name for p in self.parameters)
        by_name = {p.name: p for p in self.parameters}
        return [
            {
                "name": name,
                "field_type": by_name[name].field_type if name in by_name else "str",
                "description": by_name[name].description if name in by_name else None,
                "value": arguments.get(name),
            }
            for name in names
        ]

    def __call__(self, **arguments: Any) -> Any:
        return self.function(**arguments)


def _parameters(function: Callable[..., Any]) -> tuple[Parameter, ...]:
    hints = typing.get_type_hints(function)
    params = []
    for name, param in inspect.signature(function).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = typing.get_origin(hints.get(name, str)) or hints.get(name, str)
        field_type, json_type = _FIELD_TYPES.get(hint, ("str", "string"))
        params.append(Parameter(name, field_type, json_type, param.default is param.empty))
    return tuple(params)


def tool(
    function: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    requires_confirmation: bool = False,
    external_execution: bool = False,
    requires_user_input: bool = False,
    user_input_fields: list[str] | tuple[str, ...] | None = None,
    requires_approval: bool = False,
) -> Any:
    """Make a function a Tool; usable bare (`@tool`) or with flags (`@tool(...)`)."""

    def wrap(fn: Callable[..., Any]) -> Tool:
        # An approval may sit on top of any one kind; two kinds of their own conflict.
        kinds = sum([requires_confirmation, external_execution, requires_user_input])
        if kinds > 1:
            raise ValueError(f"tool {fn.__name__}: choose one pause kind")
        return Tool(
            name=name or fn.__name__,
            description=description or inspect.getdoc(fn) or "",
            function=fn,
            parameters=_parameters(fn),
            requires_confirmation=requires_confirmation,
            external_execution=external_execution,
            requires_user_input=requires_user_input,
            user_input_fields=tuple(user_input_fields or ()),
            requires_approval=requires_approval,
        )

    return wrap(function) if function is not None else wrap
