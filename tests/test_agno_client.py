"""Agno's own client (`AgentOSClient`, `RemoteAgent`, agno 2.5.6) against a live gunicorn.

One gunicorn per store for the whole module. Every answer is parsed by the client's own
models (ConfigResponse, AgentResponse, RunOutput, the typed run events), unchanged: what
works here works for anyone who points Agno's client at this server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest
import requests

from tests.servers import unavailable

try:
    import agno.client  # noqa: F401
except ImportError:
    unavailable("Agno client tests SKIPPED: agno==2.5.6 (the dev extra) is not installed",
                required_by="CI", module=True)

from agno.agent import RemoteAgent  # noqa: E402
from agno.client import AgentOSClient  # noqa: E402
from agno.db.base import SessionType  # noqa: E402
from agno.os.routers.agents.schema import AgentResponse  # noqa: E402
from agno.os.schema import (  # noqa: E402
    AgentSessionDetailSchema,
    ConfigResponse,
    RunSchema,
    SessionSchema,
)
from agno.run.agent import RunOutput, RunPausedEvent  # noqa: E402
from agno.run.base import RunStatus  # noqa: E402
from agno.utils.http import aclose_default_clients, close_sync_client  # noqa: E402

from tests.conftest import _drop_prefix  # noqa: E402
from tests.servers import Gunicorn  # noqa: E402

pytestmark = pytest.mark.slow

UI_ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def server(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Gunicorn]:
    """One small gunicorn per store, shared by the module's tests."""
    env = {"AGENTOS_DB": str(tmp_path_factory.mktemp("agno") / "runs.db")}
    prefix = None
    if request.param == "redis":
        prefix = f"agentos-agno-{uuid.uuid4().hex[:10]}"
        env = {"REDIS_URL": request.getfixturevalue("redis_url"), "REDIS_KEY_PREFIX": prefix}
    gunicorn = Gunicorn(env=env, workers=1, threads=8).start()
    try:
        yield gunicorn
    finally:
        gunicorn.stop()
        if prefix:
            _drop_prefix(env["REDIS_URL"], prefix)


@pytest.fixture
def client(server: Gunicorn) -> AgentOSClient:
    return AgentOSClient(server.url, timeout=20)


_LOOP: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(scope="module", autouse=True)
def event_loop_for_the_client() -> Iterator[None]:
    """One event loop for the module: the client keeps one shared httpx AsyncClient, which
    must not outlive the loop it was made on; it is closed here, then the loop."""
    loop = asyncio.new_event_loop()
    _LOOP.append(loop)
    try:
        yield
    finally:
        loop.run_until_complete(aclose_default_clients())
        close_sync_client()
        loop.close()
        _LOOP.clear()


def run(coroutine):
    return _LOOP[0].run_until_complete(coroutine)


async def collect(events) -> list:
    return [event async for event in events]


def resolve_requirements(requirements, kind: str) -> None:
    """Answer each requirement the way a UI would, through the client's own methods."""
    for requirement in requirements:
        if kind == "confirm":
            requirement.confirm()
        elif kind == "external":
            requirement.set_external_execution_result("sunny")
        elif kind == "input":
            requirement.provide_user_input({"passenger": "Ann"})


PAUSES = {
    "confirm": ("confirm-agent", "hello", "Done: sent to a@example.com"),
    "external": ("external-agent", "Oslo", "Weather: sunny"),
    "input": ("input-agent", "Paris", "Booked: Ann to Paris"),
    "approval": ("approval-agent", "web", "Deployed: deployed web"),
}


# -- discovery ---------------------------------------------------------------------------------


def test_config_and_agents_parse_with_the_clients_models(client):
    config = client.get_config()
    assert isinstance(config, ConfigResponse)
    assert [a.id for a in config.agents][:2] == ["chat-agent", "confirm-agent"]
    assert config.session is not None and config.session.dbs[0].db_id == config.databases[0]
    listed = run(client.list_agents())
    assert [a.id for a in listed] == [a.id for a in config.agents]
    agent = client.get_agent("approval-agent")
    assert isinstance(agent, AgentResponse)
    assert agent.db_id == config.databases[0]
    assert agent.model is not None and agent.model.provider == "Scripted"
    (deploy,) = agent.tools["tools"]
    assert (deploy["requires_approval"], deploy["requires_confirmation"]) == (True, True)
    assert run(client.list_teams()) == []
    assert run(client.list_workflows()) == []


# -- run and continue, for each pause kind -----------------------------------------------------


def _approve(server: Gunicorn, output) -> None:
    (requirement,) = output.active_requirements
    approval_id = requirement.tool_execution.approval_id
    answer = requests.post(f"{server.url}/approvals/{approval_id}/resolve",
                           json={"status": "approved"}, timeout=10)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("kind", PAUSES)
def test_run_and_continue_without_streaming(client, server, kind):
    agent_id, message, answer = PAUSES[kind]
    paused = run(client.run_agent(agent_id, message))
    assert isinstance(paused, RunOutput)
    assert paused.status == RunStatus.paused and paused.is_paused
    assert len(paused.active_requirements) == 1
    if kind == "approval":
        _approve(server, paused)
        tools = []
    else:
        resolve_requirements(paused.active_requirements, kind)
        tools = [r.tool_execution for r in paused.requirements]
    done = run(client.continue_agent_run(agent_id, paused.run_id, tools=tools,
                                         session_id=paused.session_id))
    assert (done.status, done.content) == (RunStatus.completed, answer)
    assert done.active_requirements == []


