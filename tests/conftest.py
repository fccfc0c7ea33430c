"""Fixtures: real stores (SQLite file, real Redis), the app, its client, live servers.

Redis: `REDIS_URL` when set (each test gets its own key prefix, removed afterwards, so a
shared server is never flushed); else a private redis-server started for the session; else
the Redis tests skip with a loud reason, unless `REQUIRE_REDIS=1`, where they fail.

Redis Cluster: a private 3-primary, 3-replica cluster started once for the session whenever
redis-server exists (never a shared one), on the bridge of a `LabNetwork` when network
namespaces can be made (so servers in those namespaces reach it as other hosts would), else
on loopback.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from app import create_app
from statemachine.redis_store import RedisRunStore
from statemachine.sqlite_store import SqliteRunStore
from tests.cluster import LabNetwork, RedisClusterNodes, started_cluster
from tests.servers import RedisServer, unavailable

STORE_KINDS = ["sqlite", "redis"]
ALL_STORE_KINDS = ["sqlite", "redis", "redis-cluster"]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server for the whole session, or a skip (a failure when REQUIRE_REDIS=1)."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    try:
        server = RedisServer().start()
    except FileNotFoundError:
        unavailable("Redis tests SKIPPED: no REDIS_URL and no redis-server binary on PATH")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def lab_network() -> Iterator[LabNetwork | str]:
    """Two "hosts" (network namespaces on a bridge), or the reason they cannot be made."""
    try:
        network = LabNetwork().open()
    except OSError as exc:
        yield str(exc)
        return
    try:
        yield network
    finally:
        network.close()


@pytest.fixture(scope="session")
def redis_cluster(lab_network) -> Iterator[RedisClusterNodes]:
    """A private Redis Cluster for the whole session (3 primaries + 3 replicas, AOF)."""
    yield from started_cluster(lab_network, "Redis Cluster")


@pytest.fixture
def cluster_prefix(redis_cluster: RedisClusterNodes) -> Iterator[str]:
    prefix = f"agentos-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    drop_cluster_prefix(redis_cluster, prefix)


def drop_cluster_prefix(nodes: RedisClusterNodes, prefix: str) -> None:
    """Delete the keys under `prefix` on every primary (each key lives on one)."""
    for port in nodes.primaries():
        client = redis.Redis(host=nodes.host, port=port)
        try:
            for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
                client.delete(key)
        finally:
            client.close()


def _drop_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
    finally:
        client.close()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"agentos-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    _drop_prefix(redis_url, prefix)


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path):
    if kind == "sqlite":
        return SqliteRunStore(str(tmp_path / "runs.db"))
    if kind == "redis-cluster":
        nodes = request.getfixturevalue("redis_cluster")
        prefix = request.getfixturevalue("cluster_prefix")
        return RedisRunStore(nodes.url, prefix=prefix, cluster=True)
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    return RedisRunStore(url, prefix=prefix)


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(store_kind: str, request: pytest.FixtureRequest, tmp_path):
    """Each store implementation in turn, fresh for the test."""
    instance = make_store(store_kind, request, tmp_path)
    yield instance
    instance.close()


@pytest.fixture
def app_config() -> dict:
    """Extra settings a test module may override."""
    return {}


@pytest.fixture
def app(store, app_config: dict):
    application = create_app({"STORE": store, **app_config})
    yield application
    application.extensions["agentos"].executor.shutdown(wait=True)


@pytest.fixture
def client(app):
    return app.test_client()
