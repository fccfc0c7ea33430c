"""OpenAIChatModel against a real local HTTP server speaking the chat-completions stream format.

No mocks: the `openai` client really connects, sends JSON and parses server-sent events, so
these tests also catch mismatches with the wire format and with the client library.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.runtime.models.base import ContentDelta, ModelError, ToolCall, TurnUsage
from app.runtime.models.openai_compat import OpenAIChatModel
from tests.openai_server import (
    FakeProvider,
    Reply,
    call_fragment,
    chunk,
    serve_fake_provider,
    usage_chunk,
)


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with serve_fake_provider() as fake:
        yield fake


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
