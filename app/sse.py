"""Server-sent events: framing, heartbeats, and following a run's stored event log.

Live streams and resumed streams are the same thing: both follow the store from a sequence id
until a terminal event, so what a client sees never depends on which worker executes the run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator

from app.runtime.handoff import Channels, RunChannel
from statemachine.errors import StoreUnavailable
from statemachine.states import RunState
from statemachine.store import RunStore, StoredEvent

log = logging.getLogger(__name__)

MIMETYPE = "text/event-stream; charset=utf-8"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PING = b": ping\n\n"
FRAMES_PER_CHUNK = 256  # a long history replayed by `/events` is still sent piece by piece
TERMINAL_EVENTS = frozenset({"RunPaused", "RunCompleted", "RunError", "RunCancelled"})
# The longest single wait for new events. Every event of a run (a pause, an end, a cancel, the
# sweep's RunError for a lost worker) wakes the wait at once, so the slice only bounds how
# often an idle stream re-reads its run: with thousands of idle streams per worker, that
# re-read is most of their cost. The store caps it further (Redis: below its socket timeout).
_WAIT_SLICE = 5.0
_OUTAGE_POLL = 0.2
# Line breaks that JSON leaves raw but some event-stream readers split on: escaped, so no
# line a user wrote can become a line of the stream.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085"})


def frame(event: StoredEvent) -> bytes:
    """One event: `id:`, `event:` and a one-line compact JSON `data:`."""
    data = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
    data = data.translate(_LINE_BREAKS)
    return f"id: {event.seq}\nevent: {event.name}\ndata: {data}\n\n".encode()


def follow(
    store: RunStore,
    run_id: str,
    after: int,
    current_state: Callable[[str], RunState],
    *,
    ping_seconds: float,
    max_seconds: float,
    outage_seconds: float = 0.0,
    history_until: int = 0,
    channel: RunChannel | None = None,
    channels: Channels | None = None,
    stall_seconds: float | None = None,
) -> Iterator[list[StoredEvent] | None]:
    """Stored events after `after`, then live ones, until a terminal event (None = idle ping),
    in the batches they were read or committed in (a stream sends each batch at once).

    Events up to `history_until` (the run's last event when a resume was asked for) are
    history: a terminal event among them does not end the stream, so a replay spans every
    pause and continue. Ends early when the run is not executing and nothing is left to read
    (a paused or finished run followed from its end), or when `max_seconds` have passed. A
    store outage is waited out (pings keep the client) for up to `outage_seconds`: the
    executing worker retries its writes as long, so a stream whose store comes back still
    ends with the run's terminal event.

    While the run executes in this process, its events come from its channel (`channel`,
    or the one `channels` has for it), in memory, as soon as they are committed; when the
    execution ends without a terminal event the stream goes on from the store. A commit of
    the run that waits on the store longer than `stall_seconds` counts as an outage here.
    """
    deadline = time.monotonic() + max_seconds
    quiet_since = time.monotonic()
    down_since: float | None = None
    while time.monotonic() < deadline:
        if channel is None or channel.closed or not channel.covers(after):
            channel = channels.live(run_id, after) if channels is not None else None
        wait = _wait(deadline, quiet_since, ping_seconds)
        try:
            if channel is not None:
                events = _channel_events(channel, after, wait, stall_seconds)
            else:
                events = _next_events(store, run_id, after, current_state, wait)
            down_since = None
        except StoreUnavailable:
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since >= outage_seconds:
                raise
            time.sleep(min(_OUTAGE_POLL, outage_seconds))
            events = []
        if events is None:
            return
        batch, ended = _until_terminal(events, history_until)
        if batch:
            yield batch
            after = batch[-1].seq
        if ended:
            return
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= ping_seconds:
            quiet_since = time.monotonic()
            yield None


def _until_terminal(events: list[StoredEvent],
                    history_until: int) -> tuple[list[StoredEvent], bool]:
    """The events up to the first terminal one past the history, and whether there was one."""
    for index, event in enumerate(events):
        if event.name in TERMINAL_EVENTS and event.seq > history_until:
            return events[:index + 1], True
    return events, False


def _channel_events(channel: RunChannel, after: int, wait: float,
                    stall_seconds: float | None) -> list[StoredEvent]:
    """The next events from memory (maybe none after waiting up to `wait`); a commit stuck
    on the store is an outage, as the follower's own read of the store would have met."""
    got = channel.after(after, wait, stall_seconds)
    if got.stalled:
        raise StoreUnavailable(f"a commit of run {channel.run_id} waits on the store")
    return got.events


def _next_events(store: RunStore, run_id: str, after: int,
                 current_state: Callable[[str], RunState],
                 wait: float) -> list[StoredEvent] | None:
    """The next events (maybe none after waiting up to `wait`); None when no more will come."""
    events = store.read_events(run_id, after)
    if events:
        return events
    if not current_state(run_id).is_executing:
        return store.read_events(run_id, after) or None  # a last commit may have landed
    return store.wait_events(run_id, after, wait)


def _wait(deadline: float, quiet_since: float, ping_seconds: float) -> float:
    """Wait for events no longer than the slice, the next ping, or the stream's end."""
    now = time.monotonic()
    return max(0.0, min(_WAIT_SLICE, deadline - now, quiet_since + ping_seconds - now))


def sse_body(batches: Iterator[list[StoredEvent] | None]) -> Iterator[bytes]:
    """Frames for a response, a batch of events in one chunk (one write to the socket, not
    one per delta); a store outage mid-stream ends it (the client resumes later)."""
    try:
        for batch in batches:
            if batch is None:
                yield PING
                continue
            for start in range(0, len(batch), FRAMES_PER_CHUNK):
                yield b"".join(map(frame, batch[start:start + FRAMES_PER_CHUNK]))
    except StoreUnavailable as exc:
        log.warning("stream ended early, store unavailable: %s", exc)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
