"""gunicorn settings, read from the environment (see the README's configuration table)."""

import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '7777')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
worker_class = "gthread"
# Streams can stay open for long; gthread workers heartbeat independently of requests.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = 5
# The longest request line gunicorn accepts (its maximum): ids are bounded at 255 characters,
# and a longer line is refused by gunicorn itself with a 414 before the app sees it.
limit_request_line = 8190
accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")


# -- Prometheus multiprocess mode (issue 15) ----------------------------------------------------
# Every worker writes its metrics to files in one directory that /metrics aggregates. Unless
# PROMETHEUS_MULTIPROC_DIR is given, each master makes a private temporary one (inherited by
# its workers) and removes it on exit; a dead worker's live gauges are dropped as it exits.
_PROMETHEUS_DIR_MADE = None


def on_starting(server):
    global _PROMETHEUS_DIR_MADE
    import tempfile

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _PROMETHEUS_DIR_MADE = tempfile.mkdtemp(prefix="agentos-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _PROMETHEUS_DIR_MADE


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    import shutil

    if _PROMETHEUS_DIR_MADE:
        shutil.rmtree(_PROMETHEUS_DIR_MADE, ignore_errors=True)
