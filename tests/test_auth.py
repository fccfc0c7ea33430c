"""Authentication, ownership and the approval guard (contract sections 6 and 7).

Three modes: open, keys (`OS_SECURITY_KEY` + `OS_ADMIN_KEY`) and JWT (RS256 with a key pair
made once for this module; HS256 where a test says so). Tests that take `mode` run in all
three unless they narrow it with a direct parametrization.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.test_approvals import (
    PENDING_DETAIL,
    approval_id_of,
    assert_error,
    bearer,
    continue_run,
    create_run,
    decided,
    get_approval,
    get_run,
    make_token,
    resolve,
    tool_log_reader,
)

MISSING = "Authorization header required"
INVALID = "Invalid authentication token"
SECURITY_KEY = "sk-security-0123456789"
ADMIN_KEY = "sk-admin-0123456789"
HS_SECRET = "auth-test-hs256-secret-long-enough-0123456789"
USER_SCOPES = ["agents:run", "agents:read", "approvals:read"]


def _private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


PRIVATE_KEY = _private_key()
PUBLIC_PEM = PRIVATE_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def rs_token(sub: str, scopes: list[str], **options) -> str:
    return make_token(PRIVATE_KEY, sub, scopes, algorithm="RS256", **options)


def hand_made(header: dict, payload: dict, sign: Callable[[bytes], bytes] | None) -> str:
    """A token assembled by hand, for the forgeries PyJWT refuses to produce."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b64(sign(signing_input.encode())) if sign else ""
    return f"{signing_input}.{signature}"


def _claims(sub: str = "alice") -> dict:
    return {"sub": sub, "scopes": USER_SCOPES, "exp": int(time.time()) + 3600}


def _hmac_with_public_key(data: bytes) -> bytes:
    return hmac.new(PUBLIC_PEM.encode(), data, hashlib.sha256).digest()


ALICE = bearer(rs_token("alice", USER_SCOPES))
BOB = bearer(rs_token("bob", USER_SCOPES))
BOSS = bearer(rs_token("boss", ["admin"]))
JWT_CONFIG = {"JWT_VERIFICATION_KEY": PUBLIC_PEM}
HS_CONFIG = {"JWT_VERIFICATION_KEY": HS_SECRET, "JWT_ALGORITHM": "HS256"}
KEYS_CONFIG = {"OS_SECURITY_KEY": SECURITY_KEY, "OS_ADMIN_KEY": ADMIN_KEY}


@dataclass(frozen=True)
class Mode:
    """An auth mode: its settings, a user's and an approver's headers, what `resolved_by` says."""

    name: str
    config: dict = field(default_factory=dict)
    user: dict = field(default_factory=dict)
    admin: dict = field(default_factory=dict)
    approver: str = "anonymous"


OPEN = Mode("open")
KEYS = Mode("keys", KEYS_CONFIG, bearer(SECURITY_KEY), bearer(ADMIN_KEY), "admin-key")
JWT = Mode("jwt", JWT_CONFIG, ALICE, BOSS, "boss")


def modes(*chosen: Mode):
    """Narrow a test to some modes (a direct parametrization overrides the `mode` fixture)."""
    return pytest.mark.parametrize("mode", chosen, ids=[m.name for m in chosen])


@pytest.fixture(params=[OPEN, KEYS, JWT], ids=lambda m: m.name)
def mode(request) -> Mode:
    return request.param


@pytest.fixture
def app_config(mode: Mode) -> dict:
    return mode.config


@pytest.fixture
def tool_log(tmp_path, monkeypatch) -> Callable[[], list[str]]:
    return tool_log_reader(tmp_path, monkeypatch)


def assert_forbidden(answer) -> None:
    """A 403 for a role or scope (the sentence is not part of the contract)."""
    assert answer.status_code == 403, answer.json
    assert answer.json["error_code"] == "FORBIDDEN"


@pytest.fixture
def paused(client, mode: Mode) -> dict:
    """An approval-agent run of the mode's user, paused with its approval pending."""
    run = create_run(client, headers=mode.user)
    assert run["status"] == "PAUSED"
    return run


# -- the approval guard in every mode -------------------------------------------------------


