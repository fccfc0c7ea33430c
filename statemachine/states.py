"""Run states, their wire values, and the triggers that move a run between them."""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    """Internal run state; `wire_status` is what clients see in `status`."""

    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    CONTINUED = "CONTINUED"
    COMPLETED = "COMPLETED"
    ERRORED = "ERRORED"
    CANCELLED = "CANCELLED"

    @property
    def wire_status(self) -> str:
        return _WIRE_STATUS[self]

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES

    @property
    def is_executing(self) -> bool:
        return self in EXECUTING_STATES

    @property
    def already_sentence(self) -> str:
        """The 409 sentence for a trigger that this state does not accept."""
        return f"run is already {_ALREADY_WORD[self]}"


class Trigger(StrEnum):
    """Every event that can move a run; the machine's transition table is keyed by these."""

    PAUSE = "pause"
    COMPLETE = "complete"
    FAIL = "fail"
    CANCEL = "cancel"
    CONTINUE = "continue"
    RESOLVE_APPROVAL = "resolve_approval"
    CHECKPOINT = "checkpoint"
    DELETE = "delete"


_WIRE_STATUS = {
    RunState.RUNNING: "RUNNING",
    RunState.PAUSED: "PAUSED",
    RunState.CONTINUED: "RUNNING",
    RunState.COMPLETED: "COMPLETED",
    RunState.ERRORED: "ERROR",
    RunState.CANCELLED: "CANCELLED",
}

_ALREADY_WORD = {
    RunState.RUNNING: "running",
    RunState.PAUSED: "paused",
    RunState.CONTINUED: "continued",
    RunState.COMPLETED: "completed",
    RunState.ERRORED: "errored",
    RunState.CANCELLED: "cancelled",
}

FINAL_STATES = frozenset({RunState.COMPLETED, RunState.ERRORED, RunState.CANCELLED})
EXECUTING_STATES = frozenset({RunState.RUNNING, RunState.CONTINUED})

WIRE_STATUSES = ("RUNNING", "PAUSED", "COMPLETED", "ERROR", "CANCELLED")


def states_for_wire_status(status: str) -> frozenset[RunState]:
    """The internal states that a client's `status` filter value stands for."""
    return frozenset(state for state, wire in _WIRE_STATUS.items() if wire == status)
