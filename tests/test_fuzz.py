"""A short, bounded run of the schema fuzzer inside `make test` (`make fuzz` runs the long one).

The same code as `python -m tests.fuzz_server`: schemathesis against `/openapi.json` of a live
gunicorn server, every operation, every check but the two that judge input validation.
"""

from __future__ import annotations

import pytest

from tests.fuzz_server import fuzz

EXAMPLES = 25
SECONDS = 30

pytestmark = pytest.mark.slow


def test_no_answer_is_a_5xx_or_off_the_document():
    result = fuzz(EXAMPLES, SECONDS)
    assert result.ok, f"{result.summary()}\n{result.output[-20_000:]}"
