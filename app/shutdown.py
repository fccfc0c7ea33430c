"""A worker's clean stop, wired into gunicorn's hooks (see gunicorn.conf.py).

On SIGTERM gunicorn's worker stops accepting connections and lets open requests finish for
`graceful_timeout` seconds before it exits (and its master kills it). Here the same signal also
starts the service's stop: no new runs (503), the executing runs get most of that grace to
pause or end, and each run still executing then ends ERROR with `RunError` (`WorkerShutdown`)
while the worker can still commit it, so the streams that follow it end with that event and
no run stays RUNNING. A quick stop (SIGINT, SIGQUIT) and the worker's exit do the same at once,
for whatever is still executing.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from statemachine.blocking import gevent_active

log = logging.getLogger(__name__)

# Of the graceful timeout, the part kept for ending abandoned runs and for their streams to
# carry the RunError out before gunicorn stops waiting for open requests.
_MARGIN_SECONDS = 3.0


def _service(worker: Any) -> Any:
    extensions = getattr(getattr(worker, "wsgi", None), "extensions", None) or {}
    agentos = extensions.get("agentos")
    return agentos.service if agentos is not None else None


def grace_seconds(graceful_timeout: float) -> float:
    """How long executing runs may go on once the stop began."""
    return max(0.0, graceful_timeout - min(_MARGIN_SECONDS, graceful_timeout / 3))


def install(worker: Any) -> None:
    """post_worker_init: SIGTERM also starts the service's stop, in the background."""
    original = worker.handle_exit
    started = threading.Event()

    def handle_exit(sig: int, frame: Any) -> None:
        original(sig, frame)
        if not started.is_set():
            started.set()
            _in_background(_stop, worker)

    worker.handle_exit = handle_exit
    signal.signal(signal.SIGTERM, handle_exit)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn set it: requests go on undisturbed


def _in_background(function: Any, *args: Any) -> None:
    """Start `function(*args)` without waiting, as a signal handler must.

    Under gevent the handler may run in the event loop itself, where `Thread.start()` (which
    waits for the thread to begin) raises BlockingSwitchOutError; that error then ended the
    worker at once, and only the executor's non-daemon threads kept it serving its last
    requests. A greenlet is spawned without waiting."""
    if gevent_active():
        import gevent

        gevent.spawn(function, *args)
    else:
        threading.Thread(target=function, args=args, name="worker-stop", daemon=True).start()


def _stop(worker: Any) -> None:
    service = _service(worker)
    if service is not None:
        try:
            service.stop_executing(grace_seconds(float(worker.cfg.graceful_timeout)))
        except Exception:
            log.exception("worker shutdown: ending the executing runs failed")


def stop_now(worker: Any) -> None:
    """worker_int and worker_exit: end what still executes here, without a grace period."""
    service = _service(worker)
    if service is None:
        return
    try:
        service.stop_executing(0)
    except Exception:
        log.exception("worker shutdown: ending the executing runs failed")
