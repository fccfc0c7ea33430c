"""A `Model` backed by any OpenAI-compatible `/v1/chat/completions` endpoint.

The loop only understands `ContentDelta`, `ToolCall`, `TurnUsage` and `ModelError`, so this
module's job is translation in both directions: our run messages and tool specs into the
OpenAI wire shape, and the provider's streamed chunks (and every way the provider can fail)
back into those four types. Nothing from the `openai` library escapes it.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import openai

from app.runtime.models.base import ContentDelta, ModelError, ToolCall, TurnItem, TurnUsage

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Local servers (llama.cpp, vLLM, Ollama) accept any key, but the client insists on one.
DEFAULT_API_KEY = "not-needed"
MAX_ERROR_CHARS = 300


# --- our messages and tools -> OpenAI request -------------------------------------------------


def to_openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Convert run messages to chat-completions messages, dropping our bookkeeping keys
    (created_at, tool_name, tool_call_error...) that strict providers reject."""
    return [_convert_message(message) for message in messages]


def _convert_message(message: dict[str, Any]) -> dict[str, Any]:
    """Convert one message; assistant tool calls and tool results need reshaping, the rest
    keeps its role and content."""
    role = message.get("role")
    if role == "assistant":
        return _convert_assistant(message)
    if role == "tool":
        return {
            "role": "tool",
            "tool_call_id": message.get("tool_call_id"),
            "content": _as_text(message.get("content")),
        }
    return {"role": role, "content": message.get("content")}


