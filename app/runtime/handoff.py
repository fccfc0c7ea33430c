"""The in-process hand-off: a run's committed events, handed to followers in this process.

The worker that executes a run publishes each batch of events to the run's `RunChannel` right
after the store committed it, so a follower in the same process (above all the request that
created or continued the run) reads them from memory instead of polling the store. Nothing
reaches a channel before the store holds it: the store stays the truth, for followers in
other processes and for every resume. When the execution ends, the channel keeps the run as
its last commit left it (`final`), so a `stream=false` answer needs no read at all; an
execution that stops without a terminal event (another process moved the run, the store
stayed down) closes its channel with no `final`, and its followers go on from the store.

A run that pauses here is also kept (`KeptPauses`) as its pausing commit stored it, with all
its events: the continue that usually follows on the same connection decides on that copy and
needs no read before its commit, a compare-and-set on the kept version.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

from statemachine.states import RunState
from statemachine.store import StoredEvent, StoredRun, loads

KEPT_PAUSES = 256
"""The most paused runs a process keeps for their continue (the oldest go first): about as
many as a worker has clients continuing at once, at a few KB each."""
KEPT_EVENTS = 16384
"""The most events the kept runs hold together (a run's events are most of its weight: a
long streamed answer is thousands of deltas); a run with more than this is not kept."""


@dataclass
class Waited:
    """What a follower got from a channel: events after its position, whether the execution
    has ended (no more events will come through this channel), and whether its current
    commit has been waiting on the store for longer than the follower allows."""

    events: list[StoredEvent]
    closed: bool
    stalled: bool = False


@dataclass(frozen=True)
class KeptPause:
    """A run as the commit that paused it stored it, and every event of the run up to it.

    The document is kept only as that commit's JSON (`doc_json`); `run.doc` is empty until
    `take` reads it back, so a kept pause holds no reference to the loop's live document."""

    run: StoredRun
    events: list[StoredEvent]
    doc_json: str


class KeptPauses:
    """The runs that paused in this process, for a continue of them in this process.

    A copy is only a guess at the truth: the continue that takes it commits with its version
    (a compare-and-set), so a run moved since (an admin's decision, a cancel, a continue
    elsewhere) costs that continue a lost compare-and-set and a read, never a wrong answer;
    and a copy that would refuse the continue is not believed either (the store decides).
    """

    def __init__(self, limit: int = KEPT_PAUSES, events: int = KEPT_EVENTS) -> None:
        self._limit, self._event_limit = limit, events
        self._kept: OrderedDict[str, KeptPause] = OrderedDict()
        self._events = 0  # the events the kept runs hold together
        self._lock = threading.Lock()

    def keep(self, run: StoredRun, events: list[StoredEvent], doc_json: str) -> None:
        with self._lock:
            self._drop(run.run_id)
            if len(events) > self._event_limit:
                return
            self._kept[run.run_id] = KeptPause(replace(run, doc={}), events, doc_json)
            self._events += len(events)
            while len(self._kept) > self._limit or self._events > self._event_limit:
                self._drop(next(iter(self._kept)))

    def take(self, run_id: str) -> KeptPause | None:
        """The kept copy, given up (one continue per pause). Its run and document are the
        taker's own, read from the commit's JSON as a read of the store would give them: a
        continue changes the run it commits and its loop the document's lists, while the
        pause's answer may still be reading the objects that were kept."""
        with self._lock:
            kept = self._drop(run_id)
        if kept is None:
            return None
        return replace(kept, run=replace(kept.run, doc=loads(kept.doc_json)))

    def discard(self, run_id: str) -> None:
        with self._lock:
            self._drop(run_id)

    def _drop(self, run_id: str) -> KeptPause | None:
        kept = self._kept.pop(run_id, None)
        if kept is not None:
            self._events -= len(kept.events)
        return kept

    def __len__(self) -> int:
        return len(self._kept)


