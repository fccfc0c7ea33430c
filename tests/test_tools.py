"""The `tool` decorator and `load_agents`: what the model and `GET /agents` are told."""

from __future__ import annotations

import pytest

from app.runtime.agent import Agent, load_agents
from app.runtime.models.scripted import ScriptedModel
from app.runtime.tools import CONFIRMATION, EXTERNAL_EXECUTION, USER_INPUT, Tool, tool


def _agent(agent_id: str, *tools: Tool) -> Agent:
    return Agent(id=agent_id, model=ScriptedModel(lambda messages: "ok"), tools=list(tools))


# Targets of load_agents specs below (this module is importable as tests.test_tools).
NOT_AGENTS = ["chat-agent"]
DUPLICATES = [_agent("twin"), _agent("twin")]


def agents_factory() -> list[Agent]:
    return [_agent("made-a"), _agent("made-b")]


@tool
def book(city: str, nights: int, budget: float, late: bool, tags: list[str],
         extras: dict[str, int], note: str = "", rooms: int = 1) -> str:
    """Book a hotel."""
    return f"{city} x{nights}"


@tool(requires_approval=True)
def deploy(app: str) -> str:
    """Deploy an application."""
    return f"deployed {app}"


def test_schema_of_parameters_comes_from_type_hints():
    assert book.json_schema() == {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "nights": {"type": "integer"},
            "budget": {"type": "number"},
            "late": {"type": "boolean"},
            "tags": {"type": "array"},
            "extras": {"type": "object"},
            "note": {"type": "string"},
            "rooms": {"type": "integer"},
        },
        "required": ["city", "nights", "budget", "late", "tags", "extras"],
    }


def test_bare_decorator_names_and_describes_from_the_function():
    assert isinstance(book, Tool)
    assert (book.name, book.description, book.pause_kind) == ("book", "Book a hotel.", None)
    assert book.definition() == {"name": "book", "description": "Book a hotel.",
                                 "parameters": book.json_schema()}
    assert book(city="Oslo", nights=2, budget=1.0, late=False, tags=[], extras={}) == "Oslo x2"


def test_name_and_description_can_be_given():
    @tool(name="lookup", description="Find a thing.")
    def find(query) -> str:
        return query

    assert (find.name, find.description) == ("lookup", "Find a thing.")
    assert find.json_schema()["properties"] == {"query": {"type": "string"}}


def test_describe_shows_an_approval_tool_as_requiring_confirmation():
    assert deploy.describe() == {
        "name": "deploy",
        "description": "Deploy an application.",
        "parameters": {"type": "object", "properties": {"app": {"type": "string"}},
                       "required": ["app"]},
        "requires_confirmation": True,
        "requires_user_input": False,
        "external_execution": False,
        "requires_approval": True,
    }


@pytest.mark.parametrize(("flags", "kind"), [
    ({}, None),
    ({"requires_confirmation": True}, CONFIRMATION),
    ({"requires_approval": True}, CONFIRMATION),
    ({"external_execution": True}, EXTERNAL_EXECUTION),
    ({"requires_user_input": True}, USER_INPUT),
    ({"requires_approval": True, "external_execution": True}, EXTERNAL_EXECUTION),
    ({"requires_approval": True, "requires_user_input": True}, USER_INPUT),
])
def test_pause_kind(flags, kind):
    assert tool(**flags)(lambda x: x).pause_kind == kind


@pytest.mark.parametrize("flags", [
    {"requires_confirmation": True, "external_execution": True},
    {"requires_confirmation": True, "requires_user_input": True},
    {"external_execution": True, "requires_user_input": True},
    {"requires_confirmation": True, "external_execution": True, "requires_approval": True},
])
def test_conflicting_pause_flags_are_rejected(flags):
    def conflicted(x: str) -> str:
        return x

    with pytest.raises(ValueError, match="tool conflicted: choose one pause kind"):
        tool(**flags)(conflicted)


