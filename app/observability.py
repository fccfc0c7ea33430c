"""Request ids, structured logs and Prometheus metrics: the one place the server reports itself.

- Every request gets an id (`X-Request-ID` taken when it is a sane token, else made) that is
  echoed on the answer and carried by every log line written while serving it.
- One log line per request (method, route, status, duration, request id, agent and run id),
  written when the answer is closed, so a stream's line carries its whole duration; JSON
  objects when `LOG_FORMAT=json`.
- One log line per lifecycle change, seen where it happens: the store's commits (paused,
  continued, ended with its reason, a lapsed lease settled) and its failures (an outage seen,
  and recovered). `ObservedStore` wraps the store for that; it changes no answer.
- Metrics in the Prometheus text format. Under gunicorn they are aggregated across workers
  (prometheus_client's multiprocess mode, its directory made by gunicorn.conf.py); the gauges
  of stored things (paused runs, pending approvals) are counted from the store on scrape, at a
  bounded cost (a capped count, cached for a few seconds).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Request, Response, g, has_request_context, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from statemachine import redis_store
from statemachine.errors import StoreUnavailable

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
UNMATCHED_ROUTE = "<unmatched>"
GAUGE_CACHE_SECONDS = 5.0

log = logging.getLogger("app.lifecycle")
request_log = logging.getLogger("app.requests")

REQUESTS = Counter("agentos_http_requests_total", "HTTP requests answered",
                   ["method", "route", "status"])
LATENCY = Histogram("agentos_http_request_duration_seconds",
                    "Time from request to the answer's close (a stream's whole life)",
                    ["method", "route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TRANSITIONS = Counter("agentos_run_transitions_total", "Run state changes committed",
                      ["trigger"])
STORE_ERRORS = Counter("agentos_store_errors_total", "Store calls that found it unavailable",
                       ["operation"])
ROUND_TRIPS = Counter("agentos_redis_round_trips_total",
                      "Commands and pipelines sent to Redis (each one round trip)")
SLOTS = Gauge("agentos_execution_slots_in_use", "Runs executing in the worker processes",
              multiprocess_mode="livesum")
WEBHOOKS = Counter("agentos_webhook_deliveries_total",
                   "Webhook delivery attempts by outcome (delivered, retried, failed)",
                   ["type", "outcome"])

_TRIGGERS = {
    "RunStarted": "start",
    "RunPaused": "pause",
    "RunContinued": "continue",
    "RunCompleted": "complete",
    "RunError": "fail",
    "RunCancelled": "cancel",
}


# -- logging ---------------------------------------------------------------------------------


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is now (test runners swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class _RequestContext(logging.Filter):
    """Adds the current request's id to every record written while serving it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = g.get("request_id") if has_request_context() else None
        return True


