"""A scripted OpenAI-compatible chat-completions server on loopback, and wire-format helpers.

A real HTTP peer: the `openai` client really connects, sends JSON and parses the server-sent
events, so tests that use it also catch mismatches with the wire format and the client library.
`serve_fake_provider()` starts one for the duration of a `with` block.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


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


@contextmanager
def serve_fake_provider() -> Iterator[FakeProvider]:
    """A fresh server on a free loopback port; shut down (handlers joined) on exit."""
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


def text_reply(*pieces: str) -> Reply:
    """A streamed text answer, one content delta per piece, then usage."""
    return Reply(events=[
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": piece}) for piece in pieces),
        chunk({}, finish_reason="stop"),
        usage_chunk(10, len(pieces)),
    ])


def tool_call_reply(call_id: str, name: str, arguments: dict[str, Any]) -> Reply:
    """A streamed tool call: id and name first, then the JSON arguments in two fragments."""
    text = json.dumps(arguments)
    middle = len(text) // 2
    return Reply(events=[
        call_fragment(0, "", call_id=call_id, name=name),
        call_fragment(0, text[:middle]),
        call_fragment(0, text[middle:]),
        chunk({}, finish_reason="tool_calls"),
        usage_chunk(20, 8),
    ])
