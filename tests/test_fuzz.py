"""A short, bounded run of the schema fuzzer inside `make test` (`make fuzz` runs the long one).

The same code as `python -m tests.fuzz_server`: schemathesis against `/openapi.json` of a live
gunicorn server, every operation, every check but the two that judge input validation. Only
the seeded examples and fuzzing phases run here, so what is reached within the time bound does
not depend on how busy the machine is; `make fuzz` runs every phase.
"""

from __future__ import annotations

import pytest

from tests.fuzz_server import fuzz

EXAMPLES = 25
SECONDS = 30
PHASES = ("examples", "fuzzing")

pytestmark = pytest.mark.slow


def test_no_answer_is_a_5xx_or_off_the_document():
    result = fuzz(EXAMPLES, SECONDS, phases=PHASES)
    assert result.ok, f"{result.summary()}\n{result.output[-20_000:]}"
