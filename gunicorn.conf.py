"""gunicorn settings, read from the environment (see the README's configuration table)."""

import os
import resource

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '7777')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gevent (the default): every connection is a greenlet, so thousands of open streams and slow
# clients cost memory, not threads; redis-py's socket I/O cooperates, SQLite's scans and tools
# run in small pools of OS threads (see the README's deployment section). `gthread` is the
# alternative: one OS thread per connection, `GUNICORN_THREADS` per worker.
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "2000"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
# Also the bound on a request's headers under gevent: a connection whose request line and
# headers have not arrived within it is closed.
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
# The longest request line gunicorn accepts (its maximum): ids are bounded at 255 characters,
# and a longer line is refused by gunicorn itself with a 414 before the app sees it.
limit_request_line = 8190
accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")

# gunicorn 27 opens a control socket at one path per machine for every master: instances on
# one host would share it. None unless this instance names its own path.
control_socket = os.environ.get("GUNICORN_CONTROL_SOCKET") or None
control_socket_disable = control_socket is None
if control_socket is None:
    del control_socket


def on_starting(server):
    """Each open stream holds a client socket and, while it waits, a Redis connection."""
    _make_prometheus_dir()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
        except (ValueError, OSError) as exc:
            server.log.warning("open files stay limited to %s: %s", soft, exc)


def post_worker_init(worker):
    """The app is loaded: the worker accepts connections next (and says so, for whoever
    must not load an instance before every worker takes its share)."""
    from app.shutdown import install

    install(worker)
    worker.log.info("Worker ready (pid: %s)", worker.pid)


def worker_int(worker):
    from app.shutdown import stop_now

    stop_now(worker)


def worker_exit(server, worker):
    from app.shutdown import stop_now

    stop_now(worker)


# -- Prometheus multiprocess mode (issue 15) ----------------------------------------------------
# Every worker writes its metrics to files in one directory that /metrics aggregates. Unless
# PROMETHEUS_MULTIPROC_DIR is given, each master makes a private temporary one (inherited by
# its workers) and removes it on exit; a dead worker's live gauges are dropped as it exits.
_PROMETHEUS_DIR_MADE = None


def _make_prometheus_dir():
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
