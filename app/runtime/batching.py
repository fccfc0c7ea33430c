"""Batching a run's events: a fast turn commits once, a slow one no later than a window.

A turn of the scripted model, or of a real model whose deltas arrive close together, would
otherwise cost one commit per delta. The session keeps emitted events pending and commits
them together: at once before a tool's side effect (its `ToolCallStarted`), with a change of
state (the terminal event in the same atomic step as the state), when a batch is full, and
otherwise once the oldest pending event is `BATCH_SECONDS` old. That last bound needs a clock
outside the run's own thread, which may be blocked reading a slow model: the `Flusher`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from statemachine.blocking import ProcessThread

log = logging.getLogger(__name__)

BATCH_SECONDS = 0.02
"""The longest an emitted event waits for its commit (and so for its followers)."""
BATCH_EVENTS = 256
"""A batch this long is committed at once, however fast events come."""


class Flushable(Protocol):
    def flush_due(self) -> None: ...


class Flusher:
    """One thread per process that commits batches whose window has passed.

    `flush_due` makes one attempt and never sleeps on a store outage (it re-schedules itself):
    one run's slow store must not hold up the batches of the others.
    """

    def __init__(self) -> None:
        self._due: dict[Flushable, float] = {}
        self._changed = threading.Condition()
        self._thread = ProcessThread(self._loop, "batch-flush")
        self._wakes_at = float("inf")  # when the thread's wait ends on its own

    def watch(self, session: Flushable, due_at: float) -> None:
        """Call `session.flush_due()` at `due_at` (monotonic), unless it is due sooner.

        The thread is woken only when `due_at` comes before its own next wake-up: with one
        window for every batch that is rare (a fast turn ends before its window does, and
        its batch goes with the turn's commit), so a turn costs no thread switch."""
        with self._changed:
            if due_at < self._due.get(session, float("inf")):
                self._due[session] = due_at
                if due_at < self._wakes_at:
                    self._changed.notify()
        self._thread.ensure()

    def forget(self, session: Flushable) -> None:
        with self._changed:
            self._due.pop(session, None)

    def _loop(self) -> None:
        while True:
            session = self._next_due()
            try:
                session.flush_due()
            except Exception:  # the session records what its own thread must raise
                log.exception("background flush failed")

    def _next_due(self) -> Flushable:
        with self._changed:
            while True:
                if not self._due:
                    self._wait_until(float("inf"))
                    continue
                session, due_at = min(self._due.items(), key=lambda item: item[1])
                if due_at <= time.monotonic():
                    del self._due[session]
                    return session
                self._wait_until(due_at)

    def _wait_until(self, wakes_at: float) -> None:
        self._wakes_at = wakes_at
        try:
            self._changed.wait(None if wakes_at == float("inf") else
                               max(0.0, wakes_at - time.monotonic()))
        finally:
            self._wakes_at = float("-inf")  # awake: `watch` need not notify


FLUSHER = Flusher()
