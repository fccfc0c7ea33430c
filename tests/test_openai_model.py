"""OpenAIChatModel against a real local HTTP server speaking the chat-completions stream format.

No mocks: the `openai` client really connects, sends JSON and parses server-sent events, so
these tests also catch mismatches with the wire format and with the client library.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.runtime.models.base import ContentDelta, ModelError, ToolCall, TurnUsage
from app.runtime.models.openai_compat import OpenAIChatModel

# --- a scripted OpenAI-compatible server ------------------------------------------------------


@dataclass
class Reply:
    """One scripted answer: an SSE stream of `events` (dicts are sent as JSON, strings raw),
    or, with `json_body`, a plain JSON answer; `delay` seconds of silence come first."""

    status: int = 200
    events: list[dict[str, Any] | str] = field(default_factory=list)
    json_body: dict[str, Any] | None = None
    delay: float = 0.0


@dataclass
class FakeProvider:
    """What the tests see of the server: where it is, what to answer, what it was sent."""

    url: str
    replies: list[Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_and_pop(self, request: dict[str, Any]) -> Reply:
        with self.lock:
            self.requests.append(request)
            if self.replies:
                return self.replies.pop(0)
        return Reply(status=500, json_body={"error": {"message": "no scripted reply"}})


class _Server(ThreadingHTTPServer):
    # Non-daemon handler threads, so server_close() joins them and teardown leaves none behind.
    daemon_threads = False
    block_on_close = True
    provider: FakeProvider


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # a stuck client can never hold a handler thread (and teardown) for long
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def do_POST(self) -> None:
        self.close_connection = True
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        provider = self.server.provider
        reply = provider.record_and_pop(
            {
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
            }
        )
        if reply.delay and provider.stop.wait(reply.delay):
            return  # teardown while we were "thinking": just go away
        try:
            if reply.json_body is not None:
                self._send_json(reply.status, reply.json_body)
            else:
                self._send_events(reply.status, reply.events)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests); nothing to answer to

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_events(self, status: int, events: list[dict[str, Any] | str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        for event in [*events, "[DONE]"]:
            payload = event if isinstance(event, str) else json.dumps(event)
            data = f"data: {payload}\n\n".encode()
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    server = _Server(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    fake = FakeProvider(url=f"http://127.0.0.1:{port}/v1")
    server.provider = fake
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield fake
    finally:
        fake.stop.set()  # wake handlers sleeping in a scripted delay
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def make_model(provider: FakeProvider) -> Iterator[Callable[..., OpenAIChatModel]]:
    models: list[OpenAIChatModel] = []

    def make(**kwargs: Any) -> OpenAIChatModel:
        options: dict[str, Any] = {
            "model": "test-model",
            "base_url": provider.url,
            "api_key": "test-key",
            "timeout": 5.0,
        }
        options.update(kwargs)
        model = OpenAIChatModel(**options)
        models.append(model)
        return model

    yield make
    for model in models:
        model.close()


# --- wire-format helpers ----------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        "usage": None,
    }


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "test-model",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def call_fragment(
    index: int, arguments: str, call_id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    fragment: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id is not None:
        fragment.update(id=call_id, type="function")
    if name is not None:
        fragment["function"]["name"] = name
    return chunk({"tool_calls": [fragment]})


USER_ONLY = [{"role": "user", "content": "Hi"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TIME_TOOL = {"name": "get_time", "description": "Current time in a timezone."}


# --- tests ------------------------------------------------------------------------------------


def test_text_streams_in_deltas_then_usage(provider, make_model):
    provider.replies.append(
        Reply(
            events=[
                chunk({"role": "assistant", "content": ""}),
                chunk({"content": "Hel"}),
                chunk({"content": "lo, "}),
                chunk({"content": "world"}),
                chunk({}, finish_reason="stop"),
                usage_chunk(12, 3),
            ]
        )
    )
    items = list(make_model().stream_turn(USER_ONLY, []))

    assert items == [
        ContentDelta("Hel"),
        ContentDelta("lo, "),
        ContentDelta("world"),
        TurnUsage(input_tokens=12, output_tokens=3),
    ]
    (request,) = provider.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer test-key"
    body = request["body"]
    assert body["model"] == "test-model"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    assert "tools" not in body


HISTORY_WITH_TOOL_ROUND = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo, then Paris?", "created_at": 1},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_0", "name": "get_weather", "arguments": {"city": "Oslo"}}],
        "created_at": 2,
    },
    {
        "role": "tool",
        "tool_call_id": "call_0",
        "tool_name": "get_weather",
        "tool_call_error": False,
        "content": "Sunny, 18C",
        "created_at": 3,
    },
]

EXPECTED_OPENAI_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": WEATHER_TOOL["parameters"],
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a timezone.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]

EXPECTED_OPENAI_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo, then Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "Sunny, 18C"},
]


def test_parallel_tool_calls_are_assembled_and_request_is_converted(provider, make_model):
    provider.replies.append(
        Reply(
            events=[
                call_fragment(0, "", call_id="call_a", name="get_weather"),
                call_fragment(1, "", call_id="call_b", name="get_time"),
                call_fragment(0, '{"city"'),
                call_fragment(1, '{"tz": '),
                call_fragment(0, ': "Par'),
                call_fragment(1, '"UTC"'),
                call_fragment(0, 'is"}'),
                call_fragment(1, "}"),
                chunk({}, finish_reason="tool_calls"),
                usage_chunk(40, 20),
            ]
        )
    )
    items = list(make_model().stream_turn(HISTORY_WITH_TOOL_ROUND, [WEATHER_TOOL, TIME_TOOL]))

    assert items == [
        ToolCall(id="call_a", name="get_weather", arguments={"city": "Paris"}),
        ToolCall(id="call_b", name="get_time", arguments={"tz": "UTC"}),
        TurnUsage(input_tokens=40, output_tokens=20),
    ]
    body = provider.requests[0]["body"]
    assert body["stream"] is True
    assert body["tools"] == EXPECTED_OPENAI_TOOLS
    assert body["messages"] == EXPECTED_OPENAI_MESSAGES


def test_tool_call_without_id_gets_a_generated_one(provider, make_model):
    provider.replies.append(
        Reply(events=[call_fragment(0, '{"city": "Rome"}', name="get_weather")])
    )
    (call,) = list(make_model().stream_turn(USER_ONLY, [WEATHER_TOOL]))

    assert isinstance(call, ToolCall)
    assert re.fullmatch(r"call_[0-9a-f]{12}", call.id)
    assert call.arguments == {"city": "Rome"}


def test_http_500_becomes_model_error(provider, make_model):
    provider.replies.append(
        Reply(status=500, json_body={"error": {"message": "upstream exploded", "type": "server"}})
    )
    with pytest.raises(ModelError, match=r"answered 500: upstream exploded"):
        list(make_model().stream_turn(USER_ONLY, []))
    assert len(provider.requests) == 1  # max_retries=0: no hidden retry


def test_timeout_becomes_model_error(provider, make_model):
    provider.replies.append(Reply(delay=2.0, events=[chunk({"content": "too late"})]))
    model = make_model(timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ModelError, match=r"timed out after 0\.5s"):
        list(model.stream_turn(USER_ONLY, []))
    assert time.monotonic() - started < 1.5


def test_malformed_chunk_becomes_model_error(provider, make_model):
    provider.replies.append(Reply(events=[chunk({"content": "ok "}), "this is {not json"]))
    with pytest.raises(ModelError, match="Malformed answer from the model provider"):
        list(make_model().stream_turn(USER_ONLY, []))


def test_error_object_mid_stream_becomes_model_error(provider, make_model):
    provider.replies.append(Reply(events=[{"error": {"message": "overloaded, try later"}}]))
    with pytest.raises(ModelError, match="overloaded, try later"):
        list(make_model().stream_turn(USER_ONLY, []))


@pytest.mark.parametrize("arguments", ['{"city": "Par', '["Paris"]'])
def test_invalid_tool_arguments_become_model_error(provider, make_model, arguments):
    provider.replies.append(
        Reply(events=[call_fragment(0, arguments, call_id="call_x", name="get_weather")])
    )
    with pytest.raises(ModelError, match="invalid JSON arguments for tool get_weather"):
        list(make_model().stream_turn(USER_ONLY, [WEATHER_TOOL]))


def test_connection_refused_becomes_model_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The socket is closed and never listened on, so connecting is refused.
    base_url = f"http://127.0.0.1:{port}/v1"
    model = OpenAIChatModel(model="test-model", base_url=base_url, timeout=2.0)
    try:
        with pytest.raises(
            ModelError, match=re.escape(f"Could not reach the model provider at {base_url}")
        ):
            list(model.stream_turn(USER_ONLY, []))
    finally:
        model.close()


def test_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model = OpenAIChatModel()
    assert (model.id, model.provider, model.base_url) == (
        "env-model",
        "OpenAI",
        "http://127.0.0.1:9/v1",
    )
    assert "not-needed" not in repr(model)

    monkeypatch.delenv("OPENAI_MODEL")
    assert OpenAIChatModel().id == "gpt-4o-mini"
