"""The Flask face: `create_app(config=None)` wires settings, store, agents and blueprints."""

from __future__ import annotations

import contextlib
import logging
import re
import weakref
from datetime import UTC, datetime
from typing import Any

import orjson
from flask import Flask, Request, g, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import NotFound

from app.config import load_settings
from app.context import AgentOS
from app.cors import enable_cors
from app.decoding import StrictRequest, check_query
from app.errors import register_error_handlers
from app.intake import BodyIntake
from app.observability import (
    ObservedStore,
    StoreGauges,
    count_round_trips,
    count_slots,
    count_webhook,
    install,
)
from app.runtime.agent import Agent, load_agents
from app.runtime.executor import RunExecutor
from app.runtime.notifications import Deliverer, target_from
from app.runtime.service import AgentNotFound, RunService, Settings
from app.runtime.sessions import SessionService
from app.schemas import strict_json
from statemachine import deadline
from statemachine.errors import ApprovalNotFound, RunNotFound, SessionNotFound
from statemachine.store import RunStore

__all__ = ["create_app", "start_background"]

RAW_PATH = "agentos.path_info"
# An id the server could have made: what a path's `*_id` segment must look like (else 404).
SERVER_ID = re.compile(r"[A-Za-z0-9._:-]{1,255}")


class _TrailingSlashTolerant:
    """WSGI middleware: `/continue/` is served as `/continue` (the contract tolerates both)."""

    def __init__(self, wsgi_app: Any) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        environ[RAW_PATH] = path
        if len(path) > 1 and path.endswith("/"):
            environ["PATH_INFO"] = path.rstrip("/") or "/"
        return self.wsgi_app(environ, start_response)


