"""Server-sent events: framing, heartbeats, and following a run's stored event log.

Live streams and resumed streams are the same thing: both follow the store from a sequence id
until a terminal event, so what a client sees never depends on which worker executes the run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator

from statemachine.errors import StoreUnavailable
from statemachine.states import RunState
from statemachine.store import RunStore, StoredEvent

log = logging.getLogger(__name__)

MIMETYPE = "text/event-stream; charset=utf-8"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PING = b": ping\n\n"
TERMINAL_EVENTS = frozenset({"RunPaused", "RunCompleted", "RunError", "RunCancelled"})
# The longest single wait for new events. Every event of a run (a pause, an end, a cancel, the
# sweep's RunError for a lost worker) wakes the wait at once, so the slice only bounds how
# often an idle stream re-reads its run: with thousands of idle streams per worker, that
# re-read is most of their cost. The store caps it further (Redis: below its socket timeout).
_WAIT_SLICE = 5.0


def frame(event: StoredEvent) -> bytes:
    """One event: `id:`, `event:` and a one-line compact JSON `data:`."""
    data = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.seq}\nevent: {event.name}\ndata: {data}\n\n".encode()


def follow(
    store: RunStore,
    run_id: str,
    after: int,
    current_state: Callable[[str], RunState],
    *,
    ping_seconds: float,
    max_seconds: float,
    history_until: int = 0,
) -> Iterator[StoredEvent | None]:
    """Stored events after `after`, then live ones, until a terminal event (None = idle ping).

    Events up to `history_until` (the run's last event when a resume was asked for) are
    history: a terminal event among them does not end the stream, so a replay spans every
    pause and continue. Ends early when the run is not executing and nothing is left to read
    (a paused or finished run followed from its end), or when `max_seconds` have passed.
    """
    deadline = time.monotonic() + max_seconds
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        events = store.read_events(run_id, after)
        if not events:
            if not current_state(run_id).is_executing:
                events = store.read_events(run_id, after)  # a last commit may have landed
                if not events:
                    return
            else:
                events = store.wait_events(run_id, after, _wait(deadline, quiet_since,
                                                                ping_seconds))
        for event in events:
            yield event
            after = event.seq
            if event.name in TERMINAL_EVENTS and event.seq > history_until:
                return
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= ping_seconds:
            quiet_since = time.monotonic()
            yield None


def _wait(deadline: float, quiet_since: float, ping_seconds: float) -> float:
    """Wait for events no longer than the slice, the next ping, or the stream's end."""
    now = time.monotonic()
    return max(0.0, min(_WAIT_SLICE, deadline - now, quiet_since + ping_seconds - now))


def sse_body(events: Iterator[StoredEvent | None]) -> Iterator[bytes]:
    """Frames for a response; a store outage mid-stream ends it (the client resumes later)."""
    try:
        for event in events:
            yield PING if event is None else frame(event)
    except StoreUnavailable as exc:
        log.warning("stream ended early, store unavailable: %s", exc)
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
