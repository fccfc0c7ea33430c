"""The agent loop: model turns, tool execution, and the pause, completion or error they lead to.

Called by the executor on a RunSession that already holds the run in RUNNING or CONTINUED.
Every step is an event committed through the session, so a stream that follows the store sees
exactly what happened, in order, and a run that stops half-way stops at a committed step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from app.runtime.documents import (
    REJECTED_BY_USER,
    approval_doc,
    event,
    message,
    pause_content,
    public_tool,
    requirements,
    tool_message,
    tool_object,
    waiting_calls,
    waiting_kind,
)
from app.runtime.models import ContentDelta, ModelError, ToolCall, TurnUsage
from app.runtime.resolution import EXECUTE, REJECT, RESULT
from app.runtime.session import APPLY_KEY, STARTED_KEY, RunInterrupted, RunSession
from app.runtime.tools import ToolCallContext, current_call, run_tool
from statemachine.errors import StoreUnavailable
from statemachine.states import Trigger
from statemachine.store import APPROVAL_PENDING, Approval

log = logging.getLogger(__name__)

__all__ = ["APPLY_KEY", "execute", "announce_first_call"]


def execute(session: RunSession) -> None:
    """Apply the decisions a continue recorded (if any), then run turns to a pause or an end."""
    try:
        apply_decisions(session)
        run_turns(session)
    except RunInterrupted:
        log.info("run %s was moved by another process; this worker stops", session.run_id)
    except StoreUnavailable as exc:
        # Every write was already retried for a whole lease: the lease lapses now, and the
        # sweep of whichever worker reaches the store first ends the run ERROR.
        log.error("run %s: the store stayed unavailable for a lease (%s)", session.run_id, exc)
    except ModelError as exc:
        fail(session, str(exc), exc.error_type)
    except Exception:
        log.exception("run %s failed", session.run_id)
        fail(session, "The agent failed with an internal error", "InternalError")


def fail(session: RunSession, content: str, error_type: str) -> None:
    """End the run ERRORED with `content`; quietly give up if another process moved it."""
    session.doc["content"] = content
    try:
        session.write(Trigger.FAIL, [session.event("RunError", content=content,
                                                   error_type=error_type)])
    except RunInterrupted:
        log.info("run %s was moved before its error could be recorded", session.run_id)


def announce_first_call(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The `ToolCallStarted` of the first call a continue executes, for the continue's own
    commit: the events before it are the continue's, so the order stays that of the log, its
    commit still precedes the tool's side effect, and the run saves one commit."""
    by_id = {obj["tool_call_id"]: obj for obj in doc["tools"]}
    for call_id, action in doc.get(APPLY_KEY, []):
        if action == EXECUTE:
            doc[STARTED_KEY] = call_id
            return [event(doc, "ToolCallStarted", tool=public_tool(by_id[call_id]))]
    return []


def apply_decisions(session: RunSession) -> None:
    """Act on the calls a continue resolved: execute, pass a result, or report a rejection."""
    by_id = {obj["tool_call_id"]: obj for obj in session.doc["tools"]}
    announced = session.doc.pop(STARTED_KEY, None)
    for call_id, action in session.doc.pop(APPLY_KEY, []):
        obj = by_id[call_id]
        if action == REJECT:
            note = obj.get("confirmation_note") or REJECTED_BY_USER
            obj["tool_call_error"] = True
            session.doc["messages"].append(tool_message(obj, note, error=True))
        elif action == RESULT:
            session.doc["messages"].append(tool_message(obj, str(obj["result"]), error=False))
        else:
            execute_call(session, obj, announced=call_id == announced)


def run_turns(session: RunSession) -> None:
    """Model turns until the answer is final, a call must wait, or the turn bound is hit."""
    for _ in range(session.agent.max_turns):
        text, calls = model_turn(session)
        session.doc["messages"].append(_assistant_message(text, calls))
        if not calls:
            complete(session, text)
            return
        new_objects = [_new_tool_object(session, call) for call in calls]
        session.doc["tools"].extend(new_objects)
        for obj in new_objects:
            if waiting_kind(obj) is None:
                execute_call(session, obj)
        if waiting_calls(new_objects):
            pause(session, new_objects)
            return
    fail(session, f"The agent stopped after {session.agent.max_turns} model turns without "
                  "a final answer", "MaxTurnsExceeded")


