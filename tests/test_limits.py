"""The limits on what a client may send, on both stores, through the Flask test client.

Each limit (body size, `tools` length, count and nesting, `resolution_data` nesting, id and
message lengths, event ids, numbers JSON cannot carry) answers one clear 4xx in the contract's
error shape one step past it; exactly at it the request goes through. A refused request leaves
its run (and approval) byte-identical: the GET before and the GET after are the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.runtime.agent import Agent
from app.runtime.demo import demo_agents
from app.runtime.models.scripted import PlannedCall, ScriptedModel
from app.runtime.tools import tool
from app.schemas import (
    MAX_EVENT_ID,
    MAX_ID_LENGTH,
    MAX_JSON_DEPTH,
    MAX_MESSAGE_LENGTH,
    MAX_TOOLS_LENGTH,
)
from app.views.runs import TOOL_LIST_LIMIT

MAX_BODY = 1024 * 1024
TOO_LARGE = {"detail": "Request body too large", "error_code": "PAYLOAD_TOO_LARGE"}
INVALID_TOOLS = "Invalid structure or content for tools: "
TOO_DEEP = f"Nesting deeper than {MAX_JSON_DEPTH} levels."
CONFIRM = {"tool_call_id": "call_1_1", "confirmed": True}


# -- helpers ----------------------------------------------------------------------------------


@tool(requires_user_input=True, user_input_fields=["kg"])
def weigh(item: str, kg: float) -> str:
    """Record a weight a person reads off the scale."""
    return f"{item} weighs {kg}"


def _weigh_then_done(messages: list[dict[str, Any]]) -> str | list[PlannedCall]:
    if any(m["role"] == "tool" for m in messages):
        return "Weighed"
    return [PlannedCall("weigh", {"item": "box"})]


@pytest.fixture
def app_config() -> dict:
    """The demo agents, and one that asks a person for a float."""
    return {"AGENTS": [*demo_agents(), Agent(id="scale-agent", tools=[weigh],
                                             model=ScriptedModel(_weigh_then_done))]}


def invalid(errors: dict[str, list[str]]) -> dict[str, Any]:
    return {"detail": "Validation error", "error_code": "VALIDATION_ERROR", "errors": errors}


def bad_tools(what: str) -> dict[str, Any]:
    return {"detail": INVALID_TOOLS + what, "error_code": "BAD_REQUEST"}


def nested(depth: int) -> Any:
    """A value whose lists nest exactly `depth` levels deep (`[]` is 1)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def create(client, agent_id: str = "confirm-agent", **fields):
    return client.post(f"/agents/{agent_id}/runs", data={"message": "Paris", "stream": "false",
                                                         **fields})


@pytest.fixture
def paused(client) -> dict:
    answer = create(client)
    assert answer.status_code == 200 and answer.json["status"] == "PAUSED", answer.json
    return answer.json


@pytest.fixture
def awaiting_admin(client) -> dict:
    """A run paused on `deploy_app`, with its pending approval."""
    answer = create(client, "approval-agent")
    assert answer.status_code == 200 and answer.json["status"] == "PAUSED", answer.json
    return answer.json


def run_url(run: dict) -> str:
    return f"/agents/{run['agent_id']}/runs/{run['run_id']}"


def approval_url(run: dict) -> str:
    return f"/approvals/{run['tools'][0]['approval_id']}"


def snapshot(client, *urls: str) -> list[bytes]:
    """The exact bytes of a GET of each url (all 200)."""
    answers = [client.get(url) for url in urls]
    assert [a.status_code for a in answers] == [200] * len(urls)
    return [a.get_data() for a in answers]


def continue_run(client, run: dict, tools: Any = None, **fields):
    form = {"stream": "false", **fields}
    if tools is not None:
        form["tools"] = tools if isinstance(tools, str) else json.dumps(tools)
    return client.post(f"{run_url(run)}/continue", data=form)


def assert_refused(client, urls: list[str], send, status: int, body: dict) -> None:
    """`send()` answers `status` with exactly `body`, and every url reads the same after."""
    before = snapshot(client, *urls)
    answer = send()
    assert answer.status_code == status, answer.get_data(as_text=True)[:500]
    assert answer.json == body
    assert snapshot(client, *urls) == before


def padded_form(size: int, **fields: str) -> bytes:
    """A urlencoded form of exactly `size` bytes: `fields`, then `tools` padded with spaces."""
    head = "&".join(f"{name}={value}" for name, value in fields.items()) + "&tools="
    return (head + "+" * (size - len(head))).encode()