def test_user_input_schema_lists_the_fields_with_types_and_given_values():
    @tool(requires_user_input=True, user_input_fields=["guests", "vip", "unknown"])
    def reserve(table: str, guests: int, vip: bool) -> str:
        return table

    assert reserve.user_input_schema({"table": "t1", "guests": 4}) == [
        {"name": "guests", "field_type": "int", "description": None, "value": 4},
        {"name": "vip", "field_type": "bool", "description": None, "value": None},
        {"name": "unknown", "field_type": "str", "description": None, "value": None},
    ]


def test_user_input_schema_defaults_to_every_parameter():
    @tool(requires_user_input=True)
    def survey(score: float, comments: list, answers: dict) -> str:
        return "thanks"

    schema = survey.user_input_schema({})
    assert [(f["name"], f["field_type"]) for f in schema] == [
        ("score", "float"), ("comments", "list"), ("answers", "dict")]
    assert all(f["value"] is None for f in schema)


def test_an_agent_refuses_two_tools_with_one_name():
    with pytest.raises(ValueError, match="agent twice: two tools share a name"):
        _agent("twice", deploy, deploy)


def test_load_agents_from_a_list():
    agents = load_agents("examples.my_agents:agents")
    assert list(agents) == ["refund-agent"]
    assert agents["refund-agent"].tool("refund").pause_kind == CONFIRMATION


def test_load_agents_from_a_callable():
    assert list(load_agents("tests.test_tools:agents_factory")) == ["made-a", "made-b"]
    assert list(load_agents("app.runtime.demo:demo_agents")) == [
        "chat-agent", "confirm-agent", "external-agent", "input-agent", "approval-agent",
        "multi-agent"]


@pytest.mark.parametrize("spec", ["examples.my_agents", "examples.my_agents:", ":agents", ""])
def test_load_agents_refuses_a_bad_spec(spec):
    with pytest.raises(ValueError, match="AGENTOS_AGENTS must look like package.module:attribute"):
        load_agents(spec)


def test_load_agents_refuses_what_is_not_an_agent():
    with pytest.raises(TypeError, match="tests.test_tools:NOT_AGENTS holds str, not Agent"):
        load_agents("tests.test_tools:NOT_AGENTS")


def test_load_agents_refuses_duplicate_ids():
    with pytest.raises(ValueError, match="two agents share the id 'twin'"):
        load_agents("tests.test_tools:DUPLICATES")


def test_load_agents_reports_a_missing_module_or_attribute():
    with pytest.raises(ModuleNotFoundError):
        load_agents("examples.no_such_module:agents")
    with pytest.raises(AttributeError):
        load_agents("examples.my_agents:no_such_list")


def test_a_resolution_leaves_the_stored_calls_as_they_were():
    import copy

    from app.runtime.documents import tool_object
    from app.runtime.resolution import ToolInputError, resolve_pause

    @tool(requires_user_input=True)
    def book(city: str, nights: int) -> str:
        return f"{city} {nights}"

    @tool(requires_confirmation=True)
    def send(to: str) -> str:
        return to

    stored = [tool_object("c1", "book", {"city": "Oslo"}, book),
              tool_object("c2", "send", {"to": "a@example.com"}, send)]
    before = copy.deepcopy(stored)
    fields = [{"name": "city", "value": "Oslo"}, {"name": "nights", "value": "3"}]
    tools, actions = resolve_pause(stored, [
        {"tool_call_id": "c1", "user_input_schema": fields},
        {"tool_call_id": "c2", "confirmed": True}], {})
    assert actions == [["c1", "execute"], ["c2", "execute"]]
    assert tools[0]["tool_args"] == {"city": "Oslo", "nights": 3}
    assert tools[1]["confirmed"] is True
    assert stored == before
    with pytest.raises(ToolInputError):  # c2 undecided: refused, and still nothing changed
        resolve_pause(stored, [{"tool_call_id": "c1", "user_input_schema": fields}], {})
    assert stored == before
