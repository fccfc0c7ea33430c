"""Benchmark: continues per second and their latency, on real gunicorn, on both stores.

Starts its own servers (a private redis-server unless REDIS_URL is set, and gunicorn with
WORKERS workers), creates RUNS paused confirm-agent runs, then continues them all with
CONCURRENCY client threads (stream=false, so each answer waits for the run to complete), and
prints throughput, latency percentiles and the peak RSS of the workers. Then it fires two
simultaneous continues at each of RACE runs and counts winners (must be exactly one each).

    python -m bench.continue_throughput [--runs 400] [--concurrency 16] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import requests

from tests.servers import Gunicorn, RedisServer


def _session_pool(size: int) -> list[requests.Session]:
    return [requests.Session() for _ in range(size)]


def create_paused(base: str, count: int, threads: int) -> list[dict]:
    def one(_: int) -> dict:
        answer = requests.post(f"{base}/agents/confirm-agent/runs",
                               data={"message": "bench", "stream": "false"}, timeout=30)
        answer.raise_for_status()
        return answer.json()

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


def continue_form(run: dict) -> dict[str, str]:
    tools = [{"tool_call_id": run["tools"][0]["tool_call_id"], "confirmed": True}]
    return {"tools": json.dumps(tools), "stream": "false"}


def timed_continues(base: str, runs: list[dict], concurrency: int) -> tuple[list[float], float]:
    local = threading.local()

    def one(run: dict) -> float:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        started = time.perf_counter()
        answer = session.post(f"{base}/agents/confirm-agent/runs/{run['run_id']}/continue",
                              data=continue_form(run), timeout=60)
        elapsed = time.perf_counter() - started
        assert answer.status_code == 200 and answer.json()["status"] == "COMPLETED", answer.text
        return elapsed

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, runs))
    return latencies, time.perf_counter() - began


def race(base: str, runs: list[dict]) -> tuple[int, int]:
    """Two continues per run at once; returns (runs with exactly one winner, total runs)."""

    def pair(run: dict) -> int:
        barrier = threading.Barrier(2)
        codes: list[int] = []

        def fire() -> None:
            barrier.wait(5)
            codes.append(requests.post(
                f"{base}/agents/confirm-agent/runs/{run['run_id']}/continue",
                data=continue_form(run), timeout=60).status_code)

        threads = [threading.Thread(target=fire) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return int(sorted(codes) == [200, 409])

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(pair, runs)), len(runs)


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        total += next(int(line.split()[1]) for line in status.splitlines()
                      if line.startswith("VmHWM:"))
    return total / 1024


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def bench_store(label: str, env: dict[str, str], args: argparse.Namespace) -> dict:
    server = Gunicorn(env=env, workers=args.workers, threads=args.threads).start()
    try:
        runs = create_paused(server.url, args.runs + args.race, 16)
        latencies, seconds = timed_continues(server.url, runs[:args.runs], args.concurrency)
        winners, raced = race(server.url, runs[args.runs:])
        figures = {
            "store": label,
            "continues": len(latencies),
            "per_second": round(len(latencies) / seconds, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p95_ms": round(percentile(latencies, 0.95) * 1000, 1),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
            "race_exactly_one_winner": f"{winners}/{raced}",
            "workers_peak_rss_mb": round(rss_mb(server.worker_pids()), 1),
        }
    finally:
        server.stop()
    print(json.dumps(figures))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--race", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    print(f"# {args.runs} continues, {args.concurrency} client threads, gunicorn "
          f"{args.workers} workers x {args.threads} threads, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as folder:
        bench_store("sqlite", {"AGENTOS_DB": f"{folder}/bench.db"}, args)
    url, private = os.environ.get("REDIS_URL"), None
    if not url:
        private = RedisServer().start()
        url = private.url
    prefix = f"agentos-bench-{uuid.uuid4().hex[:8]}"
    try:
        bench_store("redis", {"REDIS_URL": url, "REDIS_KEY_PREFIX": prefix}, args)
    finally:
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()
        if private:
            private.stop()


if __name__ == "__main__":
    main()
