"""Your own agents: serve them with `AGENTOS_AGENTS=examples.my_agents:agents`.

Swap `ScriptedModel(script)` for `OpenAIChatModel()` (OPENAI_BASE_URL, OPENAI_API_KEY,
OPENAI_MODEL) to let a real model decide when to call the tool.
"""

from app.runtime.agent import Agent
from app.runtime.models.scripted import (
    PlannedCall,
    ScriptedModel,
    latest_user_message,
    tool_results,
)
from app.runtime.tools import tool


@tool(requires_confirmation=True)
def refund(order_id: str, amount: float) -> str:
    """Refund an order; a person confirms first."""
    return f"refunded {amount:.2f} on order {order_id}"


def script(messages):
    """First turn: refund the order named in the message; then report how it went."""
    result = tool_results(messages).get("refund")
    if result is None:
        return [PlannedCall("refund", {"order_id": latest_user_message(messages), "amount": 20})]
    return f"Refund: {result['content']}"


agents = [Agent(id="refund-agent", model=ScriptedModel(script), tools=[refund])]
