"""A small mutation check of the lines that keep runs correct: does the suite notice each one?

Each mutation replaces one exact piece of source text in a copy of the tree and runs the
tests that guard it there; a mutation is killed when they fail. By hand:

    .venv/bin/python -m tests.mutations            # every mutation, a table of outcomes
    .venv/bin/python -m tests.mutations lease-sql  # some of them, by name

It exits 1 when a mutation that must be killed survived. `test_mutations.py` (marker `long`)
runs it after `make test`. The copy holds no `.venv`: the tests there run with this
interpreter, importing the copy's code (pytest puts the copy's root first on the path).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # seconds for one mutation's tests
IGNORED = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.db", "*.db-*", ".hypothesis",
                                 ".schemathesis", "*.egg-info", ".ruff_cache")


@dataclass(frozen=True)
class Mutation:
    """Replace `old` (which must occur exactly once in `path`) with `new`, run `tests`."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    may_survive: str = ""  # why a survivor is known and accepted (empty: it must be killed)
    select: tuple[str, ...] = field(default_factory=tuple)  # extra pytest arguments


RACE = "tests/test_race.py"
CONTRACT = "tests/test_store_contract.py"
CONTENTION = "tests/test_contention.py"
RETENTION = (CONTRACT, "tests/test_resilience.py")
PURGE = "def purge_finished(self, before: float) -> int:"
PURGE_RETURNS_0 = (f"{PURGE}\n        return 0\n\n"
                   "    def _purge_unmutated(self, before: float) -> int:")

MUTATIONS = [
    Mutation("version-compare-lua", "statemachine/lua.py",
             "if tonumber(v) ~= tonumber(ARGV[1]) then return {-2} end\nif ARGV[16]",
             "if false then return {-2} end\nif ARGV[16]", (CONTRACT, RACE),
             select=("-k", "redis")),
    Mutation("version-compare-sql", "statemachine/sqlite_store.py",
             'if row["version"] != commit.expected_version:', "if False:", (CONTRACT, RACE),
             select=("-k", "sqlite")),
    Mutation("version-compare-lua-race-only", "statemachine/lua.py",
             "if tonumber(v) ~= tonumber(ARGV[1]) then return {-2} end\nif ARGV[16]",
             "if false then return {-2} end\nif ARGV[16]", (RACE,), select=("-k", "redis")),
    Mutation("version-compare-sql-race-only", "statemachine/sqlite_store.py",
             'if row["version"] != commit.expected_version:', "if False:", (RACE,),
             select=("-k", "sqlite")),
    Mutation("admin-guard", "statemachine/machine.py", '"unless": "admin_pending",', "",
             ("tests/test_machine.py", "tests/test_approvals.py")),
    Mutation("idempotency-fingerprint", "app/runtime/service.py",
             'if remembered["fingerprint"] != idempotency.fingerprint:', "if False:",
             ("tests/test_resilience.py",)),
    Mutation("lease-lua", "statemachine/lua.py",
             "if (not lease) or lease > tonumber(ARGV[16]) then return {-2} end",
             "if false then return {-2} end", (CONTENTION,), select=("-k", "redis")),
    Mutation("lease-sql", "statemachine/sqlite_store.py",
             'row["lease_until"] is None or row["lease_until"] > commit.lease_lapsed_by',
             "False", (CONTENTION,), select=("-k", "sqlite")),
    Mutation("lease-in-sweep-commit", "app/runtime/service.py",
             'self._end(run, Trigger.FAIL, "RunError", lease_lapsed_by=now,',
             'self._end(run, Trigger.FAIL, "RunError", lease_lapsed_by=None,', (CONTENTION,)),
    # Settling a lapsed lease late: a lost worker's run must still end. (Settling it early,
    # `<= now + 60`, survives on purpose: the commit compares the lease again and refuses.)
    Mutation("lease-settle", "app/runtime/service.py",
             "run.state.is_executing and run.lease_until and run.lease_until <= now)",
             "run.state.is_executing and run.lease_until and run.lease_until <= now - 3600)",
             (CONTENTION,)),
    # A continue that believes its process's kept copy of a pause when the copy refuses: a
    # decision an admin made since (elsewhere, or here) would be answered 403.
    Mutation("kept-copy-refusal-believed", "app/runtime/service.py",
             "except (InvalidTransition, ApprovalPending, ToolInputError, StaleRun, RunNotFound):",
             "except (StaleRun, RunNotFound):",
             ("tests/test_hot_path.py", "tests/test_approvals.py")),
    Mutation("active-count", "app/runtime/executor.py", "if left > 0:", "if False:",
             (CONTENTION,)),
    Mutation("cancel-honoured", "app/runtime/session.py", "commit.honour_cancel = True",
             "commit.honour_cancel = False", (CONTENTION, "tests/test_resilience.py")),
    Mutation("purge-redis", "statemachine/redis_store.py", PURGE, PURGE_RETURNS_0, RETENTION,
             select=("-k", "redis"),
             may_survive="until work-14 lands its retention test, only the store contract's "
                         "purge test guards this"),
    Mutation("purge-sql", "statemachine/sqlite_store.py", PURGE, PURGE_RETURNS_0, RETENTION,
             select=("-k", "sqlite")),
]


def apply(copy: Path, mutation: Mutation) -> None:
    target = copy / mutation.path
    text = target.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"{mutation.name}: expected the text once in {mutation.path}, "
                         f"found it {count} times (the source moved: update the mutation)")
    target.write_text(text.replace(mutation.old, mutation.new))


def run_one(mutation: Mutation) -> tuple[bool, float, str]:
    """(killed, seconds, last line of pytest's output) for one mutation, in a fresh copy."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        copy = Path(tmp) / "tree"
        shutil.copytree(ROOT, copy, ignore=IGNORED)
        apply(copy, mutation)
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly",
                   *mutation.select, *mutation.tests]
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=copy, capture_output=True, text=True,
                                  timeout=TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return True, time.monotonic() - started, f"timed out after {TIMEOUT}s (killed)"
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        summary = lines[-1] if lines else done.stderr.strip()[-200:]
        if done.returncode in (4, 5):  # usage error, nothing collected: not a kill
            raise SystemExit(f"{mutation.name}: pytest could not run: {summary}")
        return done.returncode != 0, time.monotonic() - started, summary


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    unknown = set(names) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutations: {sorted(unknown)}")
    failures = 0
    print(f"{'mutation':30} {'outcome':9} {'seconds':>7}  tests")
    for mutation in chosen:
        killed, seconds, summary = run_one(mutation)
        outcome = "killed" if killed else "SURVIVED"
        print(f"{mutation.name:30} {outcome:9} {seconds:7.1f}  {summary}", flush=True)
        if not killed:
            if mutation.may_survive:
                print(f"{'':30} accepted: {mutation.may_survive}")
            else:
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
