"""Settings: defaults, then the environment, then the caller's overrides (tests).

One table; the README's configuration section documents every row.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

DEFAULTS: dict[str, Any] = {
    "HOST": "127.0.0.1",
    "PORT": 7777,
    "REDIS_URL": None,
    "REDIS_KEY_PREFIX": "agentos",
    "REDIS_CLUSTER": False,
    "REDIS_WAIT_REPLICAS": 0,
    "AGENTOS_DB": "agentos.db",
    "STORE_TIMEOUT_SECONDS": 5.0,
    "OS_SECURITY_KEY": None,
    "OS_ADMIN_KEY": None,
    "JWT_VERIFICATION_KEY": None,
    "JWT_ALGORITHM": "RS256",
    "AGENTOS_AGENTS": "app.runtime.demo:demo_agents",
    "AGENTOS_ID": "agentos",
    "RUN_LEASE_SECONDS": 30.0,
    "PAUSE_TTL_SECONDS": None,
    "RUN_RETENTION_SECONDS": 7 * 24 * 3600,
    "SWEEP_INTERVAL_SECONDS": 2.0,
    "MAX_RUNS_PER_PROCESS": 1000,
    "STREAM_MAX_SECONDS": 3600.0,
    "STREAM_PING_SECONDS": 15.0,
    "IDEMPOTENCY_TTL_SECONDS": 24 * 3600,
    "MAX_CONTENT_LENGTH": 1024 * 1024,
    "REQUEST_TIMEOUT_SECONDS": 10.0,
    "REDIS_MAX_CONNECTIONS": 2048,
    "WEBHOOK_URL": None,
    "WEBHOOK_SECRET": None,
    "WEBHOOK_TIMEOUT_SECONDS": 5.0,
    "WEBHOOK_RETRY_SECONDS": 3600.0,
    "WEBHOOK_POLL_SECONDS": 0.5,
    "LOG_FORMAT": "text",
    "METRICS_REQUIRE_AUTH": False,
    "CORS_ORIGINS": None,
}

def flag(value: str) -> bool:
    """A yes/no setting: 1/true/yes/on or 0/false/no/off (any case)."""
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


_CASTS: dict[str, Any] = {
    "PORT": int,
    "REDIS_CLUSTER": flag,
    "REDIS_WAIT_REPLICAS": int,
    "STORE_TIMEOUT_SECONDS": float,
    "RUN_LEASE_SECONDS": float,
    "PAUSE_TTL_SECONDS": float,
    "RUN_RETENTION_SECONDS": int,
    "SWEEP_INTERVAL_SECONDS": float,
    "MAX_RUNS_PER_PROCESS": int,
    "STREAM_MAX_SECONDS": float,
    "STREAM_PING_SECONDS": float,
    "IDEMPOTENCY_TTL_SECONDS": int,
    "MAX_CONTENT_LENGTH": int,
    "REQUEST_TIMEOUT_SECONDS": float,
    "REDIS_MAX_CONNECTIONS": int,
    "WEBHOOK_TIMEOUT_SECONDS": float,
    "WEBHOOK_RETRY_SECONDS": float,
    "WEBHOOK_POLL_SECONDS": float,
    "METRICS_REQUIRE_AUTH": lambda v: v.strip().lower() in ("1", "true", "yes", "on"),
}


class ConfigError(ValueError):
    """A setting that cannot be used; the server refuses to start rather than guess."""


def _cast(name: str, value: Any) -> Any:
    if value in (None, ""):
        return DEFAULTS[name] if value is None else None
    cast = _CASTS.get(name)
    if cast is None or not isinstance(value, str):
        return value
    try:
        return cast(value)
    except ValueError:
        raise ConfigError(f"{name} must be a {cast.__name__}, not {value!r}") from None


def load_settings(overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Defaults, then the environment, then `overrides`, each cast and checked."""
    environ = os.environ if environ is None else environ
    settings = dict(DEFAULTS)
    for name in DEFAULTS:
        if name in environ:
            settings[name] = _cast(name, environ[name])
    for name, value in (overrides or {}).items():
        settings[name] = _cast(name, value) if name in DEFAULTS else value
    for name in ("RUN_LEASE_SECONDS", "REQUEST_TIMEOUT_SECONDS", "STORE_TIMEOUT_SECONDS",
                 "MAX_RUNS_PER_PROCESS", "REDIS_MAX_CONNECTIONS"):
        if settings[name] is None or settings[name] <= 0:
            raise ConfigError(f"{name} must be positive")
    if settings["REDIS_WAIT_REPLICAS"] < 0:
        raise ConfigError("REDIS_WAIT_REPLICAS must be 0 or more")
    if settings["JWT_ALGORITHM"] not in ("RS256", "HS256"):
        raise ConfigError("JWT_ALGORITHM must be RS256 or HS256")
    _check_observability(settings)
    return settings


def _check_observability(settings: dict[str, Any]) -> None:
    """Webhook and log settings that cannot work are refused at start, not at first use."""
    url = settings["WEBHOOK_URL"]
    if url and not str(url).startswith(("http://", "https://")):
        raise ConfigError("WEBHOOK_URL must be an http:// or https:// URL")
    if url and not settings["WEBHOOK_SECRET"]:
        raise ConfigError("WEBHOOK_URL needs WEBHOOK_SECRET (deliveries are always signed)")
    if settings["LOG_FORMAT"] not in ("text", "json"):
        raise ConfigError("LOG_FORMAT must be text or json")
    for name in ("WEBHOOK_TIMEOUT_SECONDS", "WEBHOOK_RETRY_SECONDS", "WEBHOOK_POLL_SECONDS"):
        if settings[name] <= 0:
            raise ConfigError(f"{name} must be positive")
