"""`python -m bench.ab OTHER [THIS]`: two checkouts' create+continue loops, taking turns.

On a shared machine the same commit's rate moves by a quarter between runs minutes apart, so
two tables of `make bench` cannot show a change of a few percent. This serves both checkouts
at once (each gunicorn with 2 workers, as `make bench` does, on one private Redis under two
key prefixes; the one not driven is idle) and drives them with wrk in turns, in alternating
order, for `--rounds` rounds: a slow spell of the machine falls on both. It prints each
round and the medians: request rate, the workers' and Redis' CPU per request (from /proc),
and the per-round ratios of THIS to OTHER. It asserts nothing. `--store sqlite` gives each
checkout a SQLite file of its own instead.

    git worktree add /tmp/before <commit>
    python -m bench.ab /tmp/before [.] [--rounds 10] [--seconds 4] [--connections 16]
                       [--store redis|sqlite]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import uuid
from contextlib import ExitStack
from pathlib import Path

from bench import loadgen
from bench.hot_path import PRODUCTION, redis_env
from bench.profile import cpu_seconds
from tests.servers import Gunicorn, RedisServer


def one_round(server: Gunicorn, redis_pids: list[int], connections: int,
              seconds: float) -> dict:
    """One wrk run of the loop against `server`, with the CPU it cost per request."""
    workers = server.worker_pids()
    before, redis_before = cpu_seconds(workers), cpu_seconds(redis_pids)
    out = loadgen.run_wrk(server.url, "create_continue.lua", connections, seconds)
    requests = max(1, out["requests"])
    return {"rate": out["requests"] / out["seconds"], "bad": out["bad"] + out["errors"],
            "worker_us": 1e6 * (cpu_seconds(workers) - before) / requests,
            "redis_us": 1e6 * (cpu_seconds(redis_pids) - redis_before) / requests}


def report(name: str, rounds: list[dict]) -> str:
    rates = [r["rate"] for r in rounds]
    return (f"{name}: {statistics.median(rates):.0f} req/s median "
            f"({min(rates):.0f} to {max(rates):.0f}), workers "
            f"{statistics.median(r['worker_us'] for r in rounds):.0f} us and Redis "
            f"{statistics.median(r['redis_us'] for r in rounds):.0f} us of CPU per request "
            f"(medians), {sum(r['bad'] for r in rounds)} bad answers")


def ratios(this: list[dict], other: list[dict], key: str) -> str:
    values = [a[key] / b[key] for a, b in zip(this, other, strict=True)]
    return (" ".join(f"{v:.2f}" for v in values)
            + f"; median {statistics.median(values):.3f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the checkout to compare against")
    parser.add_argument("this", type=Path, nargs="?", default=Path("."))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=4.0, help="per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--store", choices=("redis", "sqlite"), default="redis")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not loadgen.have_wrk():
        raise SystemExit("bench.ab needs wrk (Debian package `wrk`)")
    checkouts = {"other": args.other.resolve(), "this": args.this.resolve()}
    with ExitStack() as stack:
        redis_pids: list[int] = []
        if args.store == "redis":
            redis = RedisServer().start()
            stack.callback(redis.stop)
            redis_pids.append(redis.process.pid)
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
        servers = {}
        for name, root in checkouts.items():
            env = redis_env(redis.url, f"ab-{name}-{uuid.uuid4().hex[:6]}") \
                if args.store == "redis" else {"AGENTOS_DB": f"{folder}/{name}.db"}
            servers[name] = Gunicorn(env=env, workers=PRODUCTION["WORKERS"], root=root).start()
            stack.callback(servers[name].stop)
        for server in servers.values():  # warm both before the first measured round
            loadgen.run_wrk(server.url, "create_continue.lua", args.connections, 2)
        rounds: dict[str, list[dict]] = {"other": [], "this": []}
        for number in range(args.rounds):
            order = ("other", "this") if number % 2 == 0 else ("this", "other")
            for name in order:
                rounds[name].append(one_round(servers[name], redis_pids,
                                              args.connections, args.seconds))
            print(f"round {number + 1}: " + ", ".join(
                f"{name} {rounds[name][-1]['rate']:.0f} req/s" for name in order), flush=True)
    for name, root in checkouts.items():
        print(report(f"{name} ({root})", rounds[name]))
    print("this / other, request rate per round: " + ratios(rounds["this"], rounds["other"],
                                                             "rate"))
    print("this / other, workers' CPU per request per round: "
          + ratios(rounds["this"], rounds["other"], "worker_us"))


if __name__ == "__main__":
    main()
