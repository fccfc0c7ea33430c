"""What one request costs Redis: commands, bytes written, memory kept, and flatness.

Each figure is read from Redis itself (INFO commandstats, INFO stats, MEMORY USAGE, MONITOR)
around requests sent to a live server, so it counts what the server really sends.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import requests

from statemachine import lua
from statemachine.redis_store import RedisRunStore
from statemachine.states import RunState
from statemachine.store import StoredRun


def create(base: str, agent: str = "confirm-agent", message: str = "bench") -> dict:
    answer = requests.post(f"{base}/agents/{agent}/runs",
                           data={"message": message, "stream": "false"}, timeout=120)
    answer.raise_for_status()
    return answer.json()


def confirm(base: str, run: dict) -> dict:
    tools = [{"tool_call_id": run["tools"][0]["tool_call_id"], "confirmed": True}]
    answer = requests.post(f"{base}/agents/confirm-agent/runs/{run['run_id']}/continue",
                           data={"tools": json.dumps(tools), "stream": "false"}, timeout=60)
    answer.raise_for_status()
    return answer.json()


class Monitor:
    """MONITOR in a thread: the commands clients send, apart from those scripts run."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.sent: Counter[str] = Counter()
        self.scripted: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: Any) -> None:
        time.sleep(0.2)
        self._stop.set()
        self.client.ping()  # wakes the listener so it sees the stop flag
        self._thread.join(5)

    def _listen(self) -> None:
        with self.client.monitor() as monitor:
            for entry in monitor.listen():
                if self._stop.is_set():
                    return
                name = entry["command"].split(" ", 1)[0].strip('"').upper()
                (self.scripted if entry.get("client_type") == "lua" else self.sent)[name] += 1


def round_trips(base: str) -> float:
    """The server's own count of commands and pipelines it sent to Redis (all workers)."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("agentos_redis_round_trips_total"))


def commands_per_request(base: str, client: redis.Redis, count: int = 50) -> dict:
    """Round trips (the server's count), client commands and commands run inside scripts,
    per create and per continue (both `stream=false`)."""
    runs = [create(base) for _ in range(3)]
    for run in runs:
        confirm(base, run)  # warm both paths
    before = round_trips(base)
    with Monitor(client) as created:
        runs = [create(base) for _ in range(count)]
    between = round_trips(base)
    with Monitor(client) as continued:
        for run in runs:
            confirm(base, run)
    after = round_trips(base)
    return {
        "create": _per(created, count, between - before),
        "continue": _per(continued, count, after - between),
    }


def _per(monitor: Monitor, count: int, trips: float) -> dict:
    return {
        "round_trips": round(trips / count, 2),
        "client_commands": round(sum(monitor.sent.values()) / count, 2),
        "by_command": {k: round(v / count, 2) for k, v in monitor.sent.most_common()},
        "inside_scripts": round(sum(monitor.scripted.values()) / count, 2),
    }


def bytes_per_delta(base: str, client: redis.Redis, words: tuple[int, ...]) -> list[dict]:
    """Bytes Redis received for one chat-agent answer of N deltas (one word per delta)."""
    rows = []
    for count in words:
        message = " ".join(f"w{i}" for i in range(count))
        before = client.info("stats")["total_net_input_bytes"]
        run = create(base, "chat-agent", message)
        received = client.info("stats")["total_net_input_bytes"] - before
        deltas = len(re.findall(r"\S+\s*", run["content"]))  # the scripted model's split
        rows.append({"deltas": deltas, "answer_bytes": len(run["content"].encode()),
                     "redis_bytes_in": received,
                     "bytes_per_delta": round(received / max(1, deltas), 1)})
    return rows


def run_memory(client: redis.Redis, prefix: str, run_ids: list[str]) -> dict:
    """MEMORY USAGE of all of each run's own keys, averaged, and their count."""
    totals = []
    for run_id in run_ids:
        keys = list(client.scan_iter(match=f"{prefix}:run:{{{run_id}}}*", count=100))
        totals.append(sum(client.memory_usage(key, samples=0) or 0 for key in keys))
    return {"runs": len(run_ids), "bytes_per_run_mean": round(statistics.mean(totals)),
            "bytes_per_run_max": max(totals)}


def memory_per_run(base: str, client: redis.Redis, prefix: str, count: int = 100) -> dict:
    """A run's keys at rest, paused and finished: measured once its bell (the stream that
    followers elsewhere block on, kept for `lua.BELL_MS` after a pause or an end) is gone;
    `just_paused` is the same runs right after their pause, the bell still there."""
    runs = [create(base) for _ in range(count)]
    ids = [r["run_id"] for r in runs]
    just_paused = run_memory(client, prefix, ids)
    time.sleep(lua.BELL_MS / 1000 + 0.5)
    paused = run_memory(client, prefix, ids)
    for run in runs:
        confirm(base, run)
    time.sleep(lua.BELL_MS / 1000 + 0.5)
    finished = run_memory(client, prefix, ids)
    return {"paused": paused, "finished": finished, "just_paused": just_paused}


def _stored_run(agent_id: str) -> StoredRun:
    """A finished demo run as the store holds one, for bulk loading."""
    now, run_id = time.time(), str(uuid.uuid4())
    doc = {"run_id": run_id, "agent_id": agent_id, "agent_name": agent_id,
           "session_id": str(uuid.uuid4()), "user_id": None, "content": "Echo: bulk",
           "content_type": "str", "model": "scripted-model", "model_provider": "Scripted",
           "created_at": int(now), "updated_at": int(now),
           "input": {"input_content": "bulk"},
           "messages": [{"role": "user", "content": "bulk", "created_at": int(now)},
                        {"role": "assistant", "content": "Echo: bulk",
                         "created_at": int(now)}],
           "tools": [], "metrics": {}, "session_state": {}}
    return StoredRun(run_id=run_id, agent_id=agent_id, session_id=doc["session_id"],
                     user_id=None, state=RunState.COMPLETED, version=1, created_at=now,
                     updated_at=now, doc=doc)


def bulk_load(url: str, prefix: str, total: int, threads: int = 8) -> float:
    """Store `total` finished runs through the store's own API; returns runs per second."""
    store = RedisRunStore(url, prefix=prefix, max_connections=threads * 2)
    event = {"event": "RunCompleted", "content": "Echo: bulk"}
    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: store.create_run(_stored_run("chat-agent"), [event]),
                          range(total), chunksize=256))
    finally:
        store.close()
    return round(total / (time.perf_counter() - began))


def continue_latency(base: str, count: int = 200) -> dict:
    """Sequential create+continue: the continue's latency percentiles in ms."""
    latencies = []
    for _ in range(count):
        run = create(base)
        began = time.perf_counter()
        confirm(base, run)
        latencies.append((time.perf_counter() - began) * 1000)
    ordered = sorted(latencies)
    return {"continues": count, "p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 2)}
