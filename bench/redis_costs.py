"""What one request costs Redis: commands, bytes written, memory kept, and flatness.

Each figure is read from Redis itself (INFO commandstats, INFO stats, MEMORY USAGE, MONITOR)
around requests sent to a live server, so it counts what the server really sends.
"""

from __future__ import annotations

import json
import os
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


def _stored_run(agent_id: str, paused: bool = False) -> StoredRun:
    """A finished demo run as the store holds one, for bulk loading; with `paused`, one
    waiting for its tool's confirmation (in the `paused` index, as a real pause is)."""
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
    if paused:
        doc["tools"] = [{"tool_call_id": f"call-{run_id[:8]}", "tool_name": "deploy",
                         "tool_args": {"target": "bulk"}, "requires_confirmation": True}]
    return StoredRun(run_id=run_id, agent_id=agent_id, session_id=doc["session_id"],
                     user_id=None, state=RunState.PAUSED if paused else RunState.COMPLETED,
                     version=1, created_at=now, updated_at=now, doc=doc,
                     paused_at=now if paused else None)


BULK_AGENTS = ("chat-agent", "confirm-agent")
PAUSED_EVERY = 20
"""One bulk-loaded run in PAUSED_EVERY is a paused confirm-agent run (5%), the rest finished
runs split between the two demo agents, so the continued agent's own indexes grow too."""


def _bulk_batch(start: int, count: int) -> list[tuple[StoredRun, list[dict]]]:
    finished = {"event": "RunCompleted", "content": "Echo: bulk"}
    paused = {"event": "RunPaused", "content": ""}
    batch = []
    for i in range(start, start + count):
        if i % PAUSED_EVERY == 0:
            batch.append((_stored_run("confirm-agent", paused=True), [paused]))
        else:
            batch.append((_stored_run(BULK_AGENTS[i % 2]), [finished]))
    return batch


def bulk_load(url: str, prefix: str, total: int, threads: int = 4, batch: int = 500) -> dict:
    """Store `total` runs through the store's own API (`bulk_create`, `batch` runs per
    pipeline, from `threads` threads); the load rate and Redis's memory after it."""
    store = RedisRunStore(url, prefix=prefix, max_connections=threads * 2)
    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda start: store.bulk_create(
                _bulk_batch(start, min(batch, total - start))), range(0, total, batch)))
        seconds = time.perf_counter() - began
        memory = store.redis.info("memory")
        keys = store.redis.dbsize()
    finally:
        store.close()
    return {"runs_loaded": total, "load_seconds": round(seconds, 1),
            "bulk_load_runs_per_second": round(total / seconds) if seconds else 0,
            "redis_keys": keys, "used_memory_mb": round(memory["used_memory"] / 2**20, 1)}


def _busy_jiffies() -> int | None:
    """CPU time (jiffies) all processes on the machine have used, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return None
    return sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait


def _redis_usec(client: redis.Redis) -> int:
    return sum(row["usec"] for row in client.info("commandstats").values())


def pair_latencies(base: str, count: int) -> list[float]:
    """`count` sequential create+continue pairs; each continue's latency in ms."""
    latencies = []
    for _ in range(count):
        run = create(base)
        start = time.perf_counter()
        confirm(base, run)
        latencies.append((time.perf_counter() - start) * 1000)
    return latencies


def continue_latency(servers: list[tuple[str, redis.Redis]], rounds: int = 4,
                     count: int = 150, warmup: int = 20) -> list[dict]:
    """Sequential create+continue against each (server URL, its Redis) in turn, `rounds`
    times `count` pairs each after `warmup` unmeasured pairs: the continue's latency
    percentiles in ms per server, each round's p50, what Redis itself spent per pair (INFO
    commandstats, background sweeps included) and how busy the whole machine was, in cores.

    The servers take turns (the order reversed every other round), so whatever else the
    machine does meanwhile (others' processes, a hypervisor's steal) weighs on all of them
    alike. Measured one after the other instead, such noise alone put the p50 with 1,000
    stored runs at 23 ms in one run and 14 ms in the next, on a 2-core machine."""
    for base, _ in servers:
        for _ in range(warmup):
            confirm(base, create(base))
    latencies: list[list[float]] = [[] for _ in servers]
    round_p50s: list[list[float]] = [[] for _ in servers]
    usec = [_redis_usec(client) for _, client in servers]
    jiffies, began = _busy_jiffies(), time.perf_counter()
    for turn in range(rounds):
        order = list(range(len(servers)))
        for i in order[::-1] if turn % 2 else order:
            mine = pair_latencies(servers[i][0], count)
            round_p50s[i].append(round(statistics.median(mine), 2))
            latencies[i] += mine
    seconds, after = time.perf_counter() - began, _busy_jiffies()
    busy = {} if jiffies is None or after is None else {
        "machine_cores_busy": round((after - jiffies) / os.sysconf("SC_CLK_TCK") / seconds, 2)}
    rows = []
    for i, (_, client) in enumerate(servers):
        ordered = sorted(latencies[i])
        rows.append({"continues": len(ordered), "p50_ms": round(statistics.median(ordered), 2),
                     "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 2),
                     "round_p50_ms": round_p50s[i],
                     "redis_usec_per_pair": round((_redis_usec(client) - usec[i])
                                                  / len(ordered), 1), **busy})
    return rows