class _SecondsCached(logging.Formatter):
    """`formatTime` that formats each second once (every request writes a few lines)."""

    _cached: tuple[int, str | None, str] = (-1, None, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        cached_second, cached_format, text = self._cached
        if second != cached_second or datefmt != cached_format:
            text = time.strftime(datefmt or "%Y-%m-%d %H:%M:%S", self.converter(second))
            self._cached = (second, datefmt, text)
        return text if datefmt else f"{text},{int(record.msecs):03d}"


class JsonFormatter(_SecondsCached):
    """One JSON object per line: time, level, logger, message, and the record's fields."""

    FIELDS = ("request_id", "method", "route", "path", "status", "duration_ms", "agent_id",
              "run_id", "event", "state", "reason", "operation", "outage_seconds")

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in self.FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


class TextFormatter(_SecondsCached):
    """`time level logger message key=value ...`, the same fields as the JSON lines.

    A line without a traceback is put together here, as `FORMAT` says, rather than by
    `logging.Formatter.format` (its style object, and its checks for what the format uses,
    were a fifth of each line's cost); a line with one goes the standard way."""

    FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
    FIELDS = tuple(k for k in JsonFormatter.FIELDS if k not in ("method", "route"))

    def __init__(self) -> None:
        super().__init__(self.FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            text = super().format(record)
        else:
            record.message = record.getMessage()
            record.asctime = self.formatTime(record)
            text = f"{record.asctime} {record.levelname} {record.name} {record.message}"
        fields = record.__dict__
        extra = [f"{k}={fields[k]}" for k in self.FIELDS if fields.get(k) is not None]
        return " ".join([text, *extra])


_HANDLER = _Stderr()
_HANDLER.addFilter(_RequestContext())


def setup_logging(log_format: str) -> None:
    """One handler on the `app` logger (installed once per process), in the chosen format.

    Records carry no thread name: no line of ours or gunicorn's shows it, and under gevent
    `threading.current_thread()` (which every record called) was 2.5% of a worker's CPU in the
    create+continue loop (`make profile`). The process id stays: gunicorn's lines show it.
    Nor do they show where a line was logged from (no format names a file, line or function):
    without `_srcfile`, the way the logging HOWTO's "Optimization" section gives, no record
    walks the stack to find its caller.
    """
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    formatter.converter = time.gmtime
    _HANDLER.setFormatter(formatter)
    logger = logging.getLogger("app")
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.setLevel(os.environ.get("LOG_LEVEL", "info").upper())


# -- requests --------------------------------------------------------------------------------


def _request_id() -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _SANE_ID.fullmatch(given) else os.urandom(16).hex()


def _route(req: Request) -> str:
    rule = req.url_rule
    return rule.rule if rule is not None else UNMATCHED_ROUTE


def _begin() -> None:
    g.request_id = _request_id()
    g.request_started = time.perf_counter()


def _finish(response: Response) -> Response:
    """Echo the id; log and count the request once its answer is closed. The request and
    its `g` are looked up once: each use of Flask's proxies is a lookup of its own."""
    req, here = request._get_current_object(), g._get_current_object()  # type: ignore[attr-defined]
    response.headers[REQUEST_ID_HEADER] = here.request_id
    path_args = req.view_args or {}
    fields = {
        "request_id": here.request_id,
        "method": req.method,
        "route": _route(req),
        "path": req.path,
        "status": response.status_code,
        "agent_id": path_args.get("agent_id"),
        # from the path, or the run a create made (the view notes it in `g.run_id`)
        "run_id": path_args.get("run_id") or here.get("run_id"),
    }
    started = here.request_started
    response.call_on_close(lambda: _record(fields, started))
    return response


@functools.lru_cache(maxsize=1024)
def _child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: the labels of the hot path are few (routes,
    statuses, triggers), and prometheus_client takes a lock for every lookup."""
    return metric.labels(*labels)


def _record(fields: dict[str, Any], started: float) -> None:
    seconds = time.perf_counter() - started
    fields["duration_ms"] = round(seconds * 1000, 2)
    _child(REQUESTS, fields["method"], fields["route"], str(fields["status"])).inc()
    _child(LATENCY, fields["method"], fields["route"]).observe(seconds)
    request_log.info("%s %s %s %.2fms", fields["method"], fields["path"], fields["status"],
                     fields["duration_ms"], extra=fields)


def install(app: Flask) -> None:
    """Request ids, the per-request log line and metrics for every request of `app`."""
    setup_logging(app.config["AGENTOS"]["LOG_FORMAT"])
    app.before_request(_begin)
    app.after_request(_finish)


# -- the store, observed ---------------------------------------------------------------------


class ObservedStore:
    """The store as it is, plus a log line and a count for each lifecycle change it commits
    and for each outage it sees. Every call and every answer passes through unchanged."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._down_since: float | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if not callable(value):
            return value  # read through each time: a flag such as `outbox` may change
        observed = self._observed(name, value)
        setattr(self, name, observed)  # found here from now on, without this lookup
        return observed

    def _observed(self, name: str, method: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                result = method(*args, **kwargs)
            except StoreUnavailable as exc:
                self._outage(name, exc)
                raise
            if self._down_since is not None:
                self._recovered()
            return result

        return call

    def _outage(self, operation: str, exc: StoreUnavailable) -> None:
        STORE_ERRORS.labels(operation).inc()
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
        if first:
            log.warning("store outage seen: %s", exc, extra={"operation": operation})

    def _recovered(self) -> None:
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            seconds = round(time.monotonic() - since, 3)
            log.warning("store recovered after %.3fs", seconds,
                        extra={"outage_seconds": seconds})

    def create_run(self, *args: Any, **kwargs: Any) -> Any:
        result = self._observed("create_run", self._store.create_run)(*args, **kwargs)
        _child(TRANSITIONS, "start").inc()
        return result

    def commit(self, commit: Any, *args: Any, **kwargs: Any) -> Any:
        result = self._observed("commit", self._store.commit)(commit, *args, **kwargs)
        for event in commit.events:
            _lifecycle(commit, event)
        return result

    def resolve_approval(self, approval: Any, *args: Any, **kwargs: Any) -> Any:
        result = self._observed("resolve_approval", self._store.resolve_approval)(
            approval, *args, **kwargs)
        _child(TRANSITIONS, "resolve_approval").inc()
        log.info("approval %s", approval.status,
                 extra={"run_id": approval.run_id, "agent_id": approval.doc.get("agent_id"),
                        "state": approval.status, "event": "ApprovalResolved"})
        return result


def _lifecycle(commit: Any, event: dict[str, Any]) -> None:
    name = str(event.get("event"))
    trigger = _TRIGGERS.get(name)
    if trigger is None:
        return
    _child(TRANSITIONS, trigger).inc()
    reason = event.get("reason") or event.get("error_type")
    what = "run " + commit.state.value.lower()
    if event.get("error_type") == "WorkerLost":
        what = "run errored: lapsed lease settled"
    elif reason:
        what += f" ({reason})"
    log.info(what, extra={"run_id": commit.run_id, "agent_id": event.get("agent_id"),
                          "event": name, "state": commit.state.value, "reason": reason})


def count_round_trips() -> None:
    """Counts each command or pipeline the Redis store sends (see `redis_store`)."""
    redis_store.on_round_trip = ROUND_TRIPS.inc


def count_slots(in_use: int) -> None:
    """The executor tells this process's slots in use (summed over live workers)."""
    SLOTS.set(in_use)


def count_webhook(kind: str, outcome: str) -> None:
    WEBHOOKS.labels(kind, outcome).inc()


# -- /metrics --------------------------------------------------------------------------------


class StoreGauges:
    """Paused runs and pending approvals, counted from the store, cached a few seconds."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._cached: tuple[float, int, int] | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            paused, pending = self._counts()
        except StoreUnavailable:
            return  # the scrape still answers in an outage; store errors count it
        yield GaugeMetricFamily("agentos_paused_runs", "Runs waiting in PAUSED", value=paused)
        yield GaugeMetricFamily("agentos_pending_approvals", "Approvals waiting for an admin",
                                value=pending)

    def _counts(self) -> tuple[int, int]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > GAUGE_CACHE_SECONDS:
                self._cached = (now, self.store.count_paused_runs(),
                                self.store.count_pending_approvals())
            return self._cached[1], self._cached[2]


def exposition(gauges: StoreGauges) -> Response:
    """The text format: every worker's metrics (multiprocess mode) and the store gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    store_registry = CollectorRegistry()
    store_registry.register(gauges)
    body += generate_latest(store_registry)
    return Response(body, content_type=CONTENT_TYPE_LATEST)
