"""One deadline per request for store work: every store call of a request shares one budget.

`STORE_TIMEOUT_SECONDS` bounds a request's store work as a whole, retries and compare-and-set
rounds included, not each call: the app opens a budget when a request starts, and the stores'
guard wrappers consult it, refusing a call once it is spent and capping each socket read or
lock wait at what is left. Outside a budget (the executor, the sweep, a stream waiting for
events) each call keeps its own per-call timeout. A contextvar, so it is per thread under
gthread and per greenlet under gevent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

from statemachine.errors import StoreUnavailable

_deadline: ContextVar[float | None] = ContextVar("store_deadline", default=None)


class DeadlinePassed(StoreUnavailable):
    """The request's store budget is spent (HTTP 503 with Retry-After, like any outage)."""


def open_budget(seconds: float | None) -> Token:
    """Start a budget of `seconds` for this context; None means no budget (per-call bounds)."""
    return _deadline.set(None if seconds is None else time.monotonic() + seconds)


def close_budget(token: Token) -> None:
    _deadline.reset(token)


@contextmanager
def budget(seconds: float | None) -> Iterator[None]:
    """A budget for the block; `budget(None)` suspends the enclosing one (waits, not work)."""
    token = open_budget(seconds)
    try:
        yield
    finally:
        close_budget(token)


def remaining() -> float | None:
    """Seconds left in the current budget (negative once spent), or None outside one."""
    until = _deadline.get()
    return None if until is None else until - time.monotonic()


def check(store: str) -> float | None:
    """Refuse a store call once the budget is spent; else the seconds left (None: no budget)."""
    left = remaining()
    if left is not None and left <= 0:
        raise DeadlinePassed(f"{store}: the request's store deadline passed")
    return left


def cap(timeout: float | None) -> float | None:
    """`timeout` shortened to what is left of the budget (at least a millisecond)."""
    left = remaining()
    if left is None:
        return timeout
    left = max(0.001, left)
    return left if timeout is None else min(timeout, left)
