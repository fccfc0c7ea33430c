"""Webhook delivery from the store's outbox: signed, at least once, retried for a bounded time.

One Deliverer per process. It leases due outbox entries from the store (a claimed entry is
invisible to the other processes' deliverers until its lease ends), POSTs each to
`WEBHOOK_URL` with the Standard Webhooks headers, and settles it: delivered (dropped), retried
later with exponential backoff, or, once `WEBHOOK_RETRY_SECONDS` have passed since the entry
was written, recorded as failed and logged. A process that dies mid-delivery leaves its
entries leased; they come due again when the lease ends, so a restart of every worker loses
none (and a receiver may see one twice: it deduplicates by `webhook-id`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from statemachine.errors import StoreUnavailable
from statemachine.outbox import OutboxEntry
from statemachine.store import RunStore

log = logging.getLogger(__name__)

BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 300.0
USER_AGENT = "agentos-continue-webhooks/1"


def secret_bytes(secret: str) -> bytes:
    """The HMAC key: a `whsec_` secret is base64 after its prefix (as the Standard Webhooks
    spec makes them); any other string is used as its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except ValueError:
            raise ValueError("WEBHOOK_SECRET starts with whsec_ but is not base64") from None
    return secret.encode()


def sign(key: bytes, msg_id: str, timestamp: int, body: str) -> str:
    """`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, the webhook-signature value."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def backoff(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones: doubling, capped, jittered."""
    base = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * (2 ** min(attempts, 20)))
    return base * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    key: bytes
    timeout: float
    retry_seconds: float
    poll_seconds: float

    @property
    def lease_seconds(self) -> float:
        """Long enough for one POST to time out, short enough to recover a dead worker."""
        return 2 * self.timeout + 1


class Deliverer:
    """The outbox's consumer in this process; `observe` is told each delivery's outcome."""

    def __init__(self, store: RunStore, target: WebhookTarget,
                 observe: Callable[[str, str], None] | None = None) -> None:
        self.store = store
        self.target = target
        self.observe = observe or (lambda _type, _outcome: None)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        """Start the delivery thread in this process (again after a fork)."""
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            if alive and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._loop, daemon=True, name="webhooks")
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.deliver_due()
            except StoreUnavailable as exc:
                log.warning("webhook delivery paused, store unavailable: %s", exc)
                busy = False
            except Exception:
                log.exception("webhook delivery step failed")
                busy = False
            if not busy:
                self._stop.wait(self.target.poll_seconds)

    def deliver_due(self) -> bool:
        """Claim and deliver one batch of due entries; True if there was any."""
        now = time.time()
        entries = self.store.claim_outbox(now, now + self.target.lease_seconds)
        for entry in sorted(entries, key=lambda e: e.created_at):
            if self._stop.is_set():
                break  # the entry's lease ends and another deliverer takes it
            self._deliver(entry)
        return bool(entries)

    def _deliver(self, entry: OutboxEntry) -> None:
        error = self.post(entry)
        if error is None:
            self.store.settle_outbox(entry, delivered=True)
            self.observe(entry.type, "delivered")
            return
        retry_at = time.time() + backoff(entry.attempts)
        if retry_at - entry.created_at <= self.target.retry_seconds:
            self.store.settle_outbox(entry, delivered=False, retry_at=retry_at, error=error)
            self.observe(entry.type, "retried")
            return
        self.store.settle_outbox(entry, delivered=False, error=error)
        self.observe(entry.type, "failed")
        log.error("webhook %s (%s, run %s) given up after %d attempts: %s", entry.entry_id,
                  entry.type, entry.run_id, entry.attempts + 1, error)

    def post(self, entry: OutboxEntry) -> str | None:
        """POST one entry, signed; None on a 2xx answer, else what went wrong."""
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": entry.entry_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.target.key, entry.entry_id, timestamp,
                                      entry.payload),
        }
        request = urllib.request.Request(self.target.url, data=entry.payload.encode(),
                                         headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.target.timeout) as answer:
                answer.read(65536)
                return None
        except urllib.error.HTTPError as exc:
            exc.close()
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"


def target_from(settings: dict) -> WebhookTarget | None:
    """The configured webhook, or None when `WEBHOOK_URL` is unset."""
    if not settings["WEBHOOK_URL"]:
        return None
    return WebhookTarget(url=settings["WEBHOOK_URL"],
                         key=secret_bytes(settings["WEBHOOK_SECRET"]),
                         timeout=settings["WEBHOOK_TIMEOUT_SECONDS"],
                         retry_seconds=settings["WEBHOOK_RETRY_SECONDS"],
                         poll_seconds=settings["WEBHOOK_POLL_SECONDS"])
