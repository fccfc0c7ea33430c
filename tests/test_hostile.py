"""Hostile and malformed input (issue 10, items 7 to 15), on both stores.

Each test sends what an attacker or a broken client sends and checks the contract's answer,
and that the run it aimed at is byte-identical afterwards.
"""

from __future__ import annotations

import json
import re

import pytest

from statemachine.keys import Keys
from tests.test_approvals import bearer, make_token

HS_SECRET = "hostile-test-hs256-secret-long-enough-0123456789"
JWT_CONFIG = {"JWT_VERIFICATION_KEY": HS_SECRET, "JWT_ALGORITHM": "HS256"}
READ_ALL = ["agents:run", "agents:read", "approvals:read", "approvals:write"]


def create(client, agent: str = "confirm-agent", message: str = "hi", headers=None) -> dict:
    answer = client.post(f"/agents/{agent}/runs", data={"message": message, "stream": "false"},
                         headers=headers or {})
    assert answer.status_code == 200, answer.json
    return answer.json


def run_url(run: dict) -> str:
    return f"/agents/{run['agent_id']}/runs/{run['run_id']}"


def snapshot(client, run: dict, headers=None) -> dict:
    answer = client.get(run_url(run), headers=headers or {})
    assert answer.status_code == 200, answer.json
    return answer.json


def assert_bad_request(answer, detail: str) -> None:
    assert answer.status_code == 400, answer.get_data(as_text=True)
    assert answer.json == {"detail": detail, "error_code": "BAD_REQUEST"}


# -- 7: a JWT's sub --------------------------------------------------------------------------


@pytest.fixture
def app_config(request) -> dict:
    return getattr(request, "param", {})


def token(sub, scopes=READ_ALL, **claims) -> dict:
    return bearer(make_token(HS_SECRET, sub, scopes, **claims))


@pytest.mark.parametrize("app_config", [JWT_CONFIG], indirect=True)
@pytest.mark.parametrize("sub", ["", "   ", 7, ["alice"]], ids=["empty", "blank", "int", "list"])
def test_a_jwt_whose_sub_is_not_a_nonempty_string_is_invalid(client, sub):
    create(client, headers=token("alice"))
    for answer in (client.get("/agents/confirm-agent/runs", headers=token(sub)),
                   client.post("/agents/chat-agent/runs", headers=token(sub),
                               data={"message": "hi", "user_id": "alice"})):
        assert answer.status_code == 401, answer.json
        assert answer.json == {"detail": "Invalid authentication token",
                               "error_code": "UNAUTHENTICATED"}


# -- 8: lone surrogates ----------------------------------------------------------------------


def _continue(client, run: dict, tools: str, **extra):
    return client.post(f"{run_url(run)}/continue", data={"tools": tools, "stream": "false"},
                       **extra)


@pytest.mark.parametrize(("agent", "decision", "field"), [
    ("confirm-agent", '"confirmed": false, "confirmation_note": "\\udc00"', "confirmation_note"),
    ("external-agent", '"result": "rain \\ud800"', "result"),
    ("input-agent", '"user_input_schema": [{"name": "passenger", "value": "\\udfff"}]',
     "user_input_schema[0].value"),
    ("confirm-agent", '"confirmed": true, "tool_args": {"\\udc00": 1}', "tool_args"),
])
def test_a_lone_surrogate_in_tools_is_a_400_naming_the_field(client, agent, decision, field):
    run = create(client, agent)
    before = snapshot(client, run)
    tools = f'[{{"tool_call_id": "{run["tools"][0]["tool_call_id"]}", {decision}}}]'
    assert_bad_request(_continue(client, run, tools),
                       f"Invalid structure or content for tools: tools[0].{field} holds a "
                       "lone surrogate, which is not text")
    assert snapshot(client, run) == before


def test_a_lone_surrogate_in_resolution_data_is_a_400_naming_it(client):
    run = create(client, "approval-agent")
    approval_id = run["tools"][0]["approval_id"]
    body = '{"status": "rejected", "resolution_data": {"note": "\\udc00"}}'
    answer = client.post(f"/approvals/{approval_id}/resolve", data=body,
                         content_type="application/json")
    assert_bad_request(answer, "resolution_data.note holds a lone surrogate, which is not text")
    assert client.get(f"/approvals/{approval_id}").json["status"] == "pending"


# -- 9: ids the server could not have made ---------------------------------------------------


