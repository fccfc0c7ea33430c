"""Benchmark: how many open streams one instance holds, per concurrency model, and at what cost.

For each worker class (gthread, gevent) it starts gunicorn (2 workers; gthread with
GUNICORN_THREADS threads each) on a private Redis, opens STREAMS streamed creates on an agent
whose model thinks for HOLD seconds (opened at RATE a second), and while they are open probes
`/health` from a second client. It prints, per class: the streams that got their headers and
the ones that got a `: ping`, /health latency (p50, max, and probes that failed within 2 s),
and the workers' memory (RSS, idle and while holding the streams, per worker and per stream).
`--sqlite DIR` measures the embedded store instead of Redis.

    python -m bench.open_streams [--streams 1000] [--hold 20] [--rate 200] [--threads 8]
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
import urllib.parse
from pathlib import Path

import requests

from tests.rawhttp import close_all, pump, ramp, request_bytes
from tests.servers import Gunicorn, RedisServer


def rss_kb(pids: list[int]) -> list[int]:
    """The current resident set of each process, in KiB."""
    sizes = []
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        sizes.append(next(int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("VmRSS:")))
    return sizes


class Prober(threading.Thread):
    """GET /health every 0.25 s; a probe that takes over 2 s counts as failed."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.latencies, self.failed = url, [], 0
        self.at: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                requests.get(f"{self.url}/health", timeout=2).raise_for_status()
                self.latencies.append(time.monotonic() - started)
                self.at.append(started)
            except requests.RequestException:
                self.failed += 1
            self.stop.wait(0.25)


def measure(worker_class: str, redis: RedisServer, args: argparse.Namespace) -> dict:
    store = ({"AGENTOS_DB": f"{args.sqlite}/bench{time.monotonic_ns()}.db"} if args.sqlite
             else {"REDIS_URL": redis.url, "REDIS_KEY_PREFIX": f"bench{time.monotonic_ns()}"})
    env = {**store, "AGENTOS_AGENTS": "tests.load_agents:agents",
           "GUNICORN_WORKER_CLASS": worker_class, "SLOW_MODEL_MS": str(int(args.hold * 1000)),
           "STREAM_PING_SECONDS": str(args.ping)}
    server = Gunicorn(env, workers=2, threads=args.threads).start()
    try:
        idle = rss_kb(server.worker_pids())
        body = urllib.parse.urlencode({"message": "think"}).encode()
        payload = request_bytes("POST", "/agents/slow-agent/runs", body)
        streams: list = []
        prober = Prober(server.url)
        prober.start()
        ramp_ends = time.monotonic() + args.streams / args.rate
        holding: list[int] = []
        sample_at = time.monotonic() + args.streams / args.rate + args.ping + 1

        def until(exchanges: list) -> bool:
            if not holding and time.monotonic() >= sample_at:
                holding.extend(rss_kb(server.worker_pids()))
            return time.monotonic() >= sample_at + 1

        pump(streams, until=until, timeout=args.hold + 10,
             feed=ramp(server.port, payload, args.streams, args.rate))
        prober.stop.set()
        prober.join(5)
        figures = _figures(worker_class, args, streams, prober, idle, holding)
        held = [t for t, at in zip(prober.latencies, prober.at, strict=True) if at > ramp_ends]
        figures["/health max ms, all open"] = round(max(held, default=float("nan")) * 1000, 1)
        return figures
    finally:
        close_all(streams)
        server.stop()


def _figures(worker_class, args, streams, prober, idle, holding) -> dict:
    headers = sum(1 for x in streams if x.headers_at is not None)
    pinged = sum(1 for x in streams if x.pings)
    latencies = sorted(prober.latencies) or [float("nan")]
    holding = holding or rss_kb([])
    grown = (sum(holding) - sum(idle)) / max(1, headers)
    return {
        "worker": worker_class if worker_class == "gevent" else f"gthread x{args.threads}",
        "streams opened": len(streams), "got headers": headers, "got : ping": pinged,
        "/health p50 ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "/health max ms": round(latencies[-1] * 1000, 1), "/health failed": prober.failed,
        "RSS idle MB/worker": round(sum(idle) / len(idle) / 1024, 1),
        "RSS holding MB/worker": round(sum(holding) / max(1, len(holding)) / 1024, 1),
        "KB per stream": round(grown, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--ping", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--classes", default="gthread,gevent")
    parser.add_argument("--sqlite", metavar="DIR", help="the embedded store, a file in DIR")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    redis = RedisServer().start()
    try:
        rows = [measure(name, redis, args) for name in args.classes.split(",")]
    finally:
        redis.stop()
    print(f"{args.streams} streams opened at {args.rate:g}/s, model thinking {args.hold:g} s, "
          f"ping every {args.ping:g} s, 2 workers")
    print(" | ".join(rows[0]))
    for row in rows:
        print(" | ".join(str(value) for value in row.values()))


if __name__ == "__main__":
    main()