class _Agentos(Flask):
    """Flask, with `ensure_sync` asked once per function: Flask asks it of the view and of
    every before-, after- and teardown function of every request, and each answer took an
    `inspect` walk (1.2% of a create+continue pair's instructions). What is remembered is
    that a function is plain (Flask returns it as it is), held weakly: one made for a single
    request (`after_this_request`) leaves with it. Anything else goes to Flask each time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain: weakref.WeakSet[Any] = weakref.WeakSet()

    def ensure_sync(self, func: Any) -> Any:
        if func in self._plain:  # False for a callable that takes no weak reference
            return func
        synced = super().ensure_sync(func)
        if synced is func:
            with contextlib.suppress(TypeError):  # no weak reference: asked each time
                self._plain.add(func)
        return synced


class _StrictJSON(DefaultJSONProvider):
    """Request bodies are standard JSON: NaN and Infinity make a body that is not JSON.

    Compact answers are encoded by orjson when its text is all ASCII (Flask escapes every
    other character, and so does this then); otherwise, and for what orjson refuses, by
    Flask's encoder. The JSON is the same; only small floats are spelled otherwise (orjson
    writes 0.00005 and 1e-7 where Flask writes 5e-05 and 1e-07). Every run object answered
    goes through here.
    """

    _COMPACT = (",", ":")
    _OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return strict_json(s)

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if kwargs == {"separators": self._COMPACT} and not self.sort_keys:
            try:
                raw: bytes | None = orjson.dumps(obj, default=self.default,
                                                 option=self._OPTIONS)
            except TypeError:  # what orjson refuses: Flask's encoder below
                raw = None
            if raw is not None and raw.isascii():
                return raw.decode()
        return super().dumps(obj, **kwargs)


def build_store(settings: dict[str, Any]) -> RunStore:
    """Redis when `REDIS_URL` is set (multi-host; a Redis Cluster through any of its nodes
    with `REDIS_CLUSTER`), else the embedded SQLite file."""
    timeout = settings["STORE_TIMEOUT_SECONDS"]
    outbox = bool(settings["WEBHOOK_URL"])
    if settings["REDIS_URL"]:
        from statemachine.redis_store import RedisRunStore

        return RedisRunStore(settings["REDIS_URL"], prefix=settings["REDIS_KEY_PREFIX"],
                             socket_timeout=timeout, outbox=outbox,
                             max_connections=settings["REDIS_MAX_CONNECTIONS"],
                             cluster=bool(settings["REDIS_CLUSTER"]),
                             wait_replicas=settings["REDIS_WAIT_REPLICAS"])
    from statemachine.sqlite_store import SqliteRunStore

    return SqliteRunStore(settings["AGENTOS_DB"], busy_timeout=timeout, outbox=outbox)


def _agents(settings: dict[str, Any], config: dict[str, Any]) -> dict[str, Agent]:
    given = config.get("AGENTS")
    if given is not None:
        return {agent.id: agent for agent in given}
    return load_agents(settings["AGENTOS_AGENTS"])


def _runtime(settings: dict[str, Any], config: dict[str, Any]) -> AgentOS:
    """The store, the agents, the executor and the service that ties them together."""
    store = config.get("STORE") or build_store(settings)
    if settings["WEBHOOK_URL"]:
        store.outbox = True  # a store given by a test writes its outbox too
    store = ObservedStore(store)
    count_round_trips()
    agents = _agents(settings, config)
    executor = RunExecutor(store, max_runs=settings["MAX_RUNS_PER_PROCESS"],
                           lease_seconds=settings["RUN_LEASE_SECONDS"],
                           sweep_interval=settings["SWEEP_INTERVAL_SECONDS"])
    executor.on_change = count_slots
    service = RunService(store, agents, Settings(
        lease_seconds=settings["RUN_LEASE_SECONDS"],
        pause_ttl_seconds=settings["PAUSE_TTL_SECONDS"],
        retain_seconds=settings["RUN_RETENTION_SECONDS"]), executor)
    executor.sweep = service.sweep
    target = target_from(settings)
    deliverer = Deliverer(store, target, count_webhook) if target else None
    return AgentOS(settings, store, agents, service, executor, datetime.now(UTC).isoformat(),
                   SessionService(service), deliverer, StoreGauges(store))


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Defaults, then the environment, then `config` (tests pass STORE or AGENTS objects)."""
    config = dict(config or {})
    settings = load_settings({k: v for k, v in config.items() if k not in ("STORE", "AGENTS")})
    app = _Agentos(__name__)
    app.json = _StrictJSON(app)
    app.config["AGENTOS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings["MAX_CONTENT_LENGTH"]
    app.request_class = _bounded_requests(app)
    app.json.sort_keys = False
    app.extensions["agentos"] = _runtime(settings, config)
    _register(app)
    app.wsgi_app = BodyIntake(  # type: ignore[method-assign]
        _TrailingSlashTolerant(app.wsgi_app), timeout=settings["REQUEST_TIMEOUT_SECONDS"],
        max_length=settings["MAX_CONTENT_LENGTH"])
    logging.getLogger("app").setLevel(logging.INFO)
    return app


def _bounded_requests(app: Flask) -> type[StrictRequest]:
    """The request class with this app's body bounds in it: Flask's request reads each from
    `current_app.config` at every use (through the context's proxy, some eight times per
    form request), and they are fixed once the app is made. A view may still set its own on
    its request, as Flask allows. (Flask before 3.1 has no form bounds in its config: None
    leaves those to werkzeug's defaults, as they were.)"""
    return type("BoundedRequest", (StrictRequest,), {
        "_max_content_length": app.config["MAX_CONTENT_LENGTH"],
        "_max_form_memory_size": app.config.get("MAX_FORM_MEMORY_SIZE"),
        "_max_form_parts": app.config.get("MAX_FORM_PARTS"),
    })


_NOT_FOUND: dict[str, type[Exception]] = {
    "agent_id": AgentNotFound, "run_id": RunNotFound, "approval_id": ApprovalNotFound,
    "session_id": SessionNotFound,
}


def _register(app: Flask) -> None:
    from app.views import approvals, console, meta, runs, sessions

    app.url_map.merge_slashes = False  # `//` is the JSON 404, never a 308 to a merged path
    for blueprint in (meta.bp, runs.bp, approvals.bp, sessions.bp, console.bp):
        app.register_blueprint(blueprint)
    register_error_handlers(app)
    install(app)
    enable_cors(app, app.config["AGENTOS"]["CORS_ORIGINS"])

    timeout = app.config["AGENTOS"]["STORE_TIMEOUT_SECONDS"]

    @app.before_request
    def _before_view() -> None:
        """The checks every request passes before its view, in order (one hook: Flask's
        cost is per hook, and every request pays it; the request is looked up once)."""
        req = request._get_current_object()  # type: ignore[attr-defined]
        check_query(req.query_string)
        start_background(app)
        _no_empty_segment(req)
        _ids_we_could_have_made(req)
        g.store_budget = deadline.open_budget(timeout)

    @app.teardown_request
    def _close_store_budget(_exc: BaseException | None) -> None:
        token = g.pop("store_budget", None)
        if token is not None:
            deadline.close_budget(token)


def _no_empty_segment(req: Request) -> None:
    """Werkzeug would merge `//` (even a leading one) into `/`: the contract says 404."""
    if "//" in req.environ.get(RAW_PATH, req.path):
        raise NotFound()


def _ids_we_could_have_made(req: Request) -> None:
    """An id in the path that no id of ours looks like is not found, before any store."""
    for name, value in (req.view_args or {}).items():
        if name.endswith("_id") and not SERVER_ID.fullmatch(str(value)):
            raise _NOT_FOUND.get(name, NotFound)(value)


def start_background(app: Flask) -> None:
    """This process's lease/sweep thread and webhook deliverer (idempotent, fork-aware)."""
    runtime = app.extensions["agentos"]
    runtime.executor.ensure_background()
    if runtime.deliverer is not None:
        runtime.deliverer.ensure_running()
