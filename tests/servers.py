"""Real servers for tests: a private redis-server and gunicorn processes on free ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import requests

from app.config import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent


READY_LINE = re.compile(r"Worker ready \(pid: (\d+)\)")


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unavailable(reason: str, required_by: str = "REQUIRE_REDIS", *,
                module: bool = False) -> None:
    """Skip with `reason` (it says SKIPPED and what is missing), or fail with it where the
    environment variable `required_by` is set (REQUIRE_REDIS=1, CI=true: `.ci/run` sets both),
    so a test that can skip on a laptop never skips in CI. `module`: skip the whole module
    (called at import)."""
    import pytest

    if os.environ.get(required_by, "").strip().lower() in ("1", "true"):
        pytest.fail(reason.replace("SKIPPED", f"REQUIRED ({required_by}) but unavailable"),
                    pytrace=False)
    pytest.skip(reason, allow_module_level=module)


def no_redis(what: str) -> None:
    """Skip `what` loudly where no redis-server can be started, or fail it when
    REQUIRE_REDIS=1 (CI): a Redis test may never skip there."""
    unavailable(f"{what} tests SKIPPED: no redis-server binary on PATH")


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it is truthy; fail loudly after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class RedisServer:
    """A private redis-server on a free port, with no persistence."""

    port: int = field(default_factory=free_port)
    persistent: bool = False
    process: subprocess.Popen | None = None
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="redis-test-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server")
        durability = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent \
            else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *durability, "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, what="redis-server to answer")
        return self

    def halt(self) -> None:
        """Stop the server but keep its data directory (a persistent one restarts with it)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        try:
            self.halt()
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Gunicorn:
    """`gunicorn -c gunicorn.conf.py wsgi:app` with its own environment, on a free port.

    The server's settings come from `env` alone: none is inherited from the test process (a
    CI's REDIS_URL must not turn an embedded-store server into one on the shared Redis).
    With `netns` it runs inside that network namespace (another "host"), bound to `host`.
    `root` is the checkout it serves (`bench.ab` serves two).
    """

    env: dict[str, str]
    workers: int = 2
    threads: int = 8
    app_spec: str = "wsgi:app"
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    netns: str | None = None
    root: Path = ROOT
    process: subprocess.Popen | None = None
    log_path: str = field(default_factory=lambda: tempfile.mktemp(prefix="gunicorn-",
                                                                   suffix=".log"))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30) -> Gunicorn:
        inherited = {k: v for k, v in os.environ.items() if k not in DEFAULTS}
        env = {**inherited, **self.env, "HOST": self.host, "PORT": str(self.port),
               "WEB_CONCURRENCY": str(self.workers), "GUNICORN_THREADS": str(self.threads)}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.process = subprocess.Popen(
            [*inside, sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", self.app_spec],
            cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(self._healthy, timeout, what=f"gunicorn on {self.url}")
            if env.get("LOG_LEVEL", "info").lower() in ("debug", "info"):  # else no ready line
                wait_until(self._all_workers_ready, timeout,
                           what=f"{self.workers} workers ready")
        except BaseException:
            self.stop()
            raise
        return self

    def _raise_if_exited(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited; log:\n{self.log()}")

    def _healthy(self) -> bool:
        self._raise_if_exited()
        try:
            return requests.get(f"{self.url}/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def _all_workers_ready(self) -> bool:
        """Every worker has loaded the app (gunicorn.conf.py's post_worker_init says so).

        /health answers as soon as one worker does. On the one listening socket the workers
        share, connections opened meanwhile all go to that worker and stay there (a load
        generator's keep-alive connections: one worker did 98% of the work in 1 of 4 runs)."""
        self._raise_if_exited()
        return len(set(READY_LINE.findall(self.log()))) >= self.workers

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The worker processes (children of the master)."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True,
                             text=True, check=False).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
        Path(self.log_path).unlink(missing_ok=True)
