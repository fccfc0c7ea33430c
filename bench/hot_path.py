"""`make bench`: the hot path's figures, against a bare Flask endpoint in the same run.

Starts a private redis-server, our server (gunicorn, 2 workers, the production settings of
gunicorn.conf.py) and a bare Flask app with one trivial form POST under the same gunicorn
configuration, each driven from separate processes:

- (a) create then continue, non-streamed, with wrk at concurrency 1, 16 and 64; the ratio of
  our request rate to the bare endpoint's at the same concurrency (the two take turns, three
  rounds by default: the median round's ratio, and the rounds' range);
- (b) the same pair streamed (time to first event and to the end), with a Python client whose
  own ceiling against the bare endpoint is printed beside it;
- both on Redis, then on SQLite;
- Redis commands per create and per continue, bytes Redis receives per streamed delta, Redis
  memory per paused and per finished run, and continue latency with 1,000 and with 1,000,000
  stored runs (bulk-loaded through the store's own API in pipelines, not through HTTP; one
  private Redis and server per count, measured in turns so the machine's noise hits all).

It prints one JSON line per figure and a Markdown summary at the end; it asserts nothing.

    python -m bench.hot_path [--seconds 10] [--rounds 3] [--concurrency 1,16,64]
                             [--stored 1000,1000000] [--only rates,streamed,costs,flat]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from urllib.parse import urlparse

import redis

from bench import loadgen, redis_costs
from tests.servers import Gunicorn, RedisServer

PRODUCTION = {"WORKERS": 2}


def emit(kind: str, **figures) -> dict:
    row = {"figure": kind, **figures}
    print(json.dumps(row), flush=True)
    return row


@contextmanager
def serving(env: dict[str, str], app_spec: str = "wsgi:app"):
    server = Gunicorn(env=env, workers=PRODUCTION["WORKERS"], app_spec=app_spec).start()
    try:
        yield server
    finally:
        server.stop()


def request_rates(label: str, ours: Gunicorn, bare: Gunicorn, args) -> list[dict]:
    """(a): the create+continue loop beside the bare endpoint, at each concurrency.

    The two take turns, `args.rounds` times each, so a slow spell of the machine (a busy
    neighbour: the same commit's rate has been seen to move by a quarter between runs) falls
    on both: the ratio is the median of the rounds' ratios, with their range beside it, and
    the latencies are those of the median round."""
    rows = []
    for conns in args.concurrency:
        rounds = [_rate_round(ours, bare, conns, args.seconds / 2)
                  for _ in range(args.rounds)]
        middle = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
        loop, yardstick = middle["loop"], middle["bare"]
        seconds = sum(r["loop"]["seconds"] for r in rounds)
        bare_seconds = sum(r["bare"]["seconds"] for r in rounds)
        rows.append(emit("non_streamed", store=label, concurrency=conns, rounds=len(rounds),
                         requests_per_second=round(
                             sum(r["loop"]["requests"] for r in rounds) / seconds, 1),
                         pairs_per_second=round(
                             sum(r["loop"]["continues"] for r in rounds) / seconds, 1),
                         bare_requests_per_second=round(
                             sum(r["bare"]["requests"] for r in rounds) / bare_seconds, 1),
                         ratio_to_bare=round(middle["ratio"], 3),
                         ratio_range=[round(min(r["ratio"] for r in rounds), 3),
                                      round(max(r["ratio"] for r in rounds), 3)],
                         p50_ms=loop["p50_ms"], p95_ms=loop["p95_ms"], p99_ms=loop["p99_ms"],
                         bare_p50_ms=yardstick["p50_ms"],
                         bad=sum(r["loop"]["bad"] for r in rounds),
                         socket_errors=sum(r["loop"]["errors"] for r in rounds)))
    return rows


def _rate_round(ours: Gunicorn, bare: Gunicorn, conns: int, seconds: float) -> dict:
    """The bare endpoint, then our loop, for `seconds` each: one round's ratio."""
    yardstick = loadgen.run_wrk(f"{bare.url}/echo", "bare_post.lua", conns, seconds)
    loop = loadgen.run_wrk(ours.url, "create_continue.lua", conns, seconds)
    ratio = (loop["requests"] / loop["seconds"]) / (yardstick["requests"] / yardstick["seconds"])
    return {"bare": yardstick, "loop": loop, "ratio": ratio}


def streamed(label: str, ours: Gunicorn, bare: Gunicorn, args) -> list[dict]:
    """(b): streamed create and continue; the Python client's ceiling beside it."""
    rows = []
    host, port = "127.0.0.1", urlparse(ours.url).port
    for conns in args.concurrency:
        figures = loadgen.streamed_pairs(host, port, conns, args.seconds)
        ceiling = loadgen.python_client_ceiling("127.0.0.1", urlparse(bare.url).port, conns,
                                                min(5.0, args.seconds))
        rows.append(emit("streamed", store=label, concurrency=conns, **figures,
                         client_ceiling_bare_rps=ceiling))
    return rows


def redis_figures(url: str, prefix: str, ours: Gunicorn, args) -> dict:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        figures = {
            "commands": emit("redis_commands", **redis_costs.commands_per_request(
                ours.url, client)),
            "bytes": emit("redis_bytes_per_delta", rows=redis_costs.bytes_per_delta(
                ours.url, client, (200, 2000, 10000))),
            "memory": emit("redis_memory_per_run", **redis_costs.memory_per_run(
                ours.url, client, prefix)),
        }
    finally:
        client.close()
    return figures


def flatness(stored: list[int]) -> list[dict]:
    """Continue latency as the number of stored runs grows: one private Redis and one server
    per count, bulk-loaded through the store's own API (not via HTTP), then measured in turns
    (see `redis_costs.continue_latency`)."""
    servers, loads = [], []
    with ExitStack() as stack:
        for target in stored:
            redis_server = RedisServer().start()
            stack.callback(redis_server.stop)
            prefix = f"flat-{uuid.uuid4().hex[:6]}"
            loads.append(redis_costs.bulk_load(redis_server.url, prefix, target))
            emit("bulk_load", **loads[-1])
            ours = stack.enter_context(serving(redis_env(redis_server.url, prefix)))
            client = redis.Redis.from_url(redis_server.url, decode_responses=True)
            stack.callback(client.close)
            servers.append((ours.url, client))
        figures = redis_costs.continue_latency(servers)
    rows = [emit("continue_latency_vs_stored", stored_runs=target, **load, **row)
            for target, load, row in zip(stored, loads, figures, strict=True)]
    if len(rows) > 1:
        emit("continue_flatness", stored_runs=(rows[0]["stored_runs"], rows[-1]["stored_runs"]),
             p50_ratio=round(rows[-1]["p50_ms"] / rows[0]["p50_ms"], 3),
             redis_usec_ratio=round(rows[-1]["redis_usec_per_pair"]
                                    / rows[0]["redis_usec_per_pair"], 3))
    return rows


def redis_env(url: str, prefix: str) -> dict[str, str]:
    return {"REDIS_URL": url, "REDIS_KEY_PREFIX": prefix}


def bench_redis(args, bare: Gunicorn, results: dict) -> None:
    server = RedisServer().start()
    try:
        prefix = f"bench-{uuid.uuid4().hex[:6]}"
        if {"rates", "streamed", "costs"} & args.only:
            with serving(redis_env(server.url, prefix)) as ours:
                if "rates" in args.only:
                    results["redis_rates"] = request_rates("redis", ours, bare, args)
                if "streamed" in args.only:
                    results["redis_streamed"] = streamed("redis", ours, bare, args)
                if "costs" in args.only:
                    results["redis"] = redis_figures(server.url, prefix, ours, args)
    finally:
        server.stop()
    if "flat" in args.only:
        results["flat"] = flatness(args.stored)


def bench_sqlite(args, bare: Gunicorn, results: dict) -> None:
    with tempfile.TemporaryDirectory() as folder, \
            serving({"AGENTOS_DB": f"{folder}/bench.db"}) as ours:
        if "rates" in args.only:
            results["sqlite_rates"] = request_rates("sqlite", ours, bare, args)
        if "streamed" in args.only:
            results["sqlite_streamed"] = streamed("sqlite", ours, bare, args)


def summary(results: dict) -> str:
    """The Markdown tables the README's benchmark section is made of (those with rows)."""
    tables = [[f"| {row['store']} | {row['concurrency']} | {row['requests_per_second']}"
               f" | {row['pairs_per_second']} | {row['bare_requests_per_second']} | "
               f"{row['ratio_to_bare']} ({row['ratio_range'][0]}-{row['ratio_range'][1]}) | "
               f"{row['p50_ms']} | {row['p95_ms']} | "
               f"{row['p99_ms']} |"
               for row in results.get("redis_rates", []) + results.get("sqlite_rates", [])],
              [f"| {row['store']} | {row['concurrency']} | {row['pairs_per_second']} | "
               f"{row['first_event_p50_ms']} | {row['end_p50_ms']} | "
               f"{row['end_p99_ms']} | {row['client_ceiling_bare_rps']} |"
               for row in results.get("redis_streamed", []) +
               results.get("sqlite_streamed", [])],
              [f"| {row['stored_runs']} | {row.get('bulk_load_runs_per_second', '')} | "
               f"{row.get('used_memory_mb', '')} | {row['p50_ms']} | {row['p99_ms']} | "
               f"{row['redis_usec_per_pair']} | {row.get('machine_cores_busy', '')} |"
               for row in results.get("flat", [])]]
    heads = [["| store | conc. | req/s | pairs/s | bare req/s | ratio (rounds' range) | "
              "p50 ms | p95 ms | "
              "p99 ms |", "|---|---|---|---|---|---|---|---|---|"],
             ["| store | conc. | streamed pairs/s | first event p50 ms | end p50 ms | "
              "end p99 ms | client ceiling (bare req/s) |", "|---|---|---|---|---|---|---|"],
             ["| stored runs | load runs/s | Redis MB | continue p50 ms | p99 ms | "
              "Redis µs per pair | machine cores busy |", "|---|---|---|---|---|---|---|"]]
    parts = ["\n".join(head + rows) for head, rows in zip(heads, tables, strict=True) if rows]
    costs = results.get("redis")
    if costs:
        parts.append(_costs_table(costs))
    return "\n\n".join(parts)


def _costs_table(costs: dict) -> str:
    """What one request costs Redis, as the README's table."""
    create, cont = costs["commands"]["create"], costs["commands"]["continue"]
    bytes_rows = costs["bytes"]["rows"]
    memory = costs["memory"]
    lines = ["| Redis figure | value |", "|---|---|",
             f"| round trips per create / per continue (`confirm-agent`, `stream=false`) | "
             f"{create['round_trips']} / {cont['round_trips']} |",
             f"| client commands per create / per continue (MONITOR) | "
             f"{create['client_commands']} / {cont['client_commands']} "
             f"({', '.join(f'{v} {k}' for k, v in cont['by_command'].items())}) |",
             "| bytes Redis receives for an answer of "
             + " / ".join(f"{r['deltas']:,}" for r in bytes_rows) + " deltas | "
             + " / ".join(f"{r['redis_bytes_in'] / 1e6:.2f} MB ({r['bytes_per_delta']} B "
                          "per delta)" for r in bytes_rows) + " |",
             f"| memory per paused / finished demo run at rest (`MEMORY USAGE` of its keys) | "
             f"{memory['paused']['bytes_per_run_mean']:,} B / "
             f"{memory['finished']['bytes_per_run_mean']:,} B (right after its pause, the bell "
             f"still there: {memory['just_paused']['bytes_per_run_mean']:,} B) |"]
    return "\n".join(lines)


PARTS = ("rates", "streamed", "costs", "flat")


def _parts(text: str) -> set[str]:
    parts = set(text.split(","))
    if not parts <= set(PARTS):
        raise argparse.ArgumentTypeError(f"unknown part(s): {sorted(parts - set(PARTS))}")
    return parts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="per figure; the request rates split it over their rounds")
    parser.add_argument("--rounds", type=int, default=3,
                        help="turns the bare endpoint and our loop take at each concurrency")
    parser.add_argument("--concurrency", default="1,16,64",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--stored", default="1000,1000000",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--stores", default="redis,sqlite", type=lambda s: s.split(","))
    parser.add_argument("--only", default=",".join(PARTS), type=_parts,
                        help=f"comma-separated parts to run, of {','.join(PARTS)} (flat: "
                             "continue latency vs stored runs, Redis only)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not loadgen.have_wrk():
        raise SystemExit("make bench needs wrk (Debian package `wrk`)")
    emit("machine", cores=os.cpu_count(), processor=platform.processor() or platform.machine(),
         python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                              time.gmtime()),
         workers=PRODUCTION["WORKERS"], seconds_per_figure=args.seconds)
    results: dict = {}
    with serving({}, app_spec="bench.bare_app:app") as bare:
        if "redis" in args.stores:
            bench_redis(args, bare, results)
        if "sqlite" in args.stores:
            bench_sqlite(args, bare, results)
    print(summary(results))


if __name__ == "__main__":
    main()
