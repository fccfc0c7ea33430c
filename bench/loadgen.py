"""Load generators for `make bench`: wrk for plain requests, a Python client for streams.

wrk (C, epoll) holds N keep-alive connections and is far from being the bottleneck: the bare
endpoint's figure, measured with it in the same run, shows the ceiling. Streams need their
events read one by one (time to first event, time to the end), which wrk cannot report, so a
small threaded client on `http.client` reads them; its own ceiling is printed beside its
figures (the bare endpoint driven by it), so a reader can tell which side was the limit.
"""

from __future__ import annotations

import http.client
import json
import shutil
import statistics
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, script: str, connections: int, seconds: float) -> dict:
    """Drive `url` with wrk for `seconds` with `connections` connections; the script's JSON."""
    threads = max(1, min(2, connections))
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "30s",
         "-s", str(BENCH / script), url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout
    line = next(row for row in out.splitlines() if row.startswith("{"))
    return json.loads(line)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


@dataclass
class StreamTimes:
    """Per streamed request: seconds to the first event and to the terminal event."""

    first: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    failures: int = 0

    def summary(self) -> dict:
        ms = 1000
        return {
            "requests": len(self.end), "failures": self.failures,
            "first_event_p50_ms": round(statistics.median(self.first) * ms, 2)
            if self.first else None,
            "end_p50_ms": round(statistics.median(self.end) * ms, 2) if self.end else None,
            "end_p95_ms": round(percentile(self.end, 0.95) * ms, 2),
            "end_p99_ms": round(percentile(self.end, 0.99) * ms, 2),
        }


def _read_stream(response: http.client.HTTPResponse, started: float, times: StreamTimes,
                 lock: threading.Lock) -> dict:
    """Read SSE events until a terminal one; record the timings; return the last data."""
    first, data = None, {}
    for raw in iter(response.readline, b""):
        if raw.startswith(b"data: "):
            if first is None:
                first = time.perf_counter() - started
            data = json.loads(raw[6:])
            if data.get("event") in ("RunPaused", "RunCompleted", "RunError", "RunCancelled"):
                break
    response.read()  # the rest of the chunked body, so the connection can be kept
    with lock:
        times.first.append(first or 0.0)
        times.end.append(time.perf_counter() - started)
    return data


def _post(conn: http.client.HTTPConnection, path: str, form: dict[str, str]):
    conn.request("POST", path, urllib.parse.urlencode(form), FORM)
    return conn.getresponse()


def streamed_pairs(host: str, port: int, concurrency: int, seconds: float) -> dict:
    """Streamed create then streamed continue of confirm-agent runs, per client thread."""
    times, lock = StreamTimes(), threading.Lock()
    deadline = time.perf_counter() + seconds
    pairs = [0]

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while time.perf_counter() < deadline:
            try:
                started = time.perf_counter()
                paused = _read_stream(_post(conn, "/agents/confirm-agent/runs",
                                            {"message": "bench", "stream": "true"}),
                                      started, times, lock)
                tools = json.dumps([{"tool_call_id": paused["tools"][0]["tool_call_id"],
                                     "confirmed": True}])
                started = time.perf_counter()
                path = f"/agents/confirm-agent/runs/{paused['run_id']}/continue"
                done = _read_stream(_post(conn, path, {"tools": tools, "stream": "true"}),
                                    started, times, lock)
                ok = done.get("event") == "RunCompleted"
            except (OSError, http.client.HTTPException, KeyError, ValueError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
            with lock:
                if ok:
                    pairs[0] += 1
                else:
                    times.failures += 1
        conn.close()

    began = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(seconds + 120)
    elapsed = time.perf_counter() - began
    return {"pairs_per_second": round(pairs[0] / elapsed, 1),
            "requests_per_second": round(len(times.end) / elapsed, 1), **times.summary()}


def python_client_ceiling(host: str, port: int, concurrency: int, seconds: float) -> float:
    """Requests/s that this Python client reaches against the bare endpoint."""
    count, lock = [0], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        done = 0
        while time.perf_counter() < deadline:
            _post(conn, "/echo", {"message": "bench", "stream": "false"}).read()
            done += 1
        conn.close()
        with lock:
            count[0] += done

    began = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(seconds + 60)
    return round(count[0] / (time.perf_counter() - began), 1)
