"""The one transitions Machine that decides every move of every run.

The machine is built once at import and shared: it holds no per-run state. To decide, a tiny
throw-away model (`RunFacts`) carrying the stored state and guard is passed to the event's
`trigger`; the machine either moves it, raises `MachineError` (no such transition: 409), or
returns False because a condition held it (the admin_pending guard: 403). Nothing is written
here: the caller commits the decided state through the store's compare-and-set. Callbacks
have no side effects, because transitions does not roll a state back when a callback raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transitions import Machine, MachineError

from statemachine.errors import ApprovalPending, InvalidTransition
from statemachine.states import FINAL_STATES, RunState, Trigger

_EXECUTING = [RunState.RUNNING, RunState.CONTINUED]

TRANSITIONS: list[dict[str, object]] = [
    {"trigger": Trigger.PAUSE.value, "source": _EXECUTING, "dest": RunState.PAUSED},
    {"trigger": Trigger.COMPLETE.value, "source": _EXECUTING, "dest": RunState.COMPLETED},
    {"trigger": Trigger.FAIL.value, "source": _EXECUTING, "dest": RunState.ERRORED},
    {
        "trigger": Trigger.CANCEL.value,
        "source": [*_EXECUTING, RunState.PAUSED],
        "dest": RunState.CANCELLED,
    },
    {
        "trigger": Trigger.CONTINUE.value,
        "source": RunState.PAUSED,
        "dest": RunState.CONTINUED,
        "unless": "admin_pending",
    },
    # Deleting a run (with its session): a paused run is cancelled in the same step, a final
    # run is removed as it is; an executing run has no such transition (409).
    {"trigger": Trigger.DELETE.value, "source": RunState.PAUSED, "dest": RunState.CANCELLED},
    {"trigger": Trigger.DELETE.value, "source": sorted(FINAL_STATES), "dest": None},
    # Internal transitions (dest None): the state stays, but the machine still says whether
    # the run may take this write at all.
    {"trigger": Trigger.RESOLVE_APPROVAL.value, "source": RunState.PAUSED, "dest": None},
    {"trigger": Trigger.CHECKPOINT.value, "source": _EXECUTING, "dest": None},
]


@dataclass
class RunFacts:
    """What the machine needs to know of a run: its state and its admin guard."""

    state: RunState
    admin_pending: bool = False


def _build_machine() -> Machine:
    return Machine(
        model=None,
        states=RunState,
        transitions=TRANSITIONS,
        initial=RunState.RUNNING,
        auto_transitions=False,
        send_event=False,
    )


MACHINE = _build_machine()


def decide(state: RunState, trigger: Trigger, *, admin_pending: bool = False) -> RunState:
    """Return the state `trigger` moves a run to, or raise why it may not.

    Raises `InvalidTransition` when the state has no such transition and `ApprovalPending`
    when the admin_pending guard holds it. This is the only place either is decided.

    The machine's answer depends on these three inputs alone (it is shared, holds no run,
    and its callbacks have no side effects), so each answer is asked of it once and kept:
    every write of every run decides, and transitions' trigger costs tens of microseconds.
    """
    outcome = _ANSWERS.get((state, trigger, admin_pending))
    if outcome is None:
        outcome = _ANSWERS[(state, trigger, admin_pending)] = _ask(state, trigger,
                                                                   admin_pending)
    if outcome is InvalidTransition:
        raise InvalidTransition(state, trigger.value)
    if outcome is ApprovalPending:
        raise ApprovalPending()
    return outcome


_ANSWERS: dict[tuple[RunState, Trigger, bool], Any] = {}


def _ask(state: RunState, trigger: Trigger, admin_pending: bool) -> Any:
    """The machine's own answer: the state it moves to, or the refusal's exception class."""
    facts = RunFacts(state=state, admin_pending=admin_pending)
    try:
        moved = MACHINE.events[trigger.value].trigger(facts)
    except MachineError:
        return InvalidTransition
    if not moved:
        return ApprovalPending
    return facts.state
