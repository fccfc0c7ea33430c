"""`python -m bench.instructions`: the instructions one create+continue pair costs, counted.

Rates on a shared machine move by a quarter between runs of the same commit; instruction
counts do not (valgrind's callgrind counts what the CPU is asked to do, whatever else the
machine does: the same figure to within 1% run after run). This calls the WSGI app in-process,
without gunicorn or gevent (the run loops on OS threads, as under the gthread worker), for a
`confirm-agent` create (`stream=false`, it pauses) then its continue (`confirmed=true`, it
completes), on a private Redis (or a SQLite file), and counts the whole process twice under
callgrind: with `--pairs` more pairs and without. The difference over `--pairs` is one pair:
start-up and warm-up cancel out. What a pair costs in time is not in proportion everywhere
(a tight loop of Python runs several times as many instructions per nanosecond as code that
waits on memory or the kernel), so this ranks changes of the same kind; wrk's runs
(`make bench`, `bench.ab`) say what they are worth in requests.

    python -m bench.instructions [--pairs 100] [--store redis|sqlite] [--root CHECKOUT]

`--root` counts another checkout (a `git worktree add /tmp/before <commit>`) with this
driver, so two commits are counted the same way.

Needs valgrind (Debian package `valgrind`); about a minute.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from contextlib import ExitStack
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WARM_PAIRS = 5
COLLECTED = re.compile(r"Collected : (\d+)")


def _call(app, path: str, body: str) -> dict:
    """One form POST through the whole WSGI stack (middleware included); its JSON answer."""
    data = body.encode()
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "bench",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
        "CONTENT_TYPE": "application/x-www-form-urlencoded", "CONTENT_LENGTH": str(len(data)),
        "wsgi.input": io.BytesIO(data), "wsgi.errors": sys.stderr, "REMOTE_ADDR": "127.0.0.1",
        "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
        "HTTP_HOST": "bench",
    }
    statuses: list[str] = []
    chunks = app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    try:
        answer = b"".join(chunks)
    finally:
        getattr(chunks, "close", lambda: None)()
    if not statuses or not statuses[0].startswith("200"):
        raise SystemExit(f"POST {path} answered {statuses}: {answer[:300]!r}")
    return json.loads(answer)


def pair(app) -> None:
    """A create that pauses, then the continue that completes it."""
    run = _call(app, "/agents/confirm-agent/runs", "message=bench&stream=false")
    if run["status"] != "PAUSED":
        raise SystemExit(f"the create answered {run['status']}, not PAUSED")
    tools = json.dumps([{"tool_call_id": run["tools"][0]["tool_call_id"], "confirmed": True}])
    done = _call(app, f"/agents/confirm-agent/runs/{run['run_id']}/continue",
                 "stream=false&tools=" + urllib.parse.quote(tools))
    if done["status"] != "COMPLETED":
        raise SystemExit(f"the continue answered {done['status']}, not COMPLETED")


def drive(pairs: int) -> None:
    """The child's part: warm up, then `pairs` pairs (the store comes from the environment).
    It runs as a script in the checkout counted: `app` is that checkout's, and this file's
    folder is not a place to import from."""
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != BENCH]
    from app import create_app

    app = create_app()
    for _ in range(WARM_PAIRS + pairs):
        pair(app)


def counted(pairs: int, env: dict[str, str], folder: str, root: Path) -> int:
    """Instructions of a whole child process that drives `pairs` pairs after its warm-up."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/callgrind.{pairs}",
         sys.executable, str(BENCH / "instructions.py"), "--drive", str(pairs)],
        cwd=root, env={**os.environ, **env, "PYTHONPATH": str(root)}, capture_output=True,
        text=True, timeout=900, check=False)
    found = COLLECTED.findall(out.stderr)
    if out.returncode != 0 or not found:
        raise SystemExit(f"the counted run of {pairs} pairs failed:\n{out.stderr[-2000:]}")
    return int(found[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--store", choices=("redis", "sqlite"), default="redis")
    parser.add_argument("--root", type=Path, default=BENCH.parent,
                        help="the checkout to count (this one by default)")
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.drive is not None:
        drive(args.drive)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.instructions needs valgrind (Debian package `valgrind`)")
    from tests.servers import RedisServer

    root = args.root.resolve()
    with ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory())
        if args.store == "redis":
            redis = RedisServer().start()
            stack.callback(redis.stop)
            env = {"REDIS_URL": redis.url, "REDIS_KEY_PREFIX": "instructions"}
        else:
            env = {"AGENTOS_DB": f"{folder}/instructions.db"}
        env["LOG_LEVEL"] = os.environ.get("LOG_LEVEL", "info")
        without = counted(0, env, folder, root)
        with_pairs = counted(args.pairs, env, folder, root)
    per_pair = (with_pairs - without) / args.pairs
    print(json.dumps({"figure": "instructions_per_pair", "store": args.store, "root": str(root),
                      "pairs": args.pairs, "instructions_per_pair": round(per_pair),
                      "start_up_and_warm_up": without}))


if __name__ == "__main__":
    main()