def multipart(**fields: str) -> tuple[bytes, str]:
    """A multipart/form-data body, encoded here (the test client would spool it to a file)."""
    boundary = "limits-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             for name, value in fields.items()]
    body = "".join(parts) + f"--{boundary}--\r\n"
    return body.encode(), f"multipart/form-data; boundary={boundary}"


# -- 1 MiB body -------------------------------------------------------------------------------


def test_continue_body_over_one_mib_is_413(client, paused):
    body = padded_form(MAX_BODY + 1, stream="false")
    assert_refused(client, [run_url(paused)], lambda: client.post(
        f"{run_url(paused)}/continue", data=body,
        content_type="application/x-www-form-urlencoded"), 413, TOO_LARGE)


def test_continue_multipart_body_over_one_mib_is_413(client, paused):
    body, content_type = multipart(tools="[" * MAX_BODY, stream="false")
    assert_refused(client, [run_url(paused)], lambda: client.post(
        f"{run_url(paused)}/continue", data=body, content_type=content_type), 413, TOO_LARGE)


def test_body_of_exactly_one_mib_is_read(client, paused):
    """At the limit the body is parsed: its 1 MiB `tools` field is refused by its own limit."""
    body = padded_form(MAX_BODY, stream="false")
    assert_refused(client, [run_url(paused)], lambda: client.post(
        f"{run_url(paused)}/continue", data=body,
        content_type="application/x-www-form-urlencoded"), 422,
        invalid({"tools": [f"Longer than maximum length {MAX_TOOLS_LENGTH}."]}))


def test_create_body_over_one_mib_is_413_and_creates_nothing(client):
    answer = client.post("/agents/chat-agent/runs",
                         data={"message": "m" * MAX_BODY, "stream": "false"})
    assert (answer.status_code, answer.json) == (413, TOO_LARGE)
    assert client.get("/agents/chat-agent/runs").json == []


def test_resolve_body_over_one_mib_is_413(client, awaiting_admin):
    body = json.dumps({"status": "approved", "resolution_data": {"note": "n" * MAX_BODY}})
    assert_refused(client, [run_url(awaiting_admin), approval_url(awaiting_admin)],
                   lambda: client.post(f"{approval_url(awaiting_admin)}/resolve", data=body,
                                       content_type="application/json"), 413, TOO_LARGE)


# -- the tools field --------------------------------------------------------------------------


def test_tools_longer_than_512_kib_is_422(client, paused):
    tools = json.dumps([{**CONFIRM, "confirmation_note": "n" * MAX_TOOLS_LENGTH}])
    assert_refused(client, [run_url(paused)], lambda: continue_run(client, paused, tools), 422,
                   invalid({"tools": [f"Longer than maximum length {MAX_TOOLS_LENGTH}."]}))


def test_tools_of_exactly_512_kib_are_accepted(client, paused):
    tools = json.dumps([{**CONFIRM, "confirmation_note": ""}])
    tools = tools.replace('""', '"' + "n" * (MAX_TOOLS_LENGTH - len(tools)) + '"')
    assert len(tools) == MAX_TOOLS_LENGTH
    answer = continue_run(client, paused, tools)
    assert answer.status_code == 200, answer.json
    assert answer.json["status"] == "COMPLETED"


def test_more_than_256_tool_objects_is_400(client, paused):
    assert_refused(client, [run_url(paused)],
                   lambda: continue_run(client, paused, [CONFIRM] * (TOOL_LIST_LIMIT + 1)),
                   400, bad_tools(f"at most {TOOL_LIST_LIMIT} tool objects are accepted"))


def test_256_tool_objects_are_accepted(client, paused):
    answer = continue_run(client, paused, [CONFIRM] * TOOL_LIST_LIMIT)
    assert answer.status_code == 200, answer.json
    assert answer.json["content"] == "Done: sent to a@example.com"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_tools_nested_too_deep_is_400(client, paused, depth):
    """33 levels, and far more than the JSON parser can recurse into: the same 400."""
    tools = "[" * depth + "]" * depth
    assert_refused(client, [run_url(paused)], lambda: continue_run(client, paused, tools), 400,
                   bad_tools(f"nesting deeper than {MAX_JSON_DEPTH} levels"))


def test_tools_nested_to_the_limit_are_accepted(client, paused):
    # the list, the tool object and tool_args are 3 levels; the lists inside are the rest
    tools = [{**CONFIRM, "tool_args": {"deep": nested(MAX_JSON_DEPTH - 3)}}]
    answer = continue_run(client, paused, tools)
    assert answer.status_code == 200, answer.json
    assert answer.json["status"] == "COMPLETED"


