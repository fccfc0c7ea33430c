"""The state machine: the whole state x trigger table, the guard, wire statuses, sharing."""

from __future__ import annotations

import itertools
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from transitions import Machine

from statemachine import machine
from statemachine.errors import ApprovalPending, InvalidTransition
from statemachine.machine import decide
from statemachine.states import RunState, Trigger, states_for_wire_status

RUNNING, PAUSED, CONTINUED = RunState.RUNNING, RunState.PAUSED, RunState.CONTINUED
COMPLETED, ERRORED, CANCELLED = RunState.COMPLETED, RunState.ERRORED, RunState.CANCELLED
NO = "409"  # InvalidTransition
GUARD = "403"  # ApprovalPending

COLUMNS = (Trigger.PAUSE, Trigger.COMPLETE, Trigger.FAIL, Trigger.CANCEL, Trigger.CONTINUE,
           Trigger.RESOLVE_APPROVAL, Trigger.CHECKPOINT, Trigger.DELETE)

# Contract section 2, written out cell by cell; one row per state, columns as above.
#           pause    complete   fail     cancel     continue   resolve   checkpoint  delete
TABLE = {
    RUNNING: (PAUSED, COMPLETED, ERRORED, CANCELLED, NO, NO, RUNNING, NO),
    CONTINUED: (PAUSED, COMPLETED, ERRORED, CANCELLED, NO, NO, CONTINUED, NO),
    PAUSED: (NO, NO, NO, CANCELLED, CONTINUED, PAUSED, NO, CANCELLED),
    COMPLETED: (NO, NO, NO, NO, NO, NO, NO, COMPLETED),
    ERRORED: (NO, NO, NO, NO, NO, NO, NO, ERRORED),
    CANCELLED: (NO, NO, NO, NO, NO, NO, NO, CANCELLED),
}

# The same table with an admin approval pending: only the guarded continue changes.
GUARDED_TABLE = {**TABLE, PAUSED: (NO, NO, NO, CANCELLED, GUARD, PAUSED, NO, CANCELLED)}

ALREADY = {
    RUNNING: "run is already running",
    PAUSED: "run is already paused",
    CONTINUED: "run is already continued",
    COMPLETED: "run is already completed",
    ERRORED: "run is already errored",
    CANCELLED: "run is already cancelled",
}

CELLS = [
    pytest.param(state, trigger, admin_pending, id=f"{state}-{trigger}-pending={admin_pending}")
    for admin_pending in (False, True)
    for state in RunState
    for trigger in Trigger
]


def expected(state: RunState, trigger: Trigger, admin_pending: bool) -> RunState | str:
    table = GUARDED_TABLE if admin_pending else TABLE
    return table[state][COLUMNS.index(trigger)]


def outcome(state: RunState, trigger: Trigger, admin_pending: bool) -> RunState | str:
    """What decide answers, as a table cell."""
    try:
        return decide(state, trigger, admin_pending=admin_pending)
    except InvalidTransition:
        return NO
    except ApprovalPending:
        return GUARD


def test_table_covers_every_state_and_trigger():
    assert set(TABLE) == set(RunState)
    assert set(COLUMNS) == set(Trigger) and len(COLUMNS) == len(Trigger)


@pytest.mark.parametrize(("state", "trigger", "admin_pending"), CELLS)
def test_decide_matches_the_table(state, trigger, admin_pending):
    want = expected(state, trigger, admin_pending)
    if want == NO:
        with pytest.raises(InvalidTransition) as caught:
            decide(state, trigger, admin_pending=admin_pending)
        assert str(caught.value) == ALREADY[state]
        assert caught.value.sentence == ALREADY[state]
        assert caught.value.state is state
        assert caught.value.trigger == trigger.value
    elif want == GUARD:
        with pytest.raises(ApprovalPending) as caught:
            decide(state, trigger, admin_pending=admin_pending)
        assert caught.value.sentence == (
            "This run requires admin approval before it can be continued")
    else:
        assert decide(state, trigger, admin_pending=admin_pending) is want


def test_only_a_paused_continue_with_an_approval_pending_is_guarded():
    guarded = [(s, t) for s, t in itertools.product(RunState, Trigger)
               if outcome(s, t, True) == GUARD]
    assert guarded == [(PAUSED, Trigger.CONTINUE)]
    assert outcome(PAUSED, Trigger.CONTINUE, False) is CONTINUED


def test_nothing_leaves_a_final_state():
    """A final run takes no trigger but `delete`, and that one keeps its state."""
    for state in (COMPLETED, ERRORED, CANCELLED):
        assert state.is_final
        assert all(outcome(state, t, p) == NO for t in Trigger for p in (False, True)
                   if t is not Trigger.DELETE)
        assert decide(state, Trigger.DELETE) is state


def test_internal_transitions_keep_the_state():
    for state in (RUNNING, CONTINUED):
        assert decide(state, Trigger.CHECKPOINT) is state
    assert decide(PAUSED, Trigger.RESOLVE_APPROVAL, admin_pending=True) is PAUSED


@pytest.mark.parametrize(("state", "wire"), [
    (RUNNING, "RUNNING"), (PAUSED, "PAUSED"), (CONTINUED, "RUNNING"),
    (COMPLETED, "COMPLETED"), (ERRORED, "ERROR"), (CANCELLED, "CANCELLED"),
])
def test_wire_status(state, wire):
    assert state.wire_status == wire
    assert state in states_for_wire_status(wire)


@pytest.mark.parametrize(("wire", "states"), [
    ("RUNNING", {RUNNING, CONTINUED}),
    ("PAUSED", {PAUSED}),
    ("COMPLETED", {COMPLETED}),
    ("ERROR", {ERRORED}),
    ("CANCELLED", {CANCELLED}),
    ("CONTINUED", set()),
    ("ERRORED", set()),
    ("running", set()),
])
def test_states_for_wire_status(wire, states):
    assert states_for_wire_status(wire) == states


def test_one_machine_is_shared_and_keeps_no_runs():
    for state, trigger, pending in itertools.product(RunState, Trigger, (False, True)):
        outcome(state, trigger, pending)
    assert isinstance(machine.MACHINE, Machine)
    assert set(machine.MACHINE.events) == {t.value for t in Trigger}
    assert machine.MACHINE.models == []  # decide attaches nothing: no per-run state


def test_decide_is_thread_safe():
    """Many threads deciding at once on different cells all get the table's answer."""
    cells = list(itertools.product(RunState, Trigger, (False, True)))
    threads = 16
    start = threading.Barrier(threads)

    def worker(offset: int) -> list[tuple]:
        start.wait(timeout=10)
        wrong = []
        for round_ in range(40):
            for i in range(len(cells)):
                state, trigger, pending = cells[(i + offset + round_) % len(cells)]
                got = outcome(state, trigger, pending)
                if got != expected(state, trigger, pending):
                    wrong.append((state, trigger, pending, got))
        return wrong

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(worker, range(threads)))
    finally:
        sys.setswitchinterval(interval)
    assert [w for wrong in results for w in wrong] == []