def test_client_cannot_confirm_a_pending_approval(client, mode, paused, tool_log):
    for headers in (mode.user, mode.admin):
        for tools in (decided(paused, True), None):
            answer = continue_run(client, paused, tools, headers=headers)
            assert answer.status_code == 403
            assert answer.json == {"detail": PENDING_DETAIL, "error_code": "APPROVAL_PENDING"}
    assert tool_log() == []
    assert get_run(client, paused, mode.user)["status"] == "PAUSED"
    assert get_approval(client, approval_id_of(paused), mode.admin)["status"] == "pending"


def test_resolution_records_the_caller_not_the_body(client, mode, paused, tool_log):
    approval_id = approval_id_of(paused)
    answer = resolve(client, approval_id, headers=mode.admin, resolved_by="mallory")
    assert answer.status_code == 200, answer.json
    assert answer.json["resolved_by"] == mode.approver
    assert_error(resolve(client, approval_id, "rejected", headers=mode.admin), 409,
                 "Approval is already 'approved' and cannot be resolved", "CONFLICT")
    assert get_approval(client, approval_id, mode.admin)["resolved_by"] == mode.approver

    done = continue_run(client, paused, headers=mode.user)
    assert done.status_code == 200, done.json
    assert done.json["content"] == "Deployed: deployed web"
    assert len(tool_log()) == 1


def test_pending_approval_cannot_be_deleted(client, mode, paused):
    approval_id = approval_id_of(paused)
    assert_error(client.delete(f"/approvals/{approval_id}", headers=mode.admin), 409,
                 "Approval is pending and cannot be deleted", "CONFLICT")
    assert_error(continue_run(client, paused, decided(paused, True), headers=mode.user), 403,
                 PENDING_DETAIL, "APPROVAL_PENDING")


def test_deleting_a_rejection_never_lets_the_client_run_the_tool(client, mode, paused,
                                                                 tool_log):
    approval_id = approval_id_of(paused)
    assert resolve(client, approval_id, "rejected", headers=mode.admin).status_code == 200
    assert client.delete(f"/approvals/{approval_id}", headers=mode.admin).status_code == 204
    answer = continue_run(client, paused, decided(paused, True), headers=mode.user)
    assert answer.status_code == 200
    assert answer.json["content"] == "Not deployed: Rejected by an admin"
    assert tool_log() == []


@modes(KEYS, JWT)
def test_a_user_credential_cannot_resolve_or_delete(client, mode, paused):
    approval_id = approval_id_of(paused)
    assert_forbidden(resolve(client, approval_id, headers=mode.user))
    assert get_approval(client, approval_id, mode.admin)["status"] == "pending"
    assert resolve(client, approval_id, "rejected", headers=mode.admin).status_code == 200
    assert_forbidden(client.delete(f"/approvals/{approval_id}", headers=mode.user))
    assert get_approval(client, approval_id, mode.admin)["status"] == "rejected"


# -- ownership (JWT) ------------------------------------------------------------------------


def _run_path(run: dict, suffix: str = "") -> str:
    return f"/agents/{run['agent_id']}/runs/{run['run_id']}{suffix}"


def _listed(client, headers: dict, query: str = "") -> list[str]:
    answer = client.get(f"/agents/approval-agent/runs{query}", headers=headers)
    assert answer.status_code == 200, answer.json
    return [run["run_id"] for run in answer.json]


@modes(JWT)
def test_a_stranger_cannot_see_or_touch_another_users_run(client, paused):
    not_found = ("Run not found", "NOT_FOUND")
    assert_error(client.get(_run_path(paused), headers=BOB), 404, *not_found)
    assert_error(client.get(_run_path(paused, "/events"), headers=BOB), 404, *not_found)
    assert_error(client.post(_run_path(paused, "/cancel"), headers=BOB), 404, *not_found)
    for tools in (None, decided(paused, True)):
        assert_error(continue_run(client, paused, tools, headers=BOB), 404, *not_found)
    assert _listed(client, BOB) == []
    assert _listed(client, BOB, "?user_id=alice") == []

    approval_id = approval_id_of(paused)
    assert_error(client.get(f"/approvals/{approval_id}", headers=BOB), 404,
                 "Approval not found", "NOT_FOUND")
    assert client.get("/approvals", headers=BOB).json["data"] == []
    assert client.get("/approvals/count", headers=BOB).json == {"count": 0}

    assert _listed(client, ALICE) == [paused["run_id"]]
    assert _listed(client, BOSS) == [paused["run_id"]]
    assert get_run(client, paused, BOSS)["status"] == "PAUSED"
    assert client.get("/approvals/count", headers=BOSS).json == {"count": 1}


