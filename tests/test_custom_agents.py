"""A deployment's own agents served over HTTP: the README's example module, and an agent on
an OpenAI-compatible model that talks to a real loopback server streaming the wire format."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from app import create_app
from app.runtime.agent import Agent
from app.runtime.models.openai_compat import OpenAIChatModel
from app.runtime.tools import tool
from tests.openai_server import (
    FakeProvider,
    Reply,
    chunk,
    serve_fake_provider,
    text_reply,
    tool_call_reply,
)

INVOICE_ARGS = {"customer": "ACME", "amount": 120}


@tool(requires_confirmation=True)
def send_invoice(customer: str, amount: int) -> str:
    """Send an invoice (a person confirms first)."""
    return f"invoice of {amount} sent to {customer}"


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with serve_fake_provider() as fake:
        yield fake


@pytest.fixture
def serve(store) -> Iterator[Callable[..., FlaskClient]]:
    """`serve(**config)`: a test client of an app on the test's store; torn down afterwards."""
    apps = []

    def serve(**config: Any) -> FlaskClient:
        apps.append(create_app({"STORE": store, **config}))
        return apps[-1].test_client()

    yield serve
    for app in apps:
        app.extensions["agentos"].executor.shutdown(wait=True)


@pytest.fixture
def llm_client(provider, serve) -> Iterator[Callable[..., FlaskClient]]:
    """`llm_client(timeout=...)`: a client of an app serving `llm-agent` on the loopback model."""
    models: list[OpenAIChatModel] = []

    def make(timeout: float = 5.0) -> FlaskClient:
        models.append(OpenAIChatModel(model="test-model", base_url=provider.url,
                                      api_key="test-key", timeout=timeout))
        agent = Agent(id="llm-agent", model=models[-1], tools=[send_invoice],
                      instructions="Be brief.")
        return serve(AGENTS=[agent])

    yield make
    for model in models:
        model.close()


def post_run(client: FlaskClient, agent_id: str, message: str) -> dict[str, Any]:
    answer = client.post(f"/agents/{agent_id}/runs", data={"message": message, "stream": "false"})
    assert answer.status_code == 200, answer.json
    return answer.json


def post_continue(client: FlaskClient, run: dict[str, Any], stream: bool = False, **decision):
    tools = [dict(run["tools"][0], **decision)]
    answer = client.post(f"/agents/{run['agent_id']}/runs/{run['run_id']}/continue",
                         data={"tools": json.dumps(tools), "stream": str(stream).lower()})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer


def sse_events(body: str) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: "):]) for line in body.splitlines()
            if line.startswith("data: ")]


# --- the README's example module --------------------------------------------------------------


def test_the_example_module_is_served_and_pauses_for_confirmation(serve):
    client = serve(AGENTOS_AGENTS="examples.my_agents:agents")
    listed = client.get("/agents").json
    assert [a["id"] for a in listed] == ["refund-agent"]
    (refund,) = listed[0]["tools"]["tools"]
    assert (refund["name"], refund["requires_confirmation"]) == ("refund", True)
    assert refund["parameters"]["required"] == ["order_id", "amount"]

    run = post_run(client, "refund-agent", "A-17")
    assert (run["status"], run["tools"][0]["tool_args"]) == (
        "PAUSED", {"order_id": "A-17", "amount": 20})
    done = post_continue(client, run, confirmed=True).json
    assert (done["status"], done["content"]) == (
        "COMPLETED", "Refund: refunded 20.00 on order A-17")


# --- an agent on an OpenAI-compatible model ---------------------------------------------------


def test_openai_agent_pauses_on_a_streamed_tool_call_and_completes(provider, llm_client):
    provider.replies += [tool_call_reply("call_inv1", "send_invoice", INVOICE_ARGS),
                         text_reply("Invoice ", "sent to ", "ACME.")]
    client = llm_client()
    run = post_run(client, "llm-agent", "Bill ACME 120")
    assert (run["status"], run["content"]) == (
        "PAUSED", "I have tools to execute, but I need confirmation.")
    (call,) = run["tools"]
    assert (call["tool_call_id"], call["tool_name"], call["tool_args"]) == (
        "call_inv1", "send_invoice", INVOICE_ARGS)

    body = post_continue(client, run, stream=True, confirmed=True).get_data(as_text=True)
    events = sse_events(body)
    assert [e["content"] for e in events if e["event"] == "RunContent"] == [
        "Invoice ", "sent to ", "ACME."]
    assert events[-1]["event"] == "RunCompleted"
    assert events[-1]["content"] == "Invoice sent to ACME."
    executed = next(e for e in events if e["event"] == "ToolCallCompleted")
    assert executed["content"] == "invoice of 120 sent to ACME"

    first, second = (r["body"] for r in provider.requests)
    assert first["tools"][0]["function"]["name"] == "send_invoice"
    assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Bill ACME 120"}]
    assistant, tool_message = second["messages"][2:]
    assert assistant["tool_calls"][0]["id"] == "call_inv1"
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == INVOICE_ARGS
    assert tool_message == {"role": "tool", "tool_call_id": "call_inv1",
                            "content": "invoice of 120 sent to ACME"}

    stored = client.get(f"/agents/llm-agent/runs/{run['run_id']}").json
    assert (stored["status"], stored["metrics"]["input_tokens"]) == ("COMPLETED", 30)


def test_openai_provider_error_ends_the_run_in_error(provider, llm_client):
    provider.replies.append(
        Reply(status=500, json_body={"error": {"message": "upstream exploded"}}))
    run = post_run(llm_client(), "llm-agent", "hi")
    assert (run["status"], run["content"]) == (
        "ERROR", "Model provider answered 500: upstream exploded")
    assert run["events"][-1]["event"] == "RunError"


def test_openai_timeout_ends_the_run_in_error(provider, llm_client):
    provider.replies.append(Reply(delay=3.0, events=[chunk({"content": "too late"})]))
    run = post_run(llm_client(timeout=0.3), "llm-agent", "hi")
    assert (run["status"], run["content"]) == ("ERROR", "Model request timed out after 0.3s")
    assert run["events"][-1]["event"] == "RunError"