class RunChannel:
    """The events one execution of a run committed, in order, from `first_seq` on.

    `history` holds the run's events before this execution's, when the request that started
    it read them (else None): a pause then keeps the whole run in `kept`."""

    def __init__(self, run_id: str, events: list[StoredEvent],
                 history: list[StoredEvent] | None = None,
                 kept: KeptPauses | None = None) -> None:
        self.run_id = run_id
        self.first_seq = events[0].seq if events else 0
        self._events = list(events)
        self._closed = False
        self.final: StoredRun | None = None
        self._committing_since: float | None = None
        self._changed = threading.Condition()
        self._history = history
        self._kept = kept

    def covers(self, after: int) -> bool:
        """True when every event after `after` that this execution commits is here."""
        return self.first_seq != 0 and self.first_seq <= after + 1

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, events: list[StoredEvent], final: StoredRun | None = None,
                final_doc: str | None = None) -> None:
        """Events just committed; `final` is the run as that commit stored it when the
        commit paused or ended it (handed over with its terminal event, in one step), and
        `final_doc` its document as that commit wrote it."""
        with self._changed:
            if events and self.first_seq == 0:
                self.first_seq = events[0].seq
            self._events.extend(events)
            if final is not None:
                self.final = final
            self._changed.notify_all()
            if final is not None and final.state is RunState.PAUSED and final_doc and \
                    self._history is not None and self._kept is not None:
                self._kept.keep(final, self._history + self._events, final_doc)

    def close(self) -> None:
        """The execution ended: no more events come through here (those of a later commit,
        the sweep's say, are the store's to tell)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def begin_commit(self) -> None:
        """The execution sends a commit: a store that does not answer it is an outage its
        followers must see as one (they do not read the store themselves)."""
        with self._changed:
            self._committing_since = time.monotonic()
            self._changed.notify_all()

    def end_commit(self) -> None:
        with self._changed:
            self._committing_since = None

    def after(self, seq: int, timeout: float, stall: float | None = None) -> Waited:
        """Events after `seq`, waiting up to `timeout` seconds for the first of them, and
        no longer than until the current commit has waited `stall` seconds on the store."""
        until = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self._since(seq)
                now = time.monotonic()
                stalled_at = None if stall is None or self._committing_since is None \
                    else self._committing_since + stall
                if found or self._closed or now >= until:
                    return Waited(found, self._closed)
                if stalled_at is not None and now >= stalled_at:
                    return Waited([], False, stalled=True)
                self._changed.wait(min(until, stalled_at or until) - now)

    def _since(self, seq: int) -> list[StoredEvent]:
        if not self._events or self._events[-1].seq <= seq:
            return []
        start = max(0, seq + 1 - self._events[0].seq)
        return self._events[start:]

    def all_events(self) -> list[StoredEvent]:
        with self._changed:
            return list(self._events)


class Channels:
    """The channels of the runs executing in this process, by run id."""

    def __init__(self) -> None:
        self._open: dict[str, RunChannel] = {}
        self._lock = threading.Lock()
        self.kept = KeptPauses()

    def open(self, run_id: str, events: list[StoredEvent],
             history: list[StoredEvent] | None = None) -> RunChannel:
        channel = RunChannel(run_id, events, history, self.kept)
        with self._lock:
            self._open[run_id] = channel
        return channel

    def live(self, run_id: str, after: int) -> RunChannel | None:
        """The open channel of `run_id` if it holds every event after `after`, else None."""
        with self._lock:
            channel = self._open.get(run_id)
        if channel is None or channel.closed or not channel.covers(after):
            return None
        return channel

    def drop(self, run_id: str) -> None:
        """Close the run's channel because another writer than its execution committed to
        the run (a shutdown, a sweep): its followers go on from the store, which has it."""
        self.kept.discard(run_id)
        with self._lock:
            channel = self._open.pop(run_id, None)
        if channel is not None:
            channel.close()

    def close(self, channel: RunChannel) -> None:
        channel.close()
        with self._lock:
            if self._open.get(channel.run_id) is channel:
                del self._open[channel.run_id]