@modes(JWT)
def test_admin_scope_sees_every_users_runs(client):
    mine = create_run(client, "chat-agent", "hi", headers=ALICE)
    theirs = create_run(client, "chat-agent", "hi", headers=BOB)
    answer = client.get("/agents/chat-agent/runs", headers=BOSS)
    assert {run["run_id"] for run in answer.json} == {mine["run_id"], theirs["run_id"]}
    answer = client.get("/agents/chat-agent/runs", headers=BOB)
    assert [run["run_id"] for run in answer.json] == [theirs["run_id"]]


@modes(JWT)
def test_the_token_subject_overrides_the_user_id_field(client):
    run = create_run(client, headers=ALICE, user_id="mallory")
    assert run["user_id"] == "alice"
    assert get_approval(client, approval_id_of(run), BOSS)["user_id"] == "alice"
    assert client.get("/approvals/count?user_id=mallory", headers=BOSS).json == {"count": 0}
    path = f"/agents/{run['agent_id']}/runs/{run['run_id']}"
    resolve(client, approval_id_of(run), "approved", headers=BOSS)
    done = client.post(f"{path}/continue", data={"stream": "false", "user_id": "mallory"},
                       headers=ALICE)
    assert done.status_code == 200, done.json
    assert done.json["status"] == "COMPLETED"


# -- credentials ----------------------------------------------------------------------------


BAD_RS256_TOKENS = {
    "expired": rs_token("alice", USER_SCOPES, expires_in=-60),
    "without-exp": rs_token("alice", USER_SCOPES, expires_in=None),
    "other-key": make_token(_private_key(), "alice", USER_SCOPES, algorithm="RS256"),
    "hs256-signed-with-public-key": hand_made({"alg": "HS256", "typ": "JWT"}, _claims(),
                                              _hmac_with_public_key),
    "alg-none": hand_made({"alg": "none", "typ": "JWT"}, _claims(), None),
    "hs256": make_token(HS_SECRET, "alice", USER_SCOPES),
    "tampered": ALICE["Authorization"].split()[1][:-4] + "AAAA",
    "garbage": "not-a-jwt",
    "three-garbage-parts": "abc.def.ghi",
    "scopes-not-a-list": rs_token("alice", "admin"),  # type: ignore[arg-type]
}


@modes(JWT)
@pytest.mark.parametrize("token", BAD_RS256_TOKENS.values(), ids=BAD_RS256_TOKENS.keys())
def test_rs256_mode_rejects_invalid_tokens(client, token):
    assert_error(client.get("/agents", headers=bearer(token)), 401, INVALID, "UNAUTHENTICATED")


HS = Mode("jwt-hs256", HS_CONFIG)
BAD_HS256_TOKENS = {
    "wrong-secret": make_token(HS_SECRET + "x", "alice", USER_SCOPES),
    "rs256": rs_token("alice", USER_SCOPES),
    "expired": make_token(HS_SECRET, "alice", USER_SCOPES, expires_in=-60),
    "without-exp": make_token(HS_SECRET, "alice", USER_SCOPES, expires_in=None),
}


@modes(HS)
@pytest.mark.parametrize("token", BAD_HS256_TOKENS.values(), ids=BAD_HS256_TOKENS.keys())
def test_hs256_mode_rejects_invalid_tokens(client, token):
    assert_error(client.get("/agents", headers=bearer(token)), 401, INVALID, "UNAUTHENTICATED")


@modes(HS)
def test_hs256_mode_accepts_a_valid_token(client):
    headers = bearer(make_token(HS_SECRET, "alice", USER_SCOPES))
    assert client.get("/agents", headers=headers).status_code == 200
    assert create_run(client, "chat-agent", "hi", headers=headers)["user_id"] == "alice"


MISSING_HEADERS = {
    "none": {},
    "basic": {"Authorization": "Basic " + base64.b64encode(b"user:pass").decode()},
    "bearer-without-token": {"Authorization": "Bearer"},
    "other-scheme": {"Authorization": f"Token {SECURITY_KEY}"},
    "bare-key": {"Authorization": SECURITY_KEY},
}


