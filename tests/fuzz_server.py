"""Schema fuzzing: schemathesis against our own `/openapi.json` on a live server.

    python -m tests.fuzz_server --examples 300 [--seconds 600] [--seed 20240611]

Starts gunicorn (2 workers, the embedded SQLite store in a temporary directory, a security
key so the document's bearer scheme is enforced), runs `st run` on every operation of the
document, and exits non-zero when schemathesis reports a failure (a 5xx, a status, content
type, header or body the document does not describe, a request the server accepts without
valid credentials) or when the server logged an unhandled exception (a stream that broke
after its 200 would not show as a 5xx).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.servers import Gunicorn

KEY = "fuzz-security-key"
DEFAULT_SEED = 20240611
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "ignored_auth",
)
SERVER_ERRORS = ("Traceback (most recent call last)", "unhandled error",
                 "Error handling request")


@dataclass
class FuzzResult:
    returncode: int
    output: str
    server_errors: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.server_errors

    def summary(self) -> str:
        verdict = "passed" if self.ok else "FAILED"
        lines = [f"fuzz {verdict} in {self.seconds:.0f}s (schemathesis exit {self.returncode}, "
                 f"{len(self.server_errors)} unhandled server error(s))"]
        lines += [f"  server: {line}" for line in self.server_errors[:20]]
        return "\n".join(lines)


def server_env(directory: str) -> dict[str, str]:
    """The live server's settings: SQLite in `directory`, bearer key, no other auth mode."""
    return {"AGENTOS_DB": str(Path(directory) / "runs.db"), "REDIS_URL": "",
            "OS_SECURITY_KEY": KEY, "OS_ADMIN_KEY": "", "JWT_VERIFICATION_KEY": "",
            "PAUSE_TTL_SECONDS": "", "DEMO_TOOL_LOG": "", "GUNICORN_ACCESSLOG": ""}


def st_command(url: str, examples: int, seed: int, seconds: float | None) -> list[str]:
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
        "--checks", ",".join(CHECKS),
        "--header", f"Authorization: Bearer {KEY}",
        "--max-examples", str(examples),
        "--seed", str(seed),
        "--generation-database", "none",
        "--request-timeout", "20",
        "--workers", "2",
        "--no-color",
    ]
    if seconds is not None:
        command += ["--max-time", str(max(1, int(seconds)))]
    return command


def fuzz(examples: int, seconds: float | None = None, seed: int = DEFAULT_SEED,
         echo: bool = False) -> FuzzResult:
    """Fuzz a fresh live server; the outcome, schemathesis' report and the server's errors."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agentos-fuzz-") as directory:
        server = Gunicorn(env=server_env(directory), workers=2).start()
        try:
            output, code = _run(st_command(server.url, examples, seed, seconds), echo,
                                Path(directory))
        finally:
            log = server.log()
            server.stop()
    errors = [line for line in log.splitlines() if any(m in line for m in SERVER_ERRORS)]
    return FuzzResult(code, output, errors, time.monotonic() - started)


def _run(command: list[str], echo: bool, cwd: Path) -> tuple[str, int]:
    """Run schemathesis in `cwd` (its reports stay there), its output captured or echoed."""
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as process:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        return "".join(lines), process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300,
                        help="maximum test cases per API operation")
    parser.add_argument("--seconds", type=float, default=None,
                        help="time budget of the schemathesis run")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    result = fuzz(args.examples, args.seconds, args.seed, echo=True)
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