def _convert_assistant(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant turn that called tools must repeat those calls with JSON-string
    arguments, so the provider can match the following tool results to them."""
    calls = message.get("tool_calls") or []
    if not calls:
        return {"role": "assistant", "content": message.get("content") or ""}
    return {
        "role": "assistant",
        "content": message.get("content") or None,
        "tool_calls": [
            {
                "id": call.get("id"),
                "type": "function",
                "function": {
                    "name": call.get("name"),
                    "arguments": _arguments_text(call.get("arguments")),
                },
            }
            for call in calls
        ],
    }


def _arguments_text(arguments: Any) -> str:
    """OpenAI wants arguments as a JSON string; ours are stored decoded."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {})


def _as_text(content: Any) -> str:
    """Tool results must be text on the wire; structured results are sent as JSON rather
    than Python reprs so the model can read them."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    try:
        return json.dumps(content, default=str)
    except (TypeError, ValueError):
        return str(content)


def to_openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wrap our `{name, description, parameters}` specs in OpenAI's function envelope."""
    return [
        {
            "type": "function",
            "function": {
                "name": tool["name"],
                "description": tool.get("description") or "",
                "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
            },
        }
        for tool in tools
    ]


# --- streamed chunks -> our items ------------------------------------------------------------


@dataclass
class _PendingCall:
    """A tool call being assembled from fragments that share one `index`."""

    id: str | None = None
    name: str | None = None
    argument_parts: list[str] = field(default_factory=list)

    def to_tool_call(self) -> ToolCall:
        """Decode the joined arguments; the loop needs a dict, so anything else is the
        provider's fault and ends the turn as a ModelError."""
        name = self.name or ""
        if not name:
            raise ModelError("Model returned a tool call without a name")
        text = "".join(self.argument_parts)
        try:
            # Some servers send no arguments at all for a parameterless tool.
            arguments = json.loads(text) if text.strip() else {}
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ModelError(f"Model returned invalid JSON arguments for tool {name}")
        return ToolCall(
            id=self.id or f"call_{uuid.uuid4().hex[:12]}", name=name, arguments=arguments
        )


@dataclass
class _TurnState:
    """Everything learned from the chunks of one streamed turn, except text, which is
    passed on as soon as it arrives."""

    calls: dict[int, _PendingCall] = field(default_factory=dict)
    usage: TurnUsage | None = None

    def absorb(self, chunk: Any) -> str:
        """Record the chunk's tool-call fragments and usage; return its text (maybe "")."""
        if chunk.usage is not None:
            self.usage = TurnUsage(
                input_tokens=chunk.usage.prompt_tokens or 0,
                output_tokens=chunk.usage.completion_tokens or 0,
            )
        text_parts: list[str] = []
        for choice in chunk.choices or []:
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                text_parts.append(delta.content)
            for fragment in delta.tool_calls or []:
                self._absorb_fragment(fragment)
        return "".join(text_parts)

    def _absorb_fragment(self, fragment: Any) -> None:
        """Merge one tool-call fragment: id and name come once, arguments in pieces."""
        pending = self.calls.setdefault(self._slot_for(fragment), _PendingCall())
        if fragment.id and not pending.id:
            pending.id = fragment.id
        function = fragment.function
        if function is not None:
            if function.name and not pending.name:
                pending.name = function.name
            if function.arguments:
                pending.argument_parts.append(function.arguments)

    def _slot_for(self, fragment: Any) -> int:
        """Use the fragment's `index`; a few servers omit it, so then a new id opens a new
        call and anything else continues the latest one."""
        if fragment.index is not None:
            return int(fragment.index)
        if fragment.id or not self.calls:
            return max(self.calls, default=-1) + 1
        return max(self.calls)

    def finish(self) -> list[ToolCall]:
        """The completed tool calls, in the order the model numbered them."""
        return [self.calls[index].to_tool_call() for index in sorted(self.calls)]


# --- provider failures -> ModelError ---------------------------------------------------------


def _short(text: str) -> str:
    """Provider error bodies can be huge (HTML pages, stack traces); keep run output readable."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _status_message(error: openai.APIStatusError) -> str:
    """Prefer the provider's own `error.message` over the client's generic wording."""
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return _short(body["message"])
    if isinstance(body, str) and body.strip():
        return _short(body)
    return _short(error.message)


# --- the model -------------------------------------------------------------------------------


class OpenAIChatModel:
    """Streams one chat-completions turn per `stream_turn` call, with tools.

    Safe to share between threads: the client is created once under a lock, and the
    `openai` client itself supports concurrent requests.
    """

    provider = "OpenAI"

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        temperature: float | None = None,
    ) -> None:
        self.id: str = model or os.environ.get("OPENAI_MODEL") or DEFAULT_MODEL
        self.base_url: str = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self._api_key: str = api_key or os.environ.get("OPENAI_API_KEY") or DEFAULT_API_KEY
        self.timeout = float(timeout)
        self.temperature = temperature
        self._client: openai.OpenAI | None = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        # Never show the API key.
        return f"OpenAIChatModel(id={self.id!r}, base_url={self.base_url!r})"

    def _get_client(self) -> openai.OpenAI:
        """Create the client on first use (so constructing a model never does I/O or fails)
        and reuse it, keeping its connection pool warm across turns."""
        with self._client_lock:
            if self._client is None:
                self._client = openai.OpenAI(
                    base_url=self.base_url,
                    api_key=self._api_key,
                    timeout=self.timeout,
                    # The loop decides about retries; hidden ones would multiply the timeout.
                    max_retries=0,
                )
            return self._client

    def close(self) -> None:
        """Release the client's pooled connections (for shutdown and tests)."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _request(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The keyword arguments of one streaming chat-completions call."""
        request: dict[str, Any] = {
            "model": self.id,
            "messages": to_openai_messages(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            request["tools"] = to_openai_tools(tools)
        if self.temperature is not None:
            request["temperature"] = self.temperature
        return request

    def _translate(self, error: Exception, fallback: str) -> ModelError:
        """Turn any failure into one readable sentence for the run's ERROR content."""
        if isinstance(error, ModelError):
            return error
        if isinstance(error, openai.APITimeoutError):
            return ModelError(f"Model request timed out after {self.timeout:g}s")
        if isinstance(error, openai.APIStatusError):
            return ModelError(
                f"Model provider answered {error.status_code}: {_status_message(error)}"
            )
        if isinstance(error, openai.APIConnectionError):
            return ModelError(f"Could not reach the model provider at {self.base_url}")
        if isinstance(error, openai.APIError):
            # E.g. an `{"error": ...}` object sent in the middle of the stream.
            return ModelError(f"Model provider reported an error: {_short(error.message)}")
        return ModelError(f"{fallback}: {type(error).__name__}")

    @contextmanager
    def _errors_as_model_errors(self, fallback: str) -> Iterator[None]:
        """Re-raise whatever fails in the block as ModelError, keeping the cause chained."""
        try:
            yield
        except Exception as error:
            translated = self._translate(error, fallback)
            if translated is error:
                raise
            raise translated from error

    def stream_turn(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> Iterator[TurnItem]:
        """Yield text as it streams, then the tool calls, then the usage if reported."""
        with self._errors_as_model_errors("Model request failed"):
            stream = self._get_client().chat.completions.create(**self._request(messages, tools))
        try:
            yield from self._read(stream)
        finally:
            # Also runs when the consumer stops early: frees the connection at once.
            self._close_stream(stream)

    def _read(self, stream: Any) -> Iterator[TurnItem]:
        """Consume the chunks; errors are translated around reading only, never around our
        own `yield`, so exceptions thrown in by the consumer pass through untouched."""
        state = _TurnState()
        chunks = iter(stream)
        malformed = "Malformed answer from the model provider"
        while True:
            with self._errors_as_model_errors(malformed):
                chunk = next(chunks, None)
                text = state.absorb(chunk) if chunk is not None else ""
            if chunk is None:
                break
            if text:
                yield ContentDelta(text)
        with self._errors_as_model_errors(malformed):
            calls = state.finish()
        yield from calls
        if state.usage is not None:
            yield state.usage

    @staticmethod
    def _close_stream(stream: Any) -> None:
        """Closing must not mask the real outcome of the turn, so its errors are dropped."""
        with suppress(Exception):
            stream.close()