@pytest.mark.parametrize("bad_id", ["R%7D", "a%7Bb%7D", "x" * 256, "sp%20ace", "%C3%A9"])
def test_a_path_id_the_server_could_not_have_made_is_not_found(client, bad_id):
    for method, path in [("get", f"/agents/confirm-agent/runs/{bad_id}"),
                         ("get", f"/agents/confirm-agent/runs/{bad_id}/events"),
                         ("post", f"/agents/confirm-agent/runs/{bad_id}/cancel"),
                         ("post", f"/agents/confirm-agent/runs/{bad_id}/continue"),
                         ("get", f"/agents/{bad_id}"),
                         ("post", f"/agents/{bad_id}/runs"),
                         ("get", f"/approvals/{bad_id}"),
                         ("post", f"/approvals/{bad_id}/resolve"),
                         ("get", f"/sessions/{bad_id}"),
                         ("get", f"/sessions/{bad_id}/runs")]:
        answer = getattr(client, method)(path)
        assert answer.status_code == 404, (path, answer.get_data(as_text=True))
        assert answer.json["error_code"] == "NOT_FOUND"
        assert answer.json["detail"] in ("Run not found", "Agent not found",
                                         "Approval not found", "Session not found")


def test_an_idempotency_key_never_reaches_a_key_name(client, store, store_kind):
    run = create(client)
    tools = json.dumps([{"tool_call_id": run["tools"][0]["tool_call_id"], "confirmed": True}])
    answer = _continue(client, run, tools, headers={"Idempotency-Key": "a}"})
    assert answer.status_code == 200, answer.json
    for suffix in ("", "/events", "/cancel", "/continue"):
        method = client.post if suffix in ("/cancel", "/continue") else client.get
        assert method(f"{run_url(run)}%7D:idem:a{suffix}").status_code == 404
    again = _continue(client, run, tools, headers={"Idempotency-Key": "a}"})
    assert again.status_code == 200 and again.json["run_id"] == run["run_id"]
    if store_kind == "redis":
        idem = list(store.redis.scan_iter(match=f"{store.keys.prefix}:*:idem:*"))
        assert len(idem) == 1
        assert re.fullmatch(r"[0-9a-f]{64}", idem[0].rsplit(":idem:", 1)[1])


# -- 10: bodies and queries that are not UTF-8 -----------------------------------------------


def _multipart(fields: list[tuple[bytes, bytes]]) -> bytes:
    parts = [b'--b\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value +
             b"\r\n" for name, value in fields]
    return b"".join(parts) + b"--b--\r\n"


@pytest.mark.parametrize(("body", "content_type", "detail"), [
    (b"tools=%FF&stream=false", "application/x-www-form-urlencoded",
     "The form field tools is not valid UTF-8"),
    (b"stream=false&tools=\xff", "application/x-www-form-urlencoded",
     "The form field tools is not valid UTF-8"),
    (b"stream=false&t%ED%B0%80=1", "application/x-www-form-urlencoded",
     "The form field name 't\ufffd\ufffd\ufffd' is not valid UTF-8"),
    (_multipart([(b"tools", b"\xff"), (b"stream", b"false")]),
     "multipart/form-data; boundary=b", "The form field tools is not valid UTF-8"),
    (_multipart([(b"t\xffools", b"x")]), "multipart/form-data; boundary=b",
     "The header of a form part is not valid UTF-8"),
], ids=["percent", "raw", "name", "multipart", "multipart-name"])
def test_a_form_that_is_not_utf8_is_a_400_naming_the_problem(client, body, content_type,
                                                              detail):
    run = create(client)
    before = snapshot(client, run)
    answer = client.post(f"{run_url(run)}/continue", data=body, content_type=content_type)
    assert_bad_request(answer, detail)
    create_answer = client.post("/agents/chat-agent/runs", data=body, content_type=content_type)
    assert_bad_request(create_answer, detail)
    assert snapshot(client, run) == before


def test_a_query_that_is_not_utf8_is_a_400_naming_the_parameter(client):
    run = create(client)
    for query in ("session_id=%FF", "x=1&session_id=%C3"):
        assert_bad_request(client.get(f"{run_url(run)}?{query}"),
                           "The query parameter session_id is not valid UTF-8")
    assert client.get(f"{run_url(run)}?session_id={run['session_id']}").status_code == 200