# -- resolution_data --------------------------------------------------------------------------


def resolve(client, run: dict, body: Any):
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(f"{approval_url(run)}/resolve", data=data,
                       content_type="application/json")


def test_resolution_data_nested_too_deep_is_422(client, awaiting_admin):
    body = {"status": "approved", "resolution_data": {"values": nested(MAX_JSON_DEPTH)}}
    assert_refused(client, [run_url(awaiting_admin), approval_url(awaiting_admin)],
                   lambda: resolve(client, awaiting_admin, body), 422,
                   invalid({"resolution_data": [TOO_DEEP]}))


@pytest.mark.parametrize("where", ["resolution_data", "body"])
def test_body_nested_beyond_the_parser_is_422(client, awaiting_admin, where):
    """Deeper than Python's JSON parser can recurse: still a 422, never a 500."""
    deep = "[" * 100_000 + "]" * 100_000
    body = f'{{"status": "approved", "resolution_data": {deep}}}' if where != "body" else deep
    assert_refused(client, [run_url(awaiting_admin), approval_url(awaiting_admin)],
                   lambda: resolve(client, awaiting_admin, body), 422,
                   invalid({"_schema": [TOO_DEEP]}))


def test_resolution_data_nested_to_the_limit_is_accepted(client, awaiting_admin):
    data = {"values": nested(MAX_JSON_DEPTH - 1)}
    answer = resolve(client, awaiting_admin, {"status": "approved", "resolution_data": data})
    assert answer.status_code == 200, answer.json
    assert answer.json["resolution_data"] == data


# -- ids and message --------------------------------------------------------------------------

TOO_LONG_ID = [f"Length must be between 1 and {MAX_ID_LENGTH}."]


@pytest.mark.parametrize("field", ["session_id", "user_id"])
def test_create_with_an_id_over_255_is_422(client, field):
    answer = create(client, "chat-agent", **{field: "i" * (MAX_ID_LENGTH + 1)})
    assert (answer.status_code, answer.json) == (422, invalid({field: TOO_LONG_ID}))
    assert client.get("/agents/chat-agent/runs").json == []


@pytest.mark.parametrize("field", ["session_id", "user_id"])
def test_create_with_an_id_of_255_is_accepted(client, field):
    answer = create(client, "chat-agent", **{field: "i" * MAX_ID_LENGTH})
    assert answer.status_code == 200, answer.json
    assert answer.json[field] == "i" * MAX_ID_LENGTH


@pytest.mark.parametrize("field", ["session_id", "user_id"])
def test_continue_with_an_id_over_255_is_422(client, paused, field):
    assert_refused(client, [run_url(paused)], lambda: continue_run(
        client, paused, [CONFIRM], **{field: "i" * (MAX_ID_LENGTH + 1)}), 422,
        invalid({field: TOO_LONG_ID}))


def test_continue_with_an_idempotency_key_over_255_is_422(client, paused):
    key = {"Idempotency-Key": "k" * (MAX_ID_LENGTH + 1)}
    assert_refused(client, [run_url(paused)], lambda: client.post(
        f"{run_url(paused)}/continue", headers=key,
        data={"tools": json.dumps([CONFIRM]), "stream": "false"}), 422,
        invalid({"Idempotency-Key": [f"Must be 1 to {MAX_ID_LENGTH} printable characters."]}))


@pytest.mark.parametrize("url, field", [
    ("/agents/chat-agent/runs?session_id={}", "session_id"),
    ("/agents/chat-agent/runs?user_id={}", "user_id"),
    ("/approvals?run_id={}", "run_id"),
    ("/approvals?agent_id={}", "agent_id"),
    ("/approvals/count?user_id={}", "user_id"),
])
def test_query_with_an_id_over_255_is_422(client, url, field):
    answer = client.get(url.format("i" * (MAX_ID_LENGTH + 1)))
    assert (answer.status_code, answer.json) == (422, invalid({field: TOO_LONG_ID}))


def test_get_run_with_a_session_id_over_255_is_422(client, paused):
    answer = client.get(f"{run_url(paused)}?session_id={'i' * (MAX_ID_LENGTH + 1)}")
    assert (answer.status_code, answer.json) == (422, invalid({"session_id": TOO_LONG_ID}))


