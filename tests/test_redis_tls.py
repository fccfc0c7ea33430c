"""A managed-Redis stand-in: TLS (`rediss://`) and an ACL user with a password in the URL.

The test makes a self-signed certificate with `openssl` and starts a private redis-server
that listens on a TLS port only and knows one user besides the disabled default. It skips
(saying why) when openssl is missing or redis-server was built without TLS.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from app import create_app
from statemachine.errors import StoreUnavailable
from statemachine.redis_store import RedisRunStore
from statemachine.states import RunState
from statemachine.store import RunQuery, StoredRun
from tests.cluster import RedisClusterNodes
from tests.servers import free_port, unavailable, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]

USER, PASSWORD = "agentos", "s3cret-pass"


def _certificate(directory: Path) -> Path:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """(rediss:// URL with user and password, CA file) of a TLS-only private redis-server."""
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        unavailable("TLS test SKIPPED: needs openssl and redis-server on PATH")
    directory = tmp_path_factory.mktemp("tls")
    cert = _certificate(directory)
    port = free_port()
    config = directory / "redis.conf"
    config.write_text(f"user default off\nuser {USER} on >{PASSWORD} ~* &* +@all\n")
    process = subprocess.Popen(
        ["redis-server", str(config), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(directory / "key.pem"),
         "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        probe = RedisRunStore(url, prefix="probe", socket_timeout=1.0)
        try:
            wait_until(lambda: _pings(probe, process), 10, what="redis-server on TLS")
        finally:
            probe.close()
        yield url, cert, port
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout:
            process.stdout.close()


def _pings(store: RedisRunStore, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        output = process.stdout.read().decode(errors="replace") if process.stdout else ""
        if "TLS" in output and ("support" in output or "not built" in output):
            unavailable(f"TLS test SKIPPED: this redis-server was built without TLS: {output}")
        pytest.fail(f"redis-server with TLS exited: {output[-500:]}")
    try:
        store.ping()
        return True
    except StoreUnavailable:
        return False


def test_a_store_over_tls_with_a_user_and_password(tls_redis):
    url, _, _ = tls_redis
    store = RedisRunStore(url, prefix="tls-test")
    try:
        now = time.time()
        run = StoredRun(run_id="tls-run", agent_id="a", session_id="s", user_id="u",
                        state=RunState.PAUSED,
                        version=1, created_at=now, updated_at=now, doc={"agent_id": "a"},
                        paused_at=now)
        store.create_run(run, [{"event": "RunPaused"}])
        assert store.get_run("tls-run").version == 1
        assert [r.run_id for r in store.list_runs(RunQuery(agent_id="a", user_id="u"))] == [
            "tls-run"]
        assert store.redis.connection_pool.connection_kwargs["username"] == USER
    finally:
        store.close()


@pytest.mark.parametrize("change", [
    lambda url: url.replace(PASSWORD, "wrong"),
    lambda url: url.split("?")[0].replace("rediss://", "redis://"),
])
def test_wrong_credentials_or_no_tls_are_unavailable(tls_redis, change):
    url, _, _ = tls_redis
    store = RedisRunStore(change(url), prefix="tls-test", socket_timeout=1.0)
    try:
        with pytest.raises(StoreUnavailable):
            store.ping()
    finally:
        store.close()


def test_the_server_runs_on_a_tls_redis(tls_redis):
    url, _, _ = tls_redis
    app = create_app({"REDIS_URL": url, "REDIS_KEY_PREFIX": "tls-app"})
    try:
        client = app.test_client()
        assert client.get("/health").status_code == 200
        answer = client.post("/agents/chat-agent/runs", data={"message": "hi", "stream": "false"})
        assert answer.status_code == 200 and answer.json["status"] == "COMPLETED"
        listed = client.get("/agents/chat-agent/runs").json
        assert [r["run_id"] for r in listed] == [answer.json["run_id"]]
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)
        app.extensions["agentos"].store.close()


def test_a_redis_cluster_over_tls(tls_redis):
    """3 TLS-only primaries (cluster bus over TLS too), reached through one rediss:// URL."""
    _, cert, _ = tls_redis
    nodes = RedisClusterNodes(nodes=3, replicas=0, tls_cert=str(cert))
    try:
        nodes.start()
        store = RedisRunStore(nodes.url, prefix="tls-cluster", cluster=True)
        try:
            now = time.time()
            for index in range(20):  # spread over the three primaries' slots
                store.create_run(StoredRun(
                    run_id=f"tls-{index}", agent_id="a", session_id="s", user_id="u",
                    state=RunState.PAUSED, version=1, created_at=now + index, updated_at=now,
                    doc={"agent_id": "a"}, paused_at=now + index), [{"event": "RunPaused"}])
            listed = store.list_runs(RunQuery(agent_id="a", user_id="u", limit=5))
            assert [r.run_id for r in listed] == [f"tls-{i}" for i in range(19, 14, -1)]
            assert store.runs_paused_before(now + 5, limit=3) == ["tls-0", "tls-1", "tls-2"]
        finally:
            store.close()
    finally:
        nodes.stop()