@modes(KEYS, JWT)
@pytest.mark.parametrize("headers", MISSING_HEADERS.values(), ids=MISSING_HEADERS.keys())
def test_missing_header_or_another_scheme_is_401(client, headers):
    assert_error(client.get("/agents", headers=headers), 401, MISSING, "UNAUTHENTICATED")


PROTECTED = [
    ("GET", "/agents"),
    ("GET", "/agents/chat-agent"),
    ("POST", "/agents/chat-agent/runs"),
    ("GET", "/agents/chat-agent/runs"),
    ("GET", "/agents/chat-agent/runs/r1"),
    ("POST", "/agents/chat-agent/runs/r1/continue"),
    ("POST", "/agents/chat-agent/runs/r1/cancel"),
    ("GET", "/agents/chat-agent/runs/r1/events"),
    ("GET", "/approvals"),
    ("GET", "/approvals/count"),
    ("GET", "/approvals/a1"),
    ("GET", "/approvals/a1/status"),
    ("POST", "/approvals/a1/resolve"),
    ("DELETE", "/approvals/a1"),
]


@modes(KEYS)
def test_every_protected_endpoint_checks_the_key_first(client):
    for method, path in PROTECTED:
        assert_error(client.open(path, method=method), 401, MISSING, "UNAUTHENTICATED")
        assert_error(client.open(path, method=method, headers=bearer("sk-wrong")), 401,
                     INVALID, "UNAUTHENTICATED")


@modes(KEYS)
def test_the_admin_key_works_wherever_the_security_key_works(client):
    for headers in (KEYS.user, KEYS.admin):
        assert client.get("/agents", headers=headers).status_code == 200
        assert client.get("/agents/approval-agent", headers=headers).status_code == 200
        run = create_run(client, headers=headers)
        assert get_run(client, run, headers)["status"] == "PAUSED"
        assert run["run_id"] in _listed(client, headers)
        events = client.get(_run_path(run, "/events"), headers=headers)
        assert events.status_code == 200
        assert b"event: RunPaused" in events.data
        approval_id = approval_id_of(run)
        for path in ("/approvals", "/approvals/count", f"/approvals/{approval_id}",
                     f"/approvals/{approval_id}/status"):
            assert client.get(path, headers=headers).status_code == 200, path
        assert resolve(client, approval_id, headers=KEYS.admin).status_code == 200
        assert continue_run(client, run, headers=headers).json["status"] == "COMPLETED"
        other = create_run(client, headers=headers)
        assert client.post(_run_path(other, "/cancel"), headers=headers).json == {}


@modes(KEYS, JWT)
@pytest.mark.parametrize("path", ["/", "/health", "/openapi.json", "/docs"])
def test_public_endpoints_need_no_credentials(client, path):
    assert client.get(path).status_code == 200


# -- scopes (JWT) ---------------------------------------------------------------------------


def _scoped(*scopes: str) -> dict:
    return bearer(rs_token("alice", list(scopes)))


@modes(JWT)
def test_agents_read_cannot_create_and_agents_run_can(client):
    reader = _scoped("agents:read")
    assert client.get("/agents", headers=reader).status_code == 200
    assert_forbidden(client.post("/agents/chat-agent/runs", headers=reader,
                                 data={"message": "hi", "stream": "false"}))
    assert _listed(client, reader) == []

    runner = _scoped("agents:run")
    assert create_run(client, "chat-agent", "hi", headers=runner)["status"] == "COMPLETED"
    assert_forbidden(client.get("/agents/chat-agent/runs", headers=runner))
    assert_forbidden(client.get("/agents", headers=_scoped()))


@modes(JWT)
def test_approvals_read_can_list_but_not_resolve(client, paused):
    reader = _scoped("approvals:read")
    approval_id = approval_id_of(paused)
    listing = client.get("/approvals", headers=reader)
    assert listing.status_code == 200
    assert [a["id"] for a in listing.json["data"]] == [approval_id]
    assert client.get(f"/approvals/{approval_id}/status", headers=reader).status_code == 200
    assert_forbidden(resolve(client, approval_id, headers=reader))
    assert_forbidden(client.delete(f"/approvals/{approval_id}", headers=reader))
    assert get_approval(client, approval_id, BOSS)["status"] == "pending"
    writer = _scoped("approvals:write")
    assert resolve(client, approval_id, headers=writer).json["resolved_by"] == "alice"
    assert_forbidden(client.get("/approvals", headers=_scoped("agents:read")))
