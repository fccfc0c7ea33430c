"""Webhooks: the outbox in both stores, signing, and delivery across a restart of every worker.

The receiver is a real HTTP server on loopback that fails its first answers; the server is a
real gunicorn with two workers on a real store; the restart kills every process of it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from app.runtime.notifications import secret_bytes, sign
from statemachine.errors import StaleRun
from statemachine.outbox import APPROVAL_CREATED, APPROVAL_RESOLVED
from statemachine.states import RunState
from statemachine.store import Approval, Commit
from tests.conftest import ALL_STORE_KINDS
from tests.servers import Gunicorn, wait_until
from tests.test_store_contract import create, ev, new_run


@pytest.fixture(params=ALL_STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The outbox holds on SQLite, one Redis server and a Redis Cluster alike."""
    return request.param

SECRET = "whsec_" + base64.b64encode(b"a test secret of 32 bytes length").decode()


# -- signing --------------------------------------------------------------------------------


def test_a_whsec_secret_is_base64_and_the_signature_is_hmac_sha256_of_id_timestamp_body():
    key = secret_bytes(SECRET)
    assert key == b"a test secret of 32 bytes length"
    expected = base64.b64encode(hmac.new(key, b"msg_1.1700000000.{}", hashlib.sha256)
                                .digest()).decode()
    assert sign(key, "msg_1", 1700000000, "{}") == "v1," + expected
    assert secret_bytes("plain-secret") == b"plain-secret"
    with pytest.raises(ValueError):
        secret_bytes("whsec_not*base64")


# -- the outbox in each store ----------------------------------------------------------------


def pending_approval(run) -> Approval:
    approval_id = uuid.uuid4().hex
    doc = {"id": approval_id, "run_id": run.run_id, "agent_id": run.agent_id,
           "tool_name": "deploy_app", "tool_args": {"app": "web"}, "created_at": 1}
    return Approval(approval_id=approval_id, run_id=run.run_id, status="pending", doc=doc)


def test_the_outbox_is_written_with_the_commit_and_claimed_by_one_deliverer(store):
    store.outbox = True
    run = create(store)
    approval = pending_approval(run)
    store.commit(Commit(run_id=run.run_id, expected_version=run.version, state=RunState.PAUSED,
                        doc=run.doc, now=time.time(), approvals=[approval],
                        events=[ev("RunPaused", run_id=run.run_id, content="waiting")]))
    now = time.time()
    claimed = store.claim_outbox(now, now + 30)
    assert sorted(e.type for e in claimed) == [APPROVAL_CREATED, "run.paused"]
    assert store.claim_outbox(now, now + 30) == []  # leased: no second deliverer gets them
    paused = next(e for e in claimed if e.type == "run.paused")
    assert json.loads(paused.payload)["data"]["status"] == "PAUSED"
    store.settle_outbox(paused, delivered=True)
    other = next(e for e in claimed if e.type != "run.paused")
    store.settle_outbox(other, delivered=False, retry_at=now + 0.2, error="HTTP 500")
    assert store.claim_outbox(time.time(), time.time() + 30) == []
    retried = wait_until(lambda: store.claim_outbox(time.time(), time.time() + 30), 5,
                         what="the retry to come due")
    assert [(e.entry_id, e.attempts) for e in retried] == [(other.entry_id, 1)]
    store.settle_outbox(retried[0], delivered=False, error="HTTP 500")
    assert store.claim_outbox(time.time() + 3600, time.time() + 3630) == []
    assert [f["attempts"] for f in store.failed_outbox(run.run_id)] == [2]


def test_a_lost_compare_and_set_writes_no_notification_and_a_lapsed_lease_frees_one(store):
    store.outbox = True
    run = create(store)
    stale = Commit(run_id=run.run_id, expected_version=run.version + 5,
                   state=RunState.COMPLETED, doc=run.doc, now=time.time(),
                   events=[ev("RunCompleted")])
    with pytest.raises(StaleRun):
        store.commit(stale)
    assert store.claim_outbox(time.time(), time.time() + 30) == []
    stale.expected_version = run.version
    store.commit(stale)
    now = time.time()
    first = store.claim_outbox(now, now + 0.2)
    assert [e.type for e in first] == ["run.completed"]
    again = wait_until(lambda: store.claim_outbox(time.time(), time.time() + 30), 5,
                       what="the lease to lapse")
    assert [e.entry_id for e in again] == [first[0].entry_id]


def test_resolving_an_approval_writes_its_notification(store):
    store.outbox = True
    run = create(store)
    approval = pending_approval(run)
    store.commit(Commit(run_id=run.run_id, expected_version=run.version, state=RunState.PAUSED,
                        doc=run.doc, now=time.time(), approvals=[approval]))
    for entry in store.claim_outbox(time.time(), time.time() + 30):
        store.settle_outbox(entry, delivered=True)
    approval.status, approval.resolved_by = "approved", "admin-key"
    store.resolve_approval(approval, store.get_run(run.run_id).version, time.time())
    [entry] = store.claim_outbox(time.time(), time.time() + 30)
    data = json.loads(entry.payload)["data"]
    assert (entry.type, data["status"], data["resolved_by"]) == (
        APPROVAL_RESOLVED, "approved", "admin-key")


