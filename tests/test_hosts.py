"""Two hosts on one Redis Cluster: the deployment the README describes, end to end.

Each "host" is a gunicorn master in its own network namespace (a veth pair on a bridge), and
both reach the session's Redis Cluster (3 primaries, 3 replicas) through the bridge. Where
namespaces cannot be made, two gunicorn masters on separate loopback ports stand in, and
`test_the_hosts_are_network_namespaces` says why in its skip reason. Each host writes its own
DEMO_TOOL_LOG, so the union of the two logs proves every tool ran once across hosts.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import LabNetwork, RedisClusterNodes
from tests.conftest import drop_cluster_prefix
from tests.servers import Gunicorn, unavailable
from tests.test_gunicorn_race import Sessions, check_pair, contend, create_paused

pytestmark = [pytest.mark.slow, pytest.mark.redis]

RUNS = 100
STREAMED = 20
THREADS = 16
WAIT = 30


@dataclass
class Host:
    """One server instance ("host") and the tool log it writes."""

    server: Gunicorn
    tool_log: Path

    @property
    def url(self) -> str:
        return self.server.url

    def tool_lines(self) -> list[list[str]]:
        if not self.tool_log.exists():
            return []
        return [line.split() for line in self.tool_log.read_text().splitlines()]


def start_hosts(lab: LabNetwork | str, nodes: RedisClusterNodes, prefix: str,
                logs: Path, **env: str) -> list[Host]:
    """Two servers on `nodes`, in the lab's namespaces when there are any."""
    hosts: list[Host] = []
    try:
        for index in range(2):
            log = logs / f"tools-{index}.log"
            settings = {"REDIS_URL": nodes.url, "REDIS_CLUSTER": "1", "REDIS_KEY_PREFIX": prefix,
                        "REDIS_WAIT_REPLICAS": "1", "DEMO_TOOL_LOG": str(log), **env}
            where = ({"host": lab.addresses[index], "netns": lab.namespaces[index]}
                     if isinstance(lab, LabNetwork) else {})
            hosts.append(Host(Gunicorn(env=settings, workers=2, **where).start(), log))
    except BaseException:
        stop_hosts(hosts)
        raise
    return hosts


def stop_hosts(hosts: list[Host]) -> None:
    for host in hosts:
        host.server.stop()


@pytest.fixture(scope="module")
def hosts(lab_network, redis_cluster, tmp_path_factory):
    prefix = f"agentos-hosts-{uuid.uuid4().hex[:12]}"
    started = start_hosts(lab_network, redis_cluster, prefix, tmp_path_factory.mktemp("hosts"))
    try:
        yield started
    finally:
        stop_hosts(started)
        drop_cluster_prefix(redis_cluster, prefix)


@pytest.fixture
def sessions():
    pool = Sessions()
    yield pool
    pool.close()


def all_tool_lines(hosts: list[Host]) -> list[list[str]]:
    return [line for host in hosts for line in host.tool_lines()]


def test_the_hosts_are_network_namespaces(lab_network, hosts):
    if not isinstance(lab_network, LabNetwork):
        unavailable("SKIPPED (FALLBACK: two gunicorn masters on separate loopback ports stand "
                    f"in for two hosts, because {lab_network})", required_by="CI")
    assert [h.server.netns for h in hosts] == lab_network.namespaces
    assert len({h.server.host for h in hosts}) == 2
    assert not any(h.server.host.startswith("127.") for h in hosts)


def test_two_continues_through_two_hosts_run_each_tool_once(hosts, sessions):
    """100 paused runs; each gets two simultaneous continues, one through each host."""
    a, b = hosts
    before = Counter(run_id for run_id, _, _ in all_tool_lines(hosts))
    with ThreadPoolExecutor(THREADS) as pool:
        runs = list(pool.map(lambda i: create_paused(sessions, hosts[i % 2].url, i), range(RUNS)))
        pairs = []
        for index, run in enumerate(runs):
            barrier, stream = threading.Barrier(2), index < STREAMED
            pairs.append((run, stream, [pool.submit(contend, sessions, host.url, run, stream,
                                                    barrier) for host in (a, b)]))
        for run, stream, futures in pairs:
            check_pair(run, [future.result(WAIT) for future in futures], stream)
    executed = Counter(run_id for run_id, _, _ in all_tool_lines(hosts)) - before
    assert executed == Counter(r["run_id"] for r in runs)
    assert all(len(host.tool_lines()) > 0 for host in hosts), "both hosts executed tools"