def test_a_json_body_that_is_not_utf8_is_a_400(client):
    run = create(client, "approval-agent")
    approval_id = run["tools"][0]["approval_id"]
    answer = client.post(f"/approvals/{approval_id}/resolve",
                         data=b'{"status": "approved", "resolution_data": {"note": "\xff"}}',
                         content_type="application/json")
    assert_bad_request(answer, "The request body is not valid UTF-8")
    assert client.get(f"/approvals/{approval_id}").json["status"] == "pending"


# -- 11: empty path segments -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/agents/confirm-agent//runs/R/continue", "//agents",
                                  "/agents//runs", "/approvals//resolve", "/agents/x/runs//"])
def test_an_empty_path_segment_is_the_json_404(client, path):
    for method in (client.get, client.post):
        # PATH_INFO as a server passes it (the test client would read `//x` as a host)
        answer = method("/", environ_overrides={"PATH_INFO": path})
        assert answer.status_code == 404, answer.get_data(as_text=True)
        assert answer.content_type == "application/json"
        assert answer.json == {"detail": "Not Found", "error_code": "NOT_FOUND"}
        assert "Location" not in answer.headers


# -- 12: an admin key alone ------------------------------------------------------------------


@pytest.mark.parametrize("app_config", [{"OS_ADMIN_KEY": "only-admin-key-0123"}],
                         indirect=True)
def test_an_admin_key_alone_closes_the_api(client):
    for method, path in [("get", "/agents"), ("get", "/agents/confirm-agent/runs"),
                         ("post", "/agents/chat-agent/runs"), ("get", "/approvals"),
                         ("get", "/approvals/count")]:
        answer = getattr(client, method)(path, data={"message": "hi"} if method == "post"
                                         else None)
        assert answer.status_code == 401, (path, answer.json)
        assert answer.json["detail"] == "Authorization header required"
        wrong = getattr(client, method)(path, headers=bearer("guess"))
        assert wrong.status_code == 401 and wrong.json["detail"] == "Invalid authentication token"
    admin = bearer("only-admin-key-0123")
    assert create(client, "chat-agent", headers=admin)["status"] == "COMPLETED"
    assert client.get("/health").status_code == 200


# -- 14: an admin note that is not a string ---------------------------------------------------


@pytest.mark.parametrize(("note", "rendered"), [({"x": 1}, '{"x":1}'), (True, "true"),
                                                ([1, "a"], '[1,"a"]'), (2.5, "2.5")])
def test_a_non_string_admin_note_is_rendered_as_json(client, note, rendered):
    run = create(client, "approval-agent")
    approval_id = run["tools"][0]["approval_id"]
    assert client.post(f"/approvals/{approval_id}/resolve", json={
        "status": "rejected", "resolution_data": {"note": note}}).status_code == 200
    done = client.post(f"{run_url(run)}/continue", data={"stream": "false"}).json
    assert done["tools"][0]["confirmation_note"] == rendered
    assert done["content"] == f"Not deployed: {rendered}"


# -- 15: line separators in event data --------------------------------------------------------


def test_unicode_line_breaks_are_escaped_in_event_data(client):
    text = "one\u2028two\u2029three\u0085four"
    answer = client.post("/agents/chat-agent/runs", data={"message": text})
    body = answer.get_data()
    assert answer.status_code == 200
    for raw in ("\u2028", "\u2029", "\u0085"):
        assert raw.encode() not in body
    assert b"one\\u2028two\\u2029three\\u0085four" in body
    data_lines = [line for line in body.decode().split("\n") if line.startswith("data: ")]
    contents = [json.loads(line[6:]).get("content") for line in data_lines]
    assert f"Echo: {text}" in contents
    replay = client.get(f"/agents/chat-agent/runs/{json.loads(data_lines[0][6:])['run_id']}"
                        "/events").get_data()
    assert "\u2028".encode() not in replay and b"\\u2028" in replay


def test_redis_key_names_hold_no_client_text():
    keys = Keys("p")
    assert "a}" not in keys.idempotency("r1", "a}")
    assert keys.idempotency("r1", "a") != keys.idempotency("r1", "b")
    assert keys.idempotency("r1", "\udc00").startswith("p:run:{r1}:idem:")


def test_a_form_part_whose_name_cannot_be_read_is_no_500(client):
    """A multipart part whose Content-Disposition name does not parse (found by the fuzzer)."""
    body = (b'--B\r\nContent-Disposition: form-data; name="\\"\r\n\r\nx\r\n'
            b'--B\r\nContent-Disposition: form-data; name="message"\r\n\r\nhi\r\n--B--\r\n')
    answer = client.post("/agents/chat-agent/runs?stream=false", data=body,
                         headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert answer.status_code < 500