def test_without_a_webhook_nothing_is_queued(store):
    run = create(store, new_run())
    store.commit(Commit(run_id=run.run_id, expected_version=run.version,
                        state=RunState.COMPLETED, doc=run.doc, now=time.time(),
                        events=[ev("RunCompleted")]))
    assert store.claim_outbox(time.time(), time.time() + 30) == []


# -- delivery through gunicorn, across a restart ----------------------------------------------


class Receiver:
    """A loopback webhook receiver that answers 500 while `failing`, else 204."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.failing = True
        self.received: list[dict] = []
        self.answers = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                with receiver.lock:
                    receiver.answers += 1
                    fail = receiver.failing or receiver.answers <= receiver.fail_first
                if fail:
                    time.sleep(0.2)  # slow failures: the restart finds deliveries in flight
                with receiver.lock:
                    if not fail:
                        receiver.received.append({
                            "id": self.headers["webhook-id"],
                            "timestamp": self.headers["webhook-timestamp"],
                            "signature": self.headers["webhook-signature"], "body": body})
                self.send_response(500 if fail else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def distinct(self) -> dict[str, dict]:
        with self.lock:
            return {item["id"]: item for item in self.received}


def valid(item: dict) -> bool:
    expected = sign(secret_bytes(SECRET), item["id"], int(item["timestamp"]), item["body"])
    return hmac.compare_digest(expected, item["signature"])


def drive_runs(base: str, count: int) -> Counter:
    """Approval runs approved and continued, confirm runs cancelled: the types they notify."""
    expected: Counter = Counter()
    for i in range(count):
        run = requests.post(f"{base}/agents/approval-agent/runs",
                            data={"message": f"app{i}", "stream": "false"}, timeout=10).json()
        approval_id = run["tools"][0]["approval_id"]
        requests.post(f"{base}/approvals/{approval_id}/resolve", json={"status": "approved"},
                      timeout=10).raise_for_status()
        done = requests.post(f"{base}/agents/approval-agent/runs/{run['run_id']}/continue",
                             data={"tools": "[]", "stream": "false"}, timeout=10).json()
        assert done["status"] == "COMPLETED"
        paused = requests.post(f"{base}/agents/confirm-agent/runs",
                               data={"message": f"m{i}", "stream": "false"}, timeout=10).json()
        requests.post(f"{base}/agents/confirm-agent/runs/{paused['run_id']}/cancel",
                      timeout=10).raise_for_status()
        expected.update({APPROVAL_CREATED: 1, "run.paused": 2, APPROVAL_RESOLVED: 1,
                         "run.completed": 1, "run.cancelled": 1})
    return expected


def kill_all(server: Gunicorn) -> None:
    """SIGKILL the master and every worker at once: nothing gets to finish or clean up."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(10)
    server.stop()


def deliver_across_restart(env: dict[str, str], runs: int, directory) -> None:
    metrics_dir = directory / "metrics"  # prometheus reads every *.db file there: its own
    metrics_dir.mkdir()
    with Receiver(fail_first=3) as receiver:
        env = {**env, "WEBHOOK_URL": receiver.url, "WEBHOOK_SECRET": SECRET,
               "WEBHOOK_TIMEOUT_SECONDS": "1", "WEBHOOK_POLL_SECONDS": "0.1",
               "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        first = Gunicorn(env=env, workers=2).start()
        try:
            expected = drive_runs(first.url, runs)
            wait_until(lambda: receiver.answers >= 4, 10, what="delivery attempts")
        finally:
            kill_all(first)
        receiver.failing = False
        second = Gunicorn(env=env, workers=2).start()
        try:
            total = sum(expected.values())
            wait_until(lambda: len(receiver.distinct()) >= total, 40,
                       what=f"{total} distinct deliveries")
            time.sleep(0.5)
            metrics = requests.get(f"{second.url}/metrics", timeout=10).text
        finally:
            second.stop()
    distinct = receiver.distinct()
    assert all(valid(item) for item in receiver.received)
    types = Counter(json.loads(item["body"])["type"] for item in distinct.values())
    assert types == expected
    for item in receiver.received:  # a duplicate is the same notification, byte for byte
        assert item["body"] == distinct[item["id"]]["body"]
    delivered = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("agentos_webhook_deliveries_total{")
                    and 'outcome="delivered"' in line)
    assert delivered == len(receiver.received)  # each one by the restarted workers


@pytest.mark.slow
@pytest.mark.redis
def test_every_notification_arrives_signed_once_by_id_across_a_restart_redis(
        redis_url, redis_prefix, tmp_path):
    deliver_across_restart({"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": redis_prefix}, runs=3,
                           directory=tmp_path)


@pytest.mark.slow
@pytest.mark.long
def test_every_notification_arrives_signed_once_by_id_across_a_restart_sqlite(tmp_path):
    deliver_across_restart({"AGENTOS_DB": str(tmp_path / "runs.db")}, runs=3,
                           directory=tmp_path)