def model_turn(session: RunSession) -> tuple[str, list[ToolCall]]:
    """One streamed model turn: its text (emitted delta by delta) and the calls it makes."""
    model = session.agent.model
    about = {"model": model.id, "model_provider": model.provider}
    session.emit("ModelRequestStarted", **about)
    pieces: list[str] = []
    calls: list[ToolCall] = []
    usage = TurnUsage()
    for item in model.stream_turn(_model_messages(session), _tool_definitions(session)):
        if isinstance(item, ContentDelta) and item.text:
            pieces.append(item.text)
            session.emit("RunContent", content=item.text, content_type="str")
        elif isinstance(item, ToolCall):
            calls.append(item)
        elif isinstance(item, TurnUsage):
            usage = item
    _add_usage(session.doc["metrics"], usage)
    session.emit("ModelRequestCompleted", **about, input_tokens=usage.input_tokens,
                 output_tokens=usage.output_tokens,
                 total_tokens=usage.input_tokens + usage.output_tokens)
    return "".join(pieces), calls


def execute_call(session: RunSession, obj: dict[str, Any], announced: bool = False) -> None:
    """Run one tool now, once its `ToolCallStarted` is committed (`announced`: it already
    is); its error, if any, goes to the model and the run goes on."""
    if not announced:
        session.emit("ToolCallStarted", tool=public_tool(obj), flush=True)
    tool = session.agent.tool(obj["tool_name"])
    started = time.time()
    token = current_call.set(ToolCallContext(session.run_id, obj["tool_call_id"],
                                             obj["tool_name"]))
    try:
        if tool is None:
            raise LookupError(f"Tool {obj['tool_name']} not found")
        result, error = str(run_tool(tool, obj["tool_args"])), False
    except Exception as exc:  # a tool's failure is data for the model, not a crash
        result, error = f"{type(exc).__name__}: {exc}", True
    finally:
        current_call.reset(token)
    ended = time.time()
    obj.update(result=result, tool_call_error=error,
               metrics={"start_time": started, "end_time": ended, "duration": ended - started})
    session.doc["messages"].append(tool_message(obj, result, error))
    if error:
        session.emit("ToolCallError", tool=public_tool(obj), error=result)
    else:
        session.emit("ToolCallCompleted", tool=public_tool(obj), content=result)


def pause(session: RunSession, new_objects: list[dict[str, Any]]) -> None:
    """Pause on this turn's waiting calls, creating their approvals in the same commit."""
    waiting = waiting_calls(new_objects)
    content = pause_content(waiting)
    session.doc["content"] = content
    approvals = [_approval(session, obj) for obj in waiting if obj.get("approval_id")]
    events = [
        session.event("RunContentCompleted"),
        session.event("RunPaused", content=content, tools=[public_tool(o) for o in waiting],
                      requirements=requirements(session.run_id, waiting)),
    ]
    session.write(Trigger.PAUSE, events, approvals=approvals)


def complete(session: RunSession, text: str) -> None:
    session.doc["content"] = text
    metrics = _finish_metrics(session.doc)
    session.write(Trigger.COMPLETE, [
        session.event("RunContentCompleted"),
        session.event("RunCompleted", content=text, content_type="str", metrics=metrics),
    ])


def _approval(session: RunSession, obj: dict[str, Any]) -> Approval:
    doc = approval_doc(session.doc, obj, waiting_kind(obj) or "confirmation")
    return Approval(approval_id=obj["approval_id"], run_id=session.run_id,
                    status=APPROVAL_PENDING, doc=doc)


def _new_tool_object(session: RunSession, call: ToolCall) -> dict[str, Any]:
    tool = session.agent.tool(call.name)
    return tool_object(call.id, call.name, call.arguments, tool)


def _assistant_message(text: str, calls: list[ToolCall]) -> dict[str, Any]:
    if not calls:
        return message("assistant", text)
    return message("assistant", text or None, tool_calls=[
        {"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls
    ])


def _model_messages(session: RunSession) -> list[dict[str, Any]]:
    messages = list(session.doc["messages"])
    if session.agent.instructions:
        messages.insert(0, message("system", session.agent.instructions))
    return messages


def _tool_definitions(session: RunSession) -> list[dict[str, Any]]:
    return [t.definition() for t in session.agent.tools]


def _add_usage(metrics: dict[str, Any], usage: TurnUsage) -> None:
    metrics["input_tokens"] = metrics.get("input_tokens", 0) + usage.input_tokens
    metrics["output_tokens"] = metrics.get("output_tokens", 0) + usage.output_tokens
    metrics["total_tokens"] = metrics["input_tokens"] + metrics["output_tokens"]


def _finish_metrics(doc: dict[str, Any]) -> dict[str, Any]:
    metrics = doc["metrics"]
    metrics["duration"] = round(time.time() - float(doc["created_at"]), 6)
    return metrics
