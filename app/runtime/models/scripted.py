"""A deterministic, offline model: a small script per agent decides each turn.

A script is a function of the conversation so far that returns either the answer's text or
the tool calls to make. The answer is streamed in several deltas, like a real model's, after
`SCRIPTED_MODEL_LATENCY_MS` of thinking.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from app.runtime.models.base import ContentDelta, ToolCall, TurnItem, TurnUsage


@dataclass(frozen=True)
class PlannedCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


Script = Callable[[list[dict[str, Any]]], "str | list[PlannedCall]"]


def latest_user_message(messages: list[dict[str, Any]]) -> str:
    return next((str(m["content"]) for m in reversed(messages) if m["role"] == "user"), "")


def tool_results(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The tool messages of the conversation, by tool name (the latest one wins)."""
    return {m["tool_name"]: m for m in messages if m["role"] == "tool" and m.get("tool_name")}


def assistant_turns(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if m["role"] == "assistant")


def _deltas(text: str) -> list[str]:
    """Split on word boundaries into a few pieces that join back to `text` exactly."""
    pieces = re.findall(r"\S+\s*|\s+", text)
    return pieces or [text]


def _token_count(text: str) -> int:
    return max(1, len(text.split()))


class ScriptedModel:
    """A Model whose every turn is decided by `script`; the same input gives the same output."""

    provider = "Scripted"

    def __init__(self, script: Script, *, id: str = "scripted-model",
                 latency_ms: float | None = None) -> None:
        self.id = id
        self.script = script
        self._latency_ms = latency_ms

    @property
    def latency_seconds(self) -> float:
        if self._latency_ms is not None:
            return self._latency_ms / 1000
        return float(os.environ.get("SCRIPTED_MODEL_LATENCY_MS", "0") or 0) / 1000

    def stream_turn(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> Iterator[TurnItem]:
        if self.latency_seconds:
            time.sleep(self.latency_seconds)
        decision = self.script(messages)
        prompt_tokens = sum(_token_count(str(m.get("content") or "")) for m in messages)
        if isinstance(decision, str):
            for piece in _deltas(decision):
                yield ContentDelta(piece)
            yield TurnUsage(prompt_tokens, _token_count(decision))
            return
        turn = assistant_turns(messages) + 1
        for index, call in enumerate(decision, start=1):
            yield ToolCall(id=f"call_{turn}_{index}", name=call.name,
                           arguments=dict(call.arguments))
        yield TurnUsage(prompt_tokens, len(decision) * 8)
