"""A Redis Cluster primary killed under load (`-m long`): 503 + Retry-After while the cluster
elects a replica, then recovery on its own; no paused run lost, no continue executed twice.

The cluster is this test's own (AOF on every node, node timeout 1.5 s), so the session's
cluster is never left with a dead node; the two hosts are the same as in test_hosts.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.cluster import started_cluster
from tests.servers import wait_until
from tests.test_gunicorn_race import Sessions, create_paused
from tests.test_hosts import all_tool_lines, start_hosts, stop_hosts

pytestmark = [pytest.mark.long, pytest.mark.slow, pytest.mark.redis]

RUNS = 60
ALLOWED = {200, 409, 503}
BOUND = 60  # seconds: the bound on the whole load, and on recovery
LEASE = 5  # seconds: a run whose final write the outage refused is settled within this


@pytest.fixture
def cluster(lab_network):
    """A cluster of its own: the test kills one of its primaries."""
    yield from started_cluster(lab_network, "Redis Cluster failover")


@pytest.fixture
def hosts(lab_network, cluster, tmp_path):
    started = start_hosts(lab_network, cluster, f"agentos-failover-{uuid.uuid4().hex[:8]}",
                          tmp_path, RUN_LEASE_SECONDS=str(LEASE), SWEEP_INTERVAL_SECONDS="0.5")
    yield started
    stop_hosts(started)


class Answers:
    """Every status code seen, and whether each 503 carried Retry-After."""

    def __init__(self) -> None:
        self.codes: Counter[int] = Counter()
        self.no_retry_after = 0
        self._lock = threading.Lock()

    def note(self, response: requests.Response) -> None:
        with self._lock:
            self.codes[response.status_code] += 1
            if response.status_code == 503 and "Retry-After" not in response.headers:
                self.no_retry_after += 1


def continue_until_decided(session: requests.Session, base: str, run: dict,
                           answers: Answers, deadline: float) -> int:
    """Continue `run` as a client would: on 503 wait Retry-After and try again."""
    url = f"{base}/agents/confirm-agent/runs/{run['run_id']}/continue"
    data = {"tools": f'[{{"tool_call_id": "{run["tools"][0]["tool_call_id"]}", '
                     '"confirmed": true}]', "stream": "false"}
    while True:
        try:
            response = session.post(url, data=data, timeout=BOUND)
        except requests.ConnectionError:
            time.sleep(0.2)
            continue
        answers.note(response)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response.status_code
        time.sleep(float(response.headers.get("Retry-After", "1")))


def test_a_primary_killed_under_load(cluster, hosts):
    sessions, answers = Sessions(), Answers()
    try:
        with ThreadPoolExecutor(16) as pool:
            runs = list(pool.map(lambda i: create_paused(sessions, hosts[i % 2].url, i),
                                 range(RUNS)))
            during, after = runs[: RUNS // 2], runs[RUNS // 2:]
            deadline = time.monotonic() + BOUND
            futures = [pool.submit(continue_until_decided, sessions.get(), hosts[i % 2].url, run,
                                   answers, deadline) for i, run in enumerate(during)]
            time.sleep(0.3)
            victim = cluster.primaries()[0]
            cluster.kill(victim)
            outcomes = [future.result(BOUND + 30) for future in futures]
        wait_until(lambda: victim not in cluster.primaries() and cluster.healthy(), BOUND,
                   interval=0.5, what="the cluster to elect a new primary and heal")
        later = [continue_until_decided(sessions.get(), hosts[i % 2].url, run, answers,
                                        time.monotonic() + BOUND)
                 for i, run in enumerate(after)]
    finally:
        sessions.close()
    assert set(answers.codes) <= ALLOWED, answers.codes
    assert answers.no_retry_after == 0
    assert set(outcomes) <= {200, 409}, Counter(outcomes)
    assert later == [200] * len(after), Counter(later)
    executed = Counter(run_id for run_id, _, _ in all_tool_lines(hosts))
    assert max(executed.values()) == 1, "a continue executed twice"
    assert all(executed[run["run_id"]] == 1 for run in after)
    assert all(executed[run["run_id"]] <= 1 for run in during)