@pytest.mark.parametrize("suffix", ["", "/continue", "/cancel", "/events"])
def test_a_run_id_of_any_length_in_the_path_is_404(client, suffix):
    url = f"/agents/confirm-agent/runs/{'r' * 10_000}{suffix}"
    answer = client.get(url) if suffix in ("", "/events") else client.post(url)
    assert (answer.status_code, answer.json) == (
        404, {"detail": "Run not found", "error_code": "NOT_FOUND"})


def test_message_over_100000_characters_is_422(client):
    answer = create(client, "chat-agent", message="m" * (MAX_MESSAGE_LENGTH + 1))
    assert (answer.status_code, answer.json) == (422, invalid(
        {"message": [f"Length must be between 1 and {MAX_MESSAGE_LENGTH}."]}))
    assert client.get("/agents/chat-agent/runs").json == []


def test_message_of_100000_characters_is_accepted(client):
    answer = create(client, "chat-agent", message="m" * MAX_MESSAGE_LENGTH)
    assert answer.status_code == 200, answer.json
    assert answer.json["input"]["input_content"] == "m" * MAX_MESSAGE_LENGTH


# -- event ids --------------------------------------------------------------------------------


def test_last_event_id_beyond_the_largest_event_id_is_422(client, paused):
    beyond = str(MAX_EVENT_ID + 1)
    header = client.get(f"{run_url(paused)}/events", headers={"Last-Event-ID": beyond})
    assert (header.status_code, header.json) == (422, invalid({"Last-Event-ID": [
        f"Must be greater than or equal to 0 and less than or equal to {MAX_EVENT_ID}."]}))
    query = client.get(f"{run_url(paused)}/events?last_event_id={beyond}")
    assert (query.status_code, query.json) == (422, invalid({"last_event_id": [
        f"Must be greater than or equal to 0 and less than or equal to {MAX_EVENT_ID}."]}))


def test_last_event_id_at_the_largest_event_id_is_an_empty_stream(client, paused):
    answer = client.get(f"{run_url(paused)}/events", headers={"Last-Event-ID": str(MAX_EVENT_ID)})
    assert answer.status_code == 200
    assert answer.get_data() == b""


# -- numbers JSON cannot carry ----------------------------------------------------------------

NOT_JSON_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999"]


@pytest.mark.parametrize("number", NOT_JSON_NUMBERS)
def test_tools_with_a_number_json_cannot_carry_are_400(client, paused, number):
    """Python's json reads NaN, Infinity and 1e999 (inf); stored, they could not be answered."""
    tools = f'[{{"tool_call_id": "call_1_1", "confirmed": true, "tool_args": {{"x": {number}}}}}]'
    assert_refused(client, [run_url(paused)], lambda: continue_run(client, paused, tools), 400,
                   {"detail": "Invalid JSON in tools field", "error_code": "BAD_REQUEST"})


@pytest.mark.parametrize("number", NOT_JSON_NUMBERS)
def test_resolution_data_with_a_number_json_cannot_carry_is_422(client, awaiting_admin, number):
    body = f'{{"status": "approved", "resolution_data": {{"x": {number}}}}}'
    assert_refused(client, [run_url(awaiting_admin), approval_url(awaiting_admin)],
                   lambda: resolve(client, awaiting_admin, body), 422,
                   invalid({"_schema": ["The body must be a JSON object."]}))


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1e999"])
def test_a_float_input_that_is_not_a_finite_number_is_400(client, value):
    run = create(client, "scale-agent").json
    tools = [{"tool_call_id": "call_1_1", "user_input_schema": [{"name": "kg", "value": value}]}]
    assert_refused(client, [run_url(run)], lambda: continue_run(client, run, tools), 400,
                   bad_tools("value of kg in tool call call_1_1 must be of type float"))


def test_a_float_input_is_accepted(client):
    run = create(client, "scale-agent").json
    tools = [{"tool_call_id": "call_1_1", "user_input_schema": [{"name": "kg", "value": "2.5"}]}]
    answer = continue_run(client, run, tools)
    assert answer.status_code == 200, answer.json
    assert answer.json["tools"][0]["tool_args"] == {"item": "box", "kg": 2.5}


# -- addresses --------------------------------------------------------------------------------


def test_count_is_not_an_approval_id(client):
    """`/approvals/count` is only what it serves: other methods are a 405, never a lookup."""
    answer = client.delete("/approvals/count")
    assert (answer.status_code, answer.json) == (
        405, {"detail": "Method Not Allowed", "error_code": "METHOD_NOT_ALLOWED"})
    assert set(answer.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
    options = client.options("/approvals/count")
    assert set(options.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
