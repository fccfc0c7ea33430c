"""Models: one turn in, a stream of content deltas and tool calls out."""

from app.runtime.models.base import (
    ContentDelta,
    Model,
    ModelError,
    ToolCall,
    TurnUsage,
)

__all__ = ["ContentDelta", "Model", "ModelError", "ToolCall", "TurnUsage"]