def sse(body: str) -> list[tuple[int, str]]:
    """(id, event) of every event of an SSE body."""
    out = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "id" in fields:
            out.append((int(fields["id"]), json.loads(fields["data"])["event"]))
    return out


def test_a_stream_begun_on_one_host_resumes_on_the_other(hosts, sessions):
    a, b = hosts
    session = sessions.get()
    with session.post(f"{a.url}/agents/chat-agent/runs", data={"message": "hi"},
                      stream=True, timeout=WAIT) as begun:
        assert begun.status_code == 200
        first_block = next(begun.iter_lines(decode_unicode=True, delimiter="\n\n"))
    first = sse(first_block)
    assert first and first[0][1] == "RunStarted"
    run_id = json.loads(first_block.split("data: ", 1)[1])["run_id"]
    resumed = session.get(f"{b.url}/agents/chat-agent/runs/{run_id}/events", timeout=WAIT,
                          headers={"Last-Event-ID": str(first[-1][0])})
    assert resumed.status_code == 200
    rest = sse(resumed.text)
    whole = sse(session.get(f"{a.url}/agents/chat-agent/runs/{run_id}/events",
                            timeout=WAIT).text)
    assert first + rest == whole
    assert [seq for seq, _ in whole] == list(range(1, len(whole) + 1))
    assert whole[-1][1] == "RunCompleted"


def test_an_approval_resolved_on_one_host_is_applied_on_the_other(hosts, sessions):
    a, b = hosts
    session = sessions.get()
    run = session.post(f"{a.url}/agents/approval-agent/runs", timeout=WAIT,
                       data={"message": "web", "stream": "false"}).json()
    assert run["status"] == "PAUSED"
    approval_id = run["tools"][0]["approval_id"]
    pending = session.get(f"{b.url}/approvals/{approval_id}", timeout=WAIT).json()
    assert pending["status"] == "pending"
    early = session.post(f"{b.url}/agents/approval-agent/runs/{run['run_id']}/continue",
                         data={"tools": "", "stream": "false"}, timeout=WAIT)
    assert early.status_code == 403
    resolved = session.post(f"{a.url}/approvals/{approval_id}/resolve", timeout=WAIT,
                            json={"status": "approved"})
    assert resolved.status_code == 200 and resolved.json()["status"] == "approved"
    done = session.post(f"{b.url}/agents/approval-agent/runs/{run['run_id']}/continue",
                        data={"tools": "", "stream": "false"}, timeout=WAIT)
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "COMPLETED"
    assert done.json()["content"] == "Deployed: deployed web"
    lines = [line for line in all_tool_lines(hosts) if line[0] == run["run_id"]]
    assert [name for _, _, name in lines] == ["deploy_app"]


def test_lists_of_runs_and_approvals_are_the_same_from_both_hosts(hosts, sessions):
    a, b = hosts
    session = sessions.get()
    for index in range(3):
        create_paused(sessions, hosts[index % 2].url, index)
        session.post(f"{hosts[index % 2].url}/agents/approval-agent/runs", timeout=WAIT,
                     data={"message": "web", "stream": "false"})
    for path, params in (("/agents/confirm-agent/runs", {"limit": 50}),
                         ("/agents/confirm-agent/runs", {"status": "PAUSED", "limit": 5}),
                         ("/agents/approval-agent/runs", {"page": 2, "limit": 2}),
                         ("/approvals", {"limit": 10}),
                         ("/approvals", {"status": "pending", "agent_id": "approval-agent"}),
                         ("/approvals/count", {})):
        seen = [session.get(f"{host.url}{path}", params=params, timeout=WAIT) for host in hosts]
        assert [r.status_code for r in seen] == [200, 200], path
        assert seen[0].json() == seen[1].json(), (path, params)
        assert seen[0].json(), (path, params)

