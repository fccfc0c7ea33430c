"""What a model is to the loop: `stream_turn(messages, tools)` yields deltas and tool calls.

Messages are the run object's `messages` entries (dicts with `role`, `content`, and for an
assistant turn that called tools `tool_calls: [{"id", "name", "arguments"}]`, for a tool
result `tool_call_id`, `tool_name`, `tool_call_error`). Tools are
`{"name", "description", "parameters"}` with a JSON schema in `parameters`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ContentDelta:
    """A piece of the answer's text, streamed as one `RunContent` event."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """The model asks for one tool call; `arguments` is already decoded JSON."""

    id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TurnUsage:
    """Token counts of the turn, yielded last when the provider reports them."""

    input_tokens: int = 0
    output_tokens: int = 0


TurnItem = ContentDelta | ToolCall | TurnUsage


class ModelError(Exception):
    """A provider failure (error answer, timeout, malformed stream). The run ends ERROR with
    `str(error)` as its content; the loop never lets it escape as a crash."""

    error_type = "ModelProviderError"


class Model(Protocol):
    """A chat model that the loop drives one turn at a time."""

    id: str
    provider: str

    def stream_turn(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> Iterator[TurnItem]: ...