@pytest.mark.parametrize("kind", ["confirm", "external", "input"])
def test_run_and_continue_streamed(client, kind):
    agent_id, message, answer = PAUSES[kind]
    events = run(collect(client.run_agent_stream(agent_id, message)))
    assert type(events[0]).__name__ == "RunStartedEvent"
    paused = events[-1]
    assert isinstance(paused, RunPausedEvent)
    resolve_requirements(paused.active_requirements, kind)
    tools = [r.tool_execution for r in paused.requirements]
    continued = run(collect(client.continue_agent_run_stream(
        agent_id, paused.run_id, tools=tools, session_id=paused.session_id)))
    names = [type(e).__name__ for e in continued]
    assert names[0] == "RunContinuedEvent" and names[-1] == "RunCompletedEvent"
    assert "ToolCallStartedEvent" in names or kind == "external"
    assert continued[-1].content == answer


def test_active_requirements_list_each_waiting_call(client):
    paused = run(client.run_agent("multi-agent", "x"))
    waiting = paused.active_requirements
    assert [r.tool_execution.tool_name for r in waiting] == ["send_email", "get_weather"]
    assert [r.needs_confirmation for r in waiting] == [True, False]
    assert [r.needs_external_execution for r in waiting] == [False, True]
    assert len({r.id for r in waiting}) == 2
    events = run(collect(client.run_agent_stream("multi-agent", "y")))
    assert [r.tool_execution.tool_name for r in events[-1].active_requirements] == [
        "send_email", "get_weather"]


def test_cancel_a_paused_run(client, server):
    paused = run(client.run_agent("external-agent", "Rome"))
    run(client.cancel_agent_run("external-agent", paused.run_id))
    state = requests.get(f"{server.url}/agents/external-agent/runs/{paused.run_id}", timeout=10)
    assert RunOutput.from_dict(state.json()).status == RunStatus.cancelled


# -- sessions ---------------------------------------------------------------------------------


def test_sessions_through_the_client(client):
    db_id = client.get_config().databases[0]

    async def scenario():
        first = await client.run_agent("chat-agent", "first message")
        session_id = first.session_id
        second = await client.run_agent("chat-agent", "second", session_id=session_id)
        page = await client.get_sessions(session_type=SessionType.AGENT,
                                         component_id="chat-agent", db_id=db_id, limit=100)
        assert all(isinstance(item, SessionSchema) for item in page.data)
        mine = next(item for item in page.data if item.session_id == session_id)
        assert mine.session_name == "first message"
        detail = await client.get_session(session_id, db_id=db_id)
        assert isinstance(detail, AgentSessionDetailSchema)
        assert (detail.session_id, detail.agent_id) == (session_id, "chat-agent")
        runs = await client.get_session_runs(session_id, db_id=db_id)
        assert all(isinstance(r, RunSchema) for r in runs)
        assert [r.run_id for r in runs] == [first.run_id, second.run_id]
        one = await client.get_session_run(session_id, second.run_id, db_id=db_id)
        assert (one.run_id, one.content, one.status) == (second.run_id, "Echo: second",
                                                          "COMPLETED")
        renamed = await client.rename_session(session_id, "renamed", db_id=db_id)
        assert renamed.session_name == "renamed"
        await client.delete_session(session_id, db_id=db_id)
        page = await client.get_sessions(session_type=SessionType.AGENT,
                                         component_id="chat-agent", limit=100)
        assert session_id not in [item.session_id for item in page.data]

    run(scenario())


def test_sessions_create_and_delete_many_through_the_client(client):
    async def scenario():
        made = await client.create_session(session_id=f"s-{uuid.uuid4().hex}",
                                           session_name="made", agent_id="chat-agent")
        assert isinstance(made, AgentSessionDetailSchema) and made.session_name == "made"
        paused = await client.run_agent("confirm-agent", "hold", session_id=made.session_id)
        assert paused.is_paused
        await client.delete_sessions([made.session_id], [SessionType.AGENT])
        with pytest.raises(httpx.HTTPStatusError):
            await client.get_session(made.session_id)

    run(scenario())


# -- RemoteAgent -------------------------------------------------------------------------------


def test_remote_agent_runs_and_continues(server):
    agent = RemoteAgent(base_url=server.url, agent_id="confirm-agent", timeout=20)

    async def scenario():
        paused = await agent.arun("hi", stream=False)
        assert paused.status == RunStatus.paused
        for requirement in paused.active_requirements:
            requirement.reject("not now")
        updated = [r.tool_execution for r in paused.requirements]
        done = await agent.acontinue_run(paused.run_id, updated_tools=updated,
                                         stream=False, session_id=paused.session_id)
        assert (done.status, done.content) == (RunStatus.completed, "Not sent: not now")
        events = [e async for e in agent.arun("again", stream=True)]
        assert isinstance(events[-1], RunPausedEvent)
        assert await agent.acancel_run(events[-1].run_id) is True

    run(scenario())


# -- CORS over real HTTP -----------------------------------------------------------------------


def test_cors_over_http(server):
    preflight = requests.options(f"{server.url}/agents/chat-agent/runs", timeout=10, headers={
        "Origin": UI_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == UI_ORIGIN
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    refused = requests.get(f"{server.url}/agents", timeout=10,
                           headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in refused.headers
