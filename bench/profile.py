"""`make profile`: where a worker's time goes in the create+continue loop under load.

Starts a private redis-server and our server (gunicorn, 2 workers, as `make bench` does),
drives it with wrk (bench/create_continue.lua) and meanwhile records one worker with py-spy
in its raw (collapsed) format, then prints the CPU time per request of the workers and of
Redis over wrk's run (from /proc), and the top functions by self time (the sampled frame
itself), by package, and by total time (the frame anywhere on the stack), as shares of the
samples that were working (idle threadpool threads and the event loop's wait are counted
apart).

    python -m bench.profile [--seconds 20] [--connections 16] [--top 15] [--store redis]
                            [--keep /tmp/profile.txt]

Needs wrk and py-spy (`pip install py-spy`), and the right to ptrace the worker (root, or
kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from bench import loadgen
from bench.hot_path import redis_env, serving
from tests.servers import ROOT, RedisServer

WARMUP_SECONDS = 2.0
IDLE_LEAVES = frozenset({
    "gevent/_threading.py:acquire_with_timeout",  # a threadpool thread waiting for work
    "gevent/hub.py:Hub.run",  # the event loop waiting in epoll (no greenlet runnable)
})
"""Leaves of samples that wait rather than work; they are counted apart, not ranked."""


def frame_name(frame: str) -> str:
    """`function (path/to/file.py:line)` -> `file.py:function` (the line is dropped)."""
    function, _, where = frame.rpartition(" (")
    if not function:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    if not ours(frame):
        path = "/".join(Path(path).parts[-2:])
    return f"{path}:{function}"


def ours(frame: str) -> bool:
    """A frame of this project's code (app/ or statemachine/), not a library's."""
    where = frame.rpartition(" (")[2]  # py-spy shows this project's files relative to it
    return where.startswith(("app/", "statemachine/", f"{ROOT}/app/",
                             f"{ROOT}/statemachine/"))


def parse_collapsed(text: str) -> tuple[Counter[str], Counter[str], int, int]:
    """Self and total sample counts per function from `frame;frame;...;leaf count` lines,
    the number of working samples they count, and the number of idle ones left out."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = idle = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if frames[-1] in IDLE_LEAVES:
            idle += n
            continue
        samples += n
        own[frames[-1]] += n
        for name in set(frames):  # a recursive function counts once per sample
            total[name] += n
        for name in {frame_name(f) for f in stack.split(";") if ours(f)}:
            total[f"ours {name}"] += n
    return own, total, samples, idle


def package(frame: str) -> str:
    """The package (or this project's file) a `file.py:function` name belongs to."""
    path = frame.rsplit(":", 1)[0]
    if path.startswith(("app/", "statemachine/")):
        return path
    return path.split("/", 1)[0] if "/" in path else f"stdlib {path}"


def table(title: str, counts: Counter[str], samples: int, top: int) -> str:
    lines = [f"{title} ({samples} samples)", f"{'share':>7}  function"]
    for name, count in counts.most_common(top):
        lines.append(f"{100 * count / max(1, samples):6.1f}%  {name}")
    return "\n".join(lines)


def tables(text: str, top: int) -> str:
    own, total, samples, idle = parse_collapsed(text)
    mine = Counter({name[5:]: n for name, n in total.items() if name.startswith("ours ")})
    everyone = Counter({name: n for name, n in total.items() if not name.startswith("ours ")})
    return "\n\n".join([
        f"{idle} idle samples ({100 * idle / max(1, idle + samples):.1f}%: waiting threadpool "
        "threads, the event loop's wait) left out; shares are of the working samples",
        table("by self time", own, samples, top),
        table("by package or file, self time", Counter(
            {key: sum(n for name, n in own.items() if package(name) == key)
             for key in {package(name) for name in own}}), samples, top),
        table("by total time", everyone, samples, top),
        table("by total time, this project's functions only", mine, samples, top)])


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes so far (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def record(pid: int, seconds: float, out: str, rate: int, gil: bool) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                    "--rate", str(rate), "--format", "raw", "--function", "--output", out,
                    *(["--gil"] if gil else [])],
                   check=True, capture_output=True, timeout=seconds + 60)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="wrk's duration")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--store", choices=("redis", "sqlite"), default="redis")
    parser.add_argument("--keep", help="also keep py-spy's raw output at this path")
    parser.add_argument("--gil", action="store_true",
                        help="sample only the thread holding the GIL (Python CPU time)")
    parser.add_argument("--parse", metavar="RAW", help="only print the tables of a kept file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.parse:
        print(tables(Path(args.parse).read_text(), args.top))
        return
    if not loadgen.have_wrk():
        raise SystemExit("make profile needs wrk (Debian package `wrk`)")
    with ExitStack() as stack:
        if args.store == "redis":
            server = RedisServer().start()
            stack.callback(server.stop)
            env = redis_env(server.url, f"prof-{uuid.uuid4().hex[:6]}")
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
            env = {"AGENTOS_DB": f"{folder}/profile.db"}
        ours = stack.enter_context(serving(env))
        worker = ours.worker_pids()[0]
        processes = {"workers": ours.worker_pids(),
                     "redis-server": [server.process.pid] if args.store == "redis" else []}
        before = {name: cpu_seconds(pids) for name, pids in processes.items()}
        loop: dict = {}
        driver = threading.Thread(target=lambda: loop.update(loadgen.run_wrk(
            ours.url, "create_continue.lua", args.connections, args.seconds)))
        driver.start()
        time.sleep(WARMUP_SECONDS)
        out = args.keep or stack.enter_context(tempfile.TemporaryDirectory()) + "/raw.txt"
        record(worker, args.seconds - 2 * WARMUP_SECONDS, out, args.rate, args.gil)
        driver.join()
        used = {name: cpu_seconds(pids) - before[name] for name, pids in processes.items()}
        text = Path(out).read_text()
    print(f"wrk: {loop}")
    print("CPU per request over wrk's run (py-spy's sampling of one worker included): " + ", ".join(
        f"{name} {1e6 * seconds / max(1, loop['requests']):.0f} us"
        for name, seconds in used.items() if processes[name]))
    print(f"worker {worker}, {args.store}, {args.connections} connections")
    print(tables(text, args.top))


if __name__ == "__main__":
    main()
