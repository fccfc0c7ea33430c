"""Domain errors of the run lifecycle; `app/errors.py` maps each to one HTTP answer."""

from __future__ import annotations

from statemachine.states import RunState


class LifecycleError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidTransition(LifecycleError):
    """The machine has no transition for this trigger from the run's state (HTTP 409)."""

    def __init__(self, state: RunState, trigger: str) -> None:
        super().__init__(state.already_sentence)
        self.state = state
        self.trigger = trigger

    @property
    def sentence(self) -> str:
        return self.state.already_sentence


class ApprovalPending(LifecycleError):
    """The transition exists but the admin_pending guard holds it (HTTP 403)."""

    sentence = "This run requires admin approval before it can be continued"


class StaleRun(LifecycleError):
    """A compare-and-set lost: the run's version moved since it was read. Re-read and re-decide."""


class RunNotFound(LifecycleError):
    """No such run in the store."""


class ApprovalNotFound(LifecycleError):
    """No such approval in the store."""


class ApprovalAlreadyResolved(LifecycleError):
    """A compare-and-set on an approval's status found it no longer pending."""

    def __init__(self, status: str) -> None:
        super().__init__(f"Approval is already '{status}' and cannot be resolved")
        self.status = status


class ApprovalStillPending(LifecycleError):
    """Deleting a pending approval would unblock its run, so it is refused."""

    def __init__(self) -> None:
        super().__init__("Approval is pending and cannot be deleted")


class StoreUnavailable(LifecycleError):
    """The store could not be reached or was locked past its timeout (HTTP 503)."""


class SessionNotFound(LifecycleError):
    """No such session in the store (or not one the caller may see)."""


class SessionExists(LifecycleError):
    """A session with this id is already stored; creating it again would overwrite it."""


class SessionOwnedElsewhere(LifecycleError):
    """A run named a session that belongs to another user; joining it would leak the run."""
