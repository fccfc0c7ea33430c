"""In-process checks of the bounds: the request's store deadline, the body intake, the drain
and the worker-shutdown end of runs, and the gunicorn settings that keep instances apart."""

from __future__ import annotations

import io
import json
import runpy
import threading
from pathlib import Path

import pytest

from app import create_app
from app.intake import BodyIntake
from app.runtime.agent import Agent
from app.runtime.models.scripted import PlannedCall, ScriptedModel, tool_results
from app.runtime.tools import tool
from statemachine import deadline
from statemachine.errors import StoreUnavailable
from statemachine.states import RunState
from tests.servers import wait_until

ROOT = Path(__file__).resolve().parent.parent
RELEASE = threading.Event()


@tool
def wait_for_release() -> str:
    """A tool that blocks until the test lets it go."""
    RELEASE.wait(10)
    return "released"


def _script(messages):
    if "wait_for_release" not in tool_results(messages):
        return [PlannedCall("wait_for_release")]
    return "done"


BLOCKING = Agent(id="blocking-agent", model=ScriptedModel(_script), tools=[wait_for_release])


# -- the store deadline ------------------------------------------------------------------------

def test_a_spent_budget_refuses_store_calls_and_none_suspends_it(store):
    with deadline.budget(0.0):
        with pytest.raises(StoreUnavailable):
            store.ping()
        with deadline.budget(None):
            store.ping()
    store.ping()


def test_a_request_past_its_store_deadline_answers_503(store):
    app = create_app({"STORE": store, "STORE_TIMEOUT_SECONDS": 1e-9})
    try:
        answer = app.test_client().get("/agents/chat-agent/runs")
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        assert answer.json["error_code"] == "SERVICE_UNAVAILABLE"
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)


# -- the body intake ---------------------------------------------------------------------------

def _call(middleware: BodyIntake, body: bytes, length: int) -> tuple[str, bytes]:
    statuses: list[str] = []
    environ = {"REQUEST_METHOD": "POST", "CONTENT_LENGTH": str(length),
               "wsgi.input": io.BytesIO(body)}
    out = b"".join(middleware(environ, lambda status, headers: statuses.append(status)))
    return statuses[0], out


def test_a_body_shorter_than_its_content_length_never_reaches_the_app():
    intake = BodyIntake(None, timeout=1, max_length=1000)
    intake.wsgi_app = lambda environ, start: pytest.fail("the app saw a cut body")
    status, out = _call(intake, b"message=ha", 20)
    assert status.startswith("400") and b"ended before its Content-Length" in out


def test_a_whole_body_is_handed_on_unchanged():
    intake = BodyIntake(_echo_app, timeout=1, max_length=1000)
    assert _call(intake, b"message=hello", 13) == ("200 OK", b"message=hello")


def _echo_app(environ, start_response):
    data = environ["wsgi.input"].read()
    start_response("200 OK", [])
    return [data]


def test_408_is_in_the_error_shape(store):
    app = create_app({"STORE": store})
    try:
        from app.errors import error_response

        with app.app_context():
            assert json.loads(error_response(408, "late").data)["error_code"] == \
                "REQUEST_TIMEOUT"
    finally:
        app.extensions["agentos"].executor.shutdown(wait=True)


# -- drain and worker shutdown -----------------------------------------------------------------

def test_shutdown_ends_executing_runs_with_worker_shutdown_and_refuses_new_ones(store):
    RELEASE.clear()
    app = create_app({"STORE": store, "AGENTS": [BLOCKING]})
    os_ = app.extensions["agentos"]
    try:
        client = app.test_client()
        created = client.post("/agents/blocking-agent/runs", data={"message": "x"})
        run_id = created.headers["Location"].split("/")[4]
        wait_until(lambda: any(e.name == "ToolCallStarted" for e in store.read_events(run_id)),
                   10, what="the tool to start")
        assert os_.service.stop_executing(0.2) == [run_id]
        refused = client.post("/agents/blocking-agent/runs", data={"message": "y"})
        assert refused.status_code == 503 and "shutting down" in refused.json["detail"]
        RELEASE.set()
        wait_until(lambda: not os_.executor.active(), 10, what="the loop to stop")
        run = store.get_run(run_id)
        last = store.read_events(run_id)[-1]
        assert run.state is RunState.ERRORED and run.lease_owner is None
        assert (last.name, last.data["error_type"]) == ("RunError", "WorkerShutdown")
        assert run.doc["content"] == last.data["content"]
    finally:
        RELEASE.set()
        os_.executor.shutdown(wait=True)


# -- gunicorn settings -------------------------------------------------------------------------

def _conf(monkeypatch, **env: str) -> dict:
    for name in ("GUNICORN_CONTROL_SOCKET", "GUNICORN_WORKER_CLASS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


def test_no_control_socket_unless_the_instance_names_its_own(monkeypatch, tmp_path):
    default = _conf(monkeypatch)
    assert default["control_socket_disable"] is True and "control_socket" not in default
    assert default["worker_class"] == "gevent"
    own = _conf(monkeypatch, GUNICORN_CONTROL_SOCKET=str(tmp_path / "a.ctl"),
                GUNICORN_WORKER_CLASS="gthread")
    assert own["control_socket"] == str(tmp_path / "a.ctl")
    assert own["control_socket_disable"] is False and own["worker_class"] == "gthread"
