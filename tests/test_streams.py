"""Event streams (contract 8 and 5.5): framing, headers, the order of events, resuming.

Every stream is read to its end through the Flask test client, on both stores; a stream that
did not close after its terminal event would hang the test rather than pass it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from app.runtime.agent import Agent
from app.runtime.demo import demo_agents, send_email
from app.runtime.models import ModelError
from app.runtime.models.scripted import PlannedCall, ScriptedModel

COMMON_KEYS = ("created_at", "event", "agent_id", "agent_name", "run_id", "session_id")
TERMINAL = {"RunPaused", "RunCompleted", "RunError", "RunCancelled"}
MIMETYPE = "text/event-stream; charset=utf-8"
PING = ": ping\n\n"  # a heartbeat; only after STREAM_PING_SECONDS of silence
SLOW_MS = 300
EXECUTED = ["ToolCallStarted", "ToolCallCompleted"]
ANSWER_TURN = ["ModelRequestStarted", "RunContent", "ModelRequestCompleted",
               "RunContentCompleted"]
CALLING_TURN = ["ModelRequestStarted", "ModelRequestCompleted", "RunContentCompleted"]


def _email_then(final):
    """A script: first turn calls send_email; the next one calls `final(messages)`."""

    def script(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
        if any(m["role"] == "tool" for m in messages):
            return final(messages)
        return [PlannedCall("send_email", {"to": "a@example.com", "subject": "hi"})]

    return script


def _provider_down(messages: list[dict[str, Any]]) -> str:
    raise ModelError("model provider is down")


def stream_agents() -> list[Agent]:
    return [
        *demo_agents(),
        Agent(id="slow-agent", tools=[send_email], model=ScriptedModel(
            _email_then(lambda m: "Done"), latency_ms=SLOW_MS)),
        Agent(id="flaky-agent", tools=[send_email], model=ScriptedModel(
            _email_then(_provider_down))),
        Agent(id="broken-agent", model=ScriptedModel(_provider_down)),
    ]


@pytest.fixture
def app_config() -> dict:
    return {"AGENTS": stream_agents()}


@dataclass(frozen=True)
class Frame:
    id: int
    event: str
    data: dict[str, Any]
    raw: str


@dataclass(frozen=True)
class Stream:
    frames: list[Frame]
    text: str
    location: str

    @property
    def names(self) -> list[str]:
        """Event names, a run of RunContent deltas counted once."""
        names: list[str] = []
        for frame in self.frames:
            if not (frame.event == "RunContent" and names and names[-1] == "RunContent"):
                names.append(frame.event)
        return names

    @property
    def terminal(self) -> dict[str, Any]:
        return self.frames[-1].data

    @property
    def content(self) -> str:
        return "".join(f.data["content"] for f in self.frames if f.event == "RunContent")

    def resumed_after(self, last_id: int) -> str:
        """What a resume after `last_id` of a stopped run replays: every later event."""
        return "".join(frame.raw for frame in self.frames if frame.id > last_id)


def parse(text: str) -> list[Frame]:
    """The frames of an SSE body, checking the framing of each (pings are skipped)."""
    frames = []
    for block in text.replace(PING, "").split("\n\n")[:-1]:
        fields = [line.split(": ", 1) for line in block.split("\n")]
        assert [name for name, _ in fields] == ["id", "event", "data"], block
        (_, seq), (_, name), (_, data) = fields
        payload = json.loads(data)
        assert data == json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        assert payload["event"] == name
        frames.append(Frame(int(seq), name, payload, block + "\n\n"))
    assert "".join(f.raw for f in frames) == text.replace(PING, "")
    return frames


def check_stream(response) -> Stream:
    """Read a whole stream: headers, framing, common keys, ids without gaps, one terminal."""
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == MIMETYPE
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    text = response.get_data(as_text=True)
    frames = parse(text)
    assert frames, "an empty stream"
    assert [f.id for f in frames] == list(range(frames[0].id, frames[0].id + len(frames)))
    first = frames[0].data
    for frame in frames:
        assert all(key in frame.data for key in COMMON_KEYS), frame.raw
        assert isinstance(frame.data["created_at"], int)
        for key in ("agent_id", "agent_name", "run_id", "session_id"):
            assert frame.data[key] == first[key]
    assert [f.event in TERMINAL for f in frames].count(True) == 1
    assert frames[-1].event in TERMINAL
    return Stream(frames, text, response.headers["Location"])


def create(client, agent_id: str, message: str = "Paris") -> Stream:
    return check_stream(client.post(f"/agents/{agent_id}/runs", data={"message": message}))


def resume(client, run_id: str, agent_id: str, last_event_id: int | None = None,
           *, as_query: bool = False) -> str:
    """The body of GET .../events after `last_event_id`, as header or as query."""
    url = f"/agents/{agent_id}/runs/{run_id}/events"
    headers, query = {}, {}
    if last_event_id is not None and as_query:
        query["last_event_id"] = last_event_id
    elif last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    response = client.get(url, headers=headers, query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == MIMETYPE
    return response.get_data(as_text=True)


def continue_stream(client, paused: Stream, decision: dict[str, Any] | None = None,
                    tools: list[dict] | None = None) -> Stream:
    run = paused.terminal
    if tools is None:
        tools = [dict(run["tools"][0], **(decision or {}))]
    url = f"/agents/{run['agent_id']}/runs/{run['run_id']}/continue"
    stream = check_stream(client.post(url, data={"tools": json.dumps(tools)}))
    assert stream.frames[0].id == paused.frames[-1].id + 1
    assert stream.location == (f"/agents/{run['agent_id']}/runs/{run['run_id']}/events"
                               f"?last_event_id={paused.frames[-1].id}")
    return stream


# -- create -----------------------------------------------------------------------------------


def test_a_created_run_streams_from_run_started_to_its_answer(client):
    stream = create(client, "chat-agent", message="hello there")
    assert stream.names == ["RunStarted", *ANSWER_TURN, "RunCompleted"]
    assert stream.frames[0].id == 1
    run = stream.frames[0].data
    assert stream.location == f"/agents/chat-agent/runs/{run['run_id']}/events?last_event_id=0"
    assert (run["model"], run["model_provider"]) == ("scripted-model", "Scripted")
    assert stream.content == "Echo: hello there"
    assert all(f.data["content_type"] == "str" for f in stream.frames if f.event == "RunContent")
    usage = next(f.data for f in stream.frames if f.event == "ModelRequestCompleted")
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    done = stream.terminal
    assert (done["content"], done["content_type"]) == ("Echo: hello there", "str")
    assert isinstance(done["metrics"], dict)


def test_the_events_of_one_commit_go_out_as_one_chunk_of_whole_frames(client):
    resp = client.post("/agents/chat-agent/runs", data={"message": "word " * 600},
                       buffered=False)
    chunks = [bytes(chunk) for chunk in resp.response]
    text = b"".join(chunks).decode()
    events = text.count("\nevent: ")
    assert events > 600 and text.rstrip().splitlines()[-2] == "event: RunCompleted"
    assert all(chunk.startswith(b"id: ") and chunk.endswith(b"\n\n") for chunk in chunks)
    assert len(chunks) <= events // 10, "a chunk per commit, not one per delta"


def test_a_created_run_that_pauses_ends_with_run_paused(client):
    stream = create(client, "confirm-agent")
    assert stream.names == ["RunStarted", *CALLING_TURN, "RunPaused"]
    paused = stream.terminal
    assert paused["content"] == "I have tools to execute, but I need confirmation."
    assert [t["tool_call_id"] for t in paused["tools"]] == ["call_1_1"]
    assert paused["tools"][0]["requires_confirmation"] is True
    # the terminal event follows the stored state: the run can be continued at once
    run = client.get(f"/agents/confirm-agent/runs/{paused['run_id']}").json
    assert run["status"] == "PAUSED"


def test_a_model_error_ends_a_created_run_with_run_error(client):
    stream = create(client, "broken-agent")
    assert stream.names == ["RunStarted", "ModelRequestStarted", "RunError"]
    assert stream.terminal["content"] == "model provider is down"
    assert stream.terminal["error_type"] == "ModelProviderError"


# -- continue ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("agent_id", "decision", "names", "answer"), [
    ("confirm-agent", {"confirmed": True}, [*EXECUTED, *ANSWER_TURN, "RunCompleted"],
     "Done: sent to a@example.com"),
    ("confirm-agent", {"confirmed": False, "confirmation_note": "no"},
     [*ANSWER_TURN, "RunCompleted"], "Not sent: no"),
    ("confirm-agent", {"confirmed": False},
     [*ANSWER_TURN, "RunCompleted"], "Not sent: Function call was rejected by the user"),
    ("external-agent", {"result": "sunny"}, [*ANSWER_TURN, "RunCompleted"], "Weather: sunny"),
    ("input-agent", {"user_input_schema": [{"name": "passenger", "value": "Alice"}]},
     [*EXECUTED, *ANSWER_TURN, "RunCompleted"], "Booked: Alice to Paris"),
    ("flaky-agent", {"confirmed": True}, [*EXECUTED, "ModelRequestStarted", "RunError"],
     "model provider is down"),
], ids=["confirm", "reject-with-note", "reject", "external-result", "user-input", "error"])
def test_the_events_of_a_continue(client, agent_id, decision, names, answer):
    paused = create(client, agent_id)
    stream = continue_stream(client, paused, decision)
    assert stream.names == ["RunContinued", *names]
    assert stream.terminal["content"] == answer
    for frame in stream.frames:
        if frame.event.startswith("ToolCall"):
            assert frame.data["tool"]["tool_call_id"] == "call_1_1"
    completed = [f.data for f in stream.frames if f.event == "ToolCallCompleted"]
    assert [c["content"] for c in completed] == [c["tool"]["result"] for c in completed]


def test_a_continue_that_pauses_again_lists_only_the_calls_waiting_now(client):
    paused = create(client, "multi-agent")
    assert [t["tool_name"] for t in paused.terminal["tools"]] == ["send_email", "get_weather"]
    email, weather = paused.terminal["tools"]
    stream = continue_stream(client, paused, tools=[dict(email, confirmed=True),
                                                    dict(weather, result="rain")])
    assert stream.names == ["RunContinued", *EXECUTED, *CALLING_TURN, "RunPaused"]
    assert stream.frames[1].data["tool"]["tool_name"] == "send_email"
    again = stream.terminal
    assert again["content"] == "I have tools to execute, but I need confirmation."
    assert [(t["tool_call_id"], t["tool_name"]) for t in again["tools"]] == [
        ("call_2_1", "deploy_app")]
    assert again["tools"][0]["approval_type"] == "required"


# -- 5.5 resuming -----------------------------------------------------------------------------


def test_resuming_returns_exactly_the_events_after_the_given_one(client):
    """Each resume gives the bytes the live streams gave after that id, across the pause."""
    created = create(client, "confirm-agent")
    continued = continue_stream(client, created, {"confirmed": True})
    run_id = created.terminal["run_id"]
    everything = Stream(created.frames + continued.frames, "", "")
    paused_id, last = created.frames[-1].id, continued.frames[-1].id
    assert resume(client, run_id, "confirm-agent") == created.text + continued.text
    assert [f.id for f in parse(resume(client, run_id, "confirm-agent"))] == list(
        range(1, last + 1))
    assert resume(client, run_id, "confirm-agent", paused_id) == continued.text
    for after in (0, 1, 3, paused_id - 1, paused_id, paused_id + 2, last - 1):
        expected = everything.resumed_after(after)
        assert resume(client, run_id, "confirm-agent", after) == expected, after
        assert resume(client, run_id, "confirm-agent", after, as_query=True) == expected
    assert resume(client, run_id, "confirm-agent", last) == ""
    assert client.get(created.location).get_data(as_text=True) == everything.resumed_after(0)
    assert client.get(continued.location).get_data(as_text=True) == continued.text


def test_resuming_a_run_that_executes_follows_it_live(client):
    response = client.post("/agents/slow-agent/runs", data={"message": "hi"})
    location = response.headers["Location"]
    response.close()
    run_id = location.split("?")[0].split("/")[-2]
    live = resume(client, run_id, "slow-agent", 1)
    frames = parse(live)
    assert [f.id for f in frames][0] == 2
    assert frames[-1].event == "RunPaused"
    assert live == resume(client, run_id, "slow-agent", 1, as_query=True)


def test_an_unknown_run_has_no_events(client):
    response = client.get("/agents/confirm-agent/runs/no-such-run/events")
    assert response.status_code == 404
    assert response.json == {"detail": "Run not found", "error_code": "NOT_FOUND"}


@pytest.mark.parametrize("last_event_id", ["abc", "-1"])
def test_a_last_event_id_that_is_not_a_count_is_a_422(client, last_event_id):
    run = create(client, "chat-agent").terminal
    response = client.get(f"/agents/chat-agent/runs/{run['run_id']}/events",
                          headers={"Last-Event-ID": last_event_id})
    assert response.status_code == 422
    assert response.json["error_code"] == "VALIDATION_ERROR"
