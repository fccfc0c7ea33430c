"""Who is calling: no auth (development), bearer keys, or JWT; and what they may do.

Keys are compared in constant time. In JWT mode the token's `sub` owns the runs it creates and
overrides any `user_id` the client sends; its `scopes` decide which endpoints it may call.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from flask import current_app, g, request

from app.errors import ApiError

MISSING_HEADER = "Authorization header required"
INVALID_TOKEN = "Invalid authentication token"
ADMIN_SCOPE = "admin"
# The reference's own name for the admin scope: a token minted for an Agno deployment works.
ADMIN_SCOPES = frozenset({ADMIN_SCOPE, "agent_os:admin"})


@dataclass(frozen=True)
class Identity:
    """The caller. `subject` is what `resolved_by` records; `owner` limits the runs it sees."""

    kind: str
    subject: str
    scopes: frozenset[str] = frozenset()
    user_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin-key" or (self.kind == "jwt" and
                                            not ADMIN_SCOPES.isdisjoint(self.scopes))

    @property
    def owner(self) -> str | None:
        """Non-admin JWT users see and act only on their own runs."""
        return self.user_id if self.kind == "jwt" and not self.is_admin else None

    def has_scope(self, scope: str) -> bool:
        return self.kind != "jwt" or self.is_admin or scope in self.scopes


ANONYMOUS = Identity(kind="anonymous", subject="anonymous")


def _equal(given: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(settings: dict[str, Any]) -> Identity:
    """The caller's identity for this request, or ApiError 401."""
    security, admin = settings["OS_SECURITY_KEY"], settings["OS_ADMIN_KEY"]
    jwt_key = settings["JWT_VERIFICATION_KEY"]
    token = _bearer()
    if token is None:
        if security or jwt_key:
            raise ApiError(401, MISSING_HEADER, "UNAUTHENTICATED")
        return ANONYMOUS
    if _equal(token, admin):
        return Identity(kind="admin-key", subject="admin-key")
    if _equal(token, security):
        return Identity(kind="security-key", subject="security-key")
    if jwt_key:
        return _jwt_identity(token, jwt_key, settings["JWT_ALGORITHM"])
    if security or admin:
        raise ApiError(401, INVALID_TOKEN, "UNAUTHENTICATED")
    return ANONYMOUS


def _jwt_identity(token: str, key: str, algorithm: str) -> Identity:
    try:
        claims = jwt.decode(token, key, algorithms=[algorithm],
                            options={"require": ["exp", "sub"]})
    except jwt.PyJWTError:
        raise ApiError(401, INVALID_TOKEN, "UNAUTHENTICATED") from None
    scopes = claims.get("scopes") or []
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ApiError(401, INVALID_TOKEN, "UNAUTHENTICATED")
    subject = str(claims["sub"])
    return Identity(kind="jwt", subject=subject, scopes=frozenset(scopes), user_id=subject)


def may_resolve_approvals(identity: Identity, settings: dict[str, Any]) -> bool:
    """With an admin key configured only admins resolve; else anyone with approvals:write."""
    if identity.is_admin:
        return True
    if settings["OS_ADMIN_KEY"]:
        return False
    return identity.has_scope("approvals:write")


def requires(scope: str | None = None, *, approver: bool = False) -> Callable:
    """Authenticate the request into `g.identity`, then check its scope (403 otherwise)."""

    def wrap(view: Callable) -> Callable:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            settings = current_app.config["AGENTOS"]
            identity = authenticate(settings)
            if scope and not identity.has_scope(scope):
                raise ApiError(403, f"Missing required scope: {scope}", "FORBIDDEN")
            if approver and not may_resolve_approvals(identity, settings):
                raise ApiError(403, "Only an admin may resolve or delete approvals",
                               "FORBIDDEN")
            g.identity = identity
            return view(*args, **kwargs)

        return guarded

    return wrap


def identity() -> Identity:
    return g.get("identity", ANONYMOUS)
