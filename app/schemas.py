"""marshmallow schemas: the forms and queries we read, and the objects we answer with.

Input schemas validate (422 with errors per field); output schemas describe our answers in
`/openapi.json`. Unknown form fields are ignored (a client's `run_id` can never pick an id).
"""

from __future__ import annotations

import json
import math
from typing import Any

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    pre_load,
    validate,
    validates_schema,
)

from statemachine.states import WIRE_STATUSES
from statemachine.store import SESSION_SORTS

MAX_ID_LENGTH = 255
MAX_MESSAGE_LENGTH = 100_000
MAX_TOOLS_LENGTH = 512 * 1024
MAX_JSON_DEPTH = 32
TOO_DEEP = f"Nesting deeper than {MAX_JSON_DEPTH} levels."
MAX_EVENT_ID = 2**53 - 1  # an event id every JSON client reads exactly; fits both stores
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})


class FormBool(fields.Field):
    """A form boolean: true/false/1/0/yes/no/on/off in any case, nothing else."""

    default_error_messages = {"invalid": "Not a valid boolean."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise self.make_error("invalid")


class StrictBool(fields.Boolean):
    """A JSON boolean: true or false only (no strings, no numbers)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in `value` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth) for child in children)
    return deepest


def strict_json(text: str | bytes) -> Any:
    """`json.loads` without Python's extensions: NaN, Infinity and numbers too large for a
    float are not JSON (stored, they could never be answered as JSON again)."""
    return json.loads(text, parse_constant=_not_json, parse_float=_finite_float)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _shallow(value: Any) -> None:
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValidationError(TOO_DEEP)


def _id(**kwargs: Any) -> fields.String:
    return fields.String(validate=validate.Length(min=1, max=MAX_ID_LENGTH), **kwargs)


class InputSchema(Schema):
    class Meta:
        unknown = EXCLUDE


class FormSchema(InputSchema):
    """A form or query: unknown fields are ignored, and an empty optional value is absent.

    The reference treats `session_id=` like no session_id (the Agno Agent UI sends it to start
    a new chat), so an empty string in an optional field falls back to its default. JSON
    objects (tool objects) keep their empty strings: `result: ""` is a result.
    """

    @pre_load
    def _empty_means_absent(self, data: Any, **kwargs: Any) -> Any:
        if not hasattr(data, "items"):
            return data
        return {name: value for name, value in _first_values(data)
                if not (value == "" and name in self.fields and not self.fields[name].required)}


def _first_values(data: Any) -> list[tuple[str, Any]]:
    """A form's or query's fields, the first value of each (as marshmallow reads them)."""
    if hasattr(data, "to_dict"):
        return list(data.to_dict().items())
    return list(data.items())


class ContinueFormSchema(FormSchema):
    tools = fields.String(load_default="", validate=validate.Length(max=MAX_TOOLS_LENGTH))
    session_id = _id(allow_none=True, load_default=None)
    user_id = _id(allow_none=True, load_default=None)
    stream = FormBool(load_default=True)


class CreateRunFormSchema(FormSchema):
    message = fields.String(required=True, validate=validate.Length(min=1,
                                                                    max=MAX_MESSAGE_LENGTH))
    stream = FormBool(load_default=True)
    session_id = _id(allow_none=True, load_default=None)
    user_id = _id(allow_none=True, load_default=None)


class UserInputFieldSchema(InputSchema):
    name = fields.String(required=True)
    field_type = fields.String(allow_none=True)
    description = fields.String(allow_none=True)
    value = fields.Raw(allow_none=True)


class ToolInputSchema(InputSchema):
    """A tool object a client sends back; only decision fields matter, all are typed."""

    tool_call_id = fields.String(required=True, validate=validate.Length(min=1,
                                                                         max=MAX_ID_LENGTH))
    tool_name = fields.String(allow_none=True)
    tool_args = fields.Dict(allow_none=True)
    tool_call_error = StrictBool(allow_none=True)
    result = fields.String(allow_none=True)
    metrics = fields.Dict(allow_none=True)
    child_run_id = fields.String(allow_none=True)
    stop_after_tool_call = StrictBool(allow_none=True)
    created_at = fields.Integer(allow_none=True, strict=True)
    requires_confirmation = StrictBool(allow_none=True)
    confirmed = StrictBool(allow_none=True)
    confirmation_note = fields.String(allow_none=True)
    requires_user_input = StrictBool(allow_none=True)
    user_input_schema = fields.List(fields.Nested(UserInputFieldSchema), allow_none=True)
    user_feedback_schema = fields.List(fields.Raw(), allow_none=True)
    answered = StrictBool(allow_none=True)
    external_execution_required = StrictBool(allow_none=True)
    external_execution_silent = StrictBool(allow_none=True)
    approval_type = fields.String(allow_none=True)
    approval_id = fields.String(allow_none=True)


class ListRunsQuerySchema(FormSchema):
    session_id = _id(load_default=None)
    user_id = _id(load_default=None)
    status = fields.String(load_default=None, validate=validate.OneOf(WIRE_STATUSES))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=1_000_000))


class GetRunQuerySchema(FormSchema):
    session_id = _id(load_default=None)


class EventsQuerySchema(FormSchema):
    last_event_id = fields.Integer(load_default=None,
                                   validate=validate.Range(min=0, max=MAX_EVENT_ID))


class ApprovalsQuerySchema(FormSchema):
    status = fields.String(load_default=None, validate=validate.OneOf(
        ["pending", "approved", "rejected", "expired"]))
    agent_id = _id(load_default=None)
    user_id = _id(load_default=None)
    run_id = _id(load_default=None)
    session_id = _id(load_default=None)
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=1_000_000))


class ApprovalCountQuerySchema(FormSchema):
    user_id = _id(load_default=None)


class ResolveApprovalSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    status = fields.String(required=True, validate=validate.OneOf(["approved", "rejected"]))
    resolution_data = fields.Dict(allow_none=True, load_default=None, validate=_shallow)

    @validates_schema(pass_original=True)
    def _object_body(self, data: dict[str, Any], original: Any, **kwargs: Any) -> None:
        if not isinstance(original, dict):
            raise ValidationError("The body must be a JSON object.")


# -- output schemas (documentation of our answers) -------------------------------------------


class ErrorSchema(Schema):
    detail = fields.String(required=True, metadata={"description": "Error detail message"})
    error_code = fields.String(allow_none=True,
                               metadata={"description": "Error code for categorization"})


class ValidationErrorSchema(ErrorSchema):
    errors = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))


class ConflictSchema(ErrorSchema):
    status = fields.String(metadata={"description": "The run's wire status"})


class UserInputFieldOutSchema(Schema):
    name = fields.String()
    field_type = fields.String()
    description = fields.String(allow_none=True)
    value = fields.Raw(allow_none=True)


class ToolExecutionSchema(Schema):
    tool_call_id = fields.String()
    tool_name = fields.String()
    tool_args = fields.Dict()
    tool_call_error = fields.Boolean(allow_none=True)
    result = fields.String(allow_none=True)
    metrics = fields.Dict(allow_none=True)
    child_run_id = fields.String(allow_none=True)
    stop_after_tool_call = fields.Boolean()
    created_at = fields.Integer()
    requires_confirmation = fields.Boolean(allow_none=True)
    confirmed = fields.Boolean(allow_none=True)
    confirmation_note = fields.String(allow_none=True)
    requires_user_input = fields.Boolean(allow_none=True)
    user_input_schema = fields.List(fields.Nested(UserInputFieldOutSchema), allow_none=True)
    user_feedback_schema = fields.List(fields.Raw(), allow_none=True)
    answered = fields.Boolean(allow_none=True)
    external_execution_required = fields.Boolean(allow_none=True)
    external_execution_silent = fields.Boolean(allow_none=True)
    approval_type = fields.String(allow_none=True)
    approval_id = fields.String(allow_none=True)


class MessageSchema(Schema):
    role = fields.String()
    content = fields.Raw(allow_none=True)
    tool_calls = fields.List(fields.Dict())
    tool_call_id = fields.String()
    tool_name = fields.String()
    tool_call_error = fields.Boolean()
    created_at = fields.Integer()


class RequirementSchema(Schema):
    """The reference's RunRequirement.to_dict(): one per call a paused run waits on."""

    id = fields.String()
    created_at = fields.String(metadata={"description": "ISO 8601"})
    tool_execution = fields.Nested(ToolExecutionSchema)
    user_input_schema = fields.List(fields.Nested(UserInputFieldOutSchema))
    confirmation = fields.Boolean()
    confirmation_note = fields.String()
    external_execution_result = fields.String()


class RunSchema(Schema):
    run_id = fields.String()
    agent_id = fields.String()
    agent_name = fields.String()
    session_id = fields.String()
    user_id = fields.String()
    status = fields.String(validate=validate.OneOf(WIRE_STATUSES))
    content = fields.Raw()
    content_type = fields.String()
    model = fields.String()
    model_provider = fields.String()
    created_at = fields.Integer()
    updated_at = fields.Integer()
    input = fields.Dict()
    messages = fields.List(fields.Nested(MessageSchema))
    tools = fields.List(fields.Nested(ToolExecutionSchema))
    events = fields.List(fields.Dict())
    metrics = fields.Dict()
    session_state = fields.Dict()
    requirements = fields.List(fields.Nested(RequirementSchema), metadata={
        "description": "Only while PAUSED: one per call waiting now"})


class ApprovalSchema(Schema):
    id = fields.String()
    run_id = fields.String()
    session_id = fields.String()
    agent_id = fields.String()
    user_id = fields.String(allow_none=True)
    status = fields.String()
    approval_type = fields.String()
    pause_type = fields.String()
    tool_name = fields.String()
    tool_args = fields.Dict()
    resolution_data = fields.Dict(allow_none=True)
    resolved_by = fields.String(allow_none=True)
    resolved_at = fields.Integer(allow_none=True)
    created_at = fields.Integer()
    updated_at = fields.Integer(allow_none=True)
    run_status = fields.String(allow_none=True)


class PageMetaSchema(Schema):
    page = fields.Integer()
    limit = fields.Integer()
    total_pages = fields.Integer()
    total_count = fields.Integer()


class ApprovalPageSchema(Schema):
    data = fields.List(fields.Nested(ApprovalSchema))
    meta = fields.Nested(PageMetaSchema)


class ApprovalStatusSchema(Schema):
    approval_id = fields.String()
    status = fields.String()
    run_id = fields.String()
    resolved_at = fields.Integer(allow_none=True)
    resolved_by = fields.String(allow_none=True)


class CountSchema(Schema):
    count = fields.Integer()


class AgentToolSchema(Schema):
    name = fields.String()
    description = fields.String()
    parameters = fields.Dict()
    requires_confirmation = fields.Boolean()
    requires_user_input = fields.Boolean()
    external_execution = fields.Boolean()
    requires_approval = fields.Boolean()


class AgentModelSchema(Schema):
    name = fields.String()
    model = fields.String()
    provider = fields.String()


class AgentToolsSchema(Schema):
    tools = fields.List(fields.Nested(AgentToolSchema))


class AgentSchema(Schema):
    """The reference's AgentResponse (the fields this server fills in)."""

    id = fields.String()
    name = fields.String()
    db_id = fields.String()
    description = fields.String(allow_none=True)
    model = fields.Nested(AgentModelSchema)
    tools = fields.Nested(AgentToolsSchema, metadata={
        "description": "The tools, nested under `tools` as the reference nests them"})


class AgentSummarySchema(Schema):
    id = fields.String()
    name = fields.String()
    description = fields.String(allow_none=True)
    db_id = fields.String()


class DatabaseConfigSchema(Schema):
    db_id = fields.String()
    domain_config = fields.Dict()
    tables = fields.List(fields.String())


class SessionConfigSchema(Schema):
    dbs = fields.List(fields.Nested(DatabaseConfigSchema))


class ConfigSchema(Schema):
    """The reference's ConfigResponse: one database, which also holds the sessions."""

    os_id = fields.String()
    name = fields.String()
    os_database = fields.String()
    databases = fields.List(fields.String())
    session = fields.Nested(SessionConfigSchema)
    agents = fields.List(fields.Nested(AgentSummarySchema))
    teams = fields.List(fields.Dict(), metadata={"description": "Always empty"})
    workflows = fields.List(fields.Dict(), metadata={"description": "Always empty"})
    interfaces = fields.List(fields.Dict(), metadata={"description": "Always empty"})


class HealthSchema(Schema):
    status = fields.String()
    instantiated_at = fields.String()


class RootSchema(Schema):
    name = fields.String()
    id = fields.String()
    version = fields.String()


# -- sessions (Agno 2.5.6's session router: its query names, its bodies) --------------------

SESSION_TYPES = ("agent", "team", "workflow")
MAX_SESSION_IDS = 1000
PATH_ID = r"^[A-Za-z0-9_.:-]+$"


def _path_id(**kwargs: Any) -> fields.String:
    """An id a client picks that must later work in a URL path (contract section 1)."""
    return fields.String(validate=[validate.Length(min=1, max=MAX_ID_LENGTH), validate.Regexp(
        PATH_ID, error="Only letters, digits, '-', '_', '.' and ':' are allowed.")], **kwargs)


class SessionInputSchema(FormSchema):
    """An empty query value means the same as an absent one, as in the reference."""


class SessionQuerySchema(SessionInputSchema):
    type = fields.String(load_default="agent", validate=validate.OneOf(SESSION_TYPES))
    user_id = _id(load_default=None)
    db_id = _id(load_default=None)
    table = fields.String(load_default=None, validate=validate.Length(max=MAX_ID_LENGTH))


class SessionRunsQuerySchema(SessionQuerySchema):
    """The reference's run window: epoch seconds, both ends included."""

    created_after = fields.Integer(load_default=None, strict=False,
                                   validate=validate.Range(min=0, max=MAX_EVENT_ID))
    created_before = fields.Integer(load_default=None, strict=False,
                                    validate=validate.Range(min=0, max=MAX_EVENT_ID))


class SessionsQuerySchema(SessionQuerySchema):
    component_id = _id(load_default=None)
    session_name = fields.String(load_default=None,
                                 validate=validate.Length(max=MAX_MESSAGE_LENGTH))
    sort_by = fields.String(load_default="created_at", validate=validate.OneOf(SESSION_SORTS))
    sort_order = fields.String(load_default="desc", validate=validate.OneOf(["asc", "desc"]))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=1000))
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=1_000_000))


class JsonBodySchema(Schema):
    class Meta:
        unknown = EXCLUDE

    @validates_schema(pass_original=True)
    def _object_body(self, data: dict[str, Any], original: Any, **kwargs: Any) -> None:
        if not isinstance(original, dict):
            raise ValidationError("The body must be a JSON object.")


def _session_name(**kwargs: Any) -> fields.String:
    return fields.String(validate=validate.Length(min=1, max=MAX_MESSAGE_LENGTH), **kwargs)


class CreateSessionSchema(JsonBodySchema):
    session_id = _path_id(allow_none=True, load_default=None)
    session_name = _session_name(allow_none=True, load_default=None)
    session_state = fields.Dict(allow_none=True, load_default=None, validate=_shallow)
    metadata = fields.Dict(allow_none=True, load_default=None, validate=_shallow)
    user_id = _id(allow_none=True, load_default=None)
    agent_id = _id(allow_none=True, load_default=None)
    team_id = fields.String(allow_none=True, load_default=None)
    workflow_id = fields.String(allow_none=True, load_default=None)


class UpdateSessionSchema(JsonBodySchema):
    session_name = _session_name(allow_none=True, load_default=None)
    session_state = fields.Dict(allow_none=True, load_default=None, validate=_shallow)
    metadata = fields.Dict(allow_none=True, load_default=None, validate=_shallow)
    summary = fields.Raw(allow_none=True, load_default=None, validate=validate.Equal(
        None, error="Session summaries are not stored by this server."))


class RenameSessionSchema(JsonBodySchema):
    session_name = _session_name(required=True)


class DeleteSessionsSchema(JsonBodySchema):
    """Items are checked here, not by item fields, so each field has one list of messages."""

    session_ids = fields.Raw(required=True, metadata={
        "type": "array", "minItems": 1, "maxItems": MAX_SESSION_IDS,
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}})
    session_types = fields.Raw(load_default=None, metadata={
        "type": "array", "items": {"type": "string", "enum": list(SESSION_TYPES)}})

    @validates_schema
    def _items(self, data: dict[str, Any], **kwargs: Any) -> None:
        ids, types = data.get("session_ids"), data.get("session_types")
        if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_SESSION_IDS:
            raise ValidationError(f"Must be a list of 1 to {MAX_SESSION_IDS} ids.",
                                  "session_ids")
        if any(not isinstance(i, str) or not 1 <= len(i) <= MAX_ID_LENGTH for i in ids):
            raise ValidationError(f"Each id must be 1 to {MAX_ID_LENGTH} characters.",
                                  "session_ids")
        if types is None:
            return
        if not isinstance(types, list) or any(t not in SESSION_TYPES for t in types):
            raise ValidationError(f"Each type must be one of {', '.join(SESSION_TYPES)}.",
                                  "session_types")
        if len(types) != len(ids):
            raise ValidationError("Session IDs and session types must have the same length",
                                  "session_types")


class SessionOutSchema(Schema):
    session_id = fields.String(required=True)
    session_name = fields.String(required=True)
    session_state = fields.Dict(allow_none=True)
    created_at = fields.DateTime(allow_none=True)
    updated_at = fields.DateTime(allow_none=True)


class SessionPageMetaSchema(PageMetaSchema):
    search_time_ms = fields.Float()


class SessionPageSchema(Schema):
    data = fields.List(fields.Nested(SessionOutSchema))
    meta = fields.Nested(SessionPageMetaSchema)


class AgentSessionDetailSchema(Schema):
    user_id = fields.String(allow_none=True)
    agent_session_id = fields.String(required=True)
    session_id = fields.String(required=True)
    session_name = fields.String(required=True)
    session_summary = fields.Dict(allow_none=True)
    session_state = fields.Dict(allow_none=True)
    agent_id = fields.String(allow_none=True)
    total_tokens = fields.Integer(allow_none=True)
    agent_data = fields.Dict(allow_none=True)
    metrics = fields.Dict(allow_none=True)
    metadata = fields.Dict(allow_none=True)
    chat_history = fields.List(fields.Dict(), allow_none=True)
    created_at = fields.DateTime(allow_none=True)
    updated_at = fields.DateTime(allow_none=True)


class SessionRunSchema(Schema):
    """Agno's RunSchema: a run as the session endpoints show it."""

    run_id = fields.String(required=True)
    parent_run_id = fields.String(allow_none=True)
    agent_id = fields.String(allow_none=True)
    user_id = fields.String(allow_none=True)
    status = fields.String(allow_none=True)
    run_input = fields.String(allow_none=True)
    content = fields.Raw(allow_none=True)
    run_response_format = fields.String(allow_none=True)
    reasoning_content = fields.String(allow_none=True)
    reasoning_steps = fields.List(fields.Dict(), allow_none=True)
    metrics = fields.Dict(allow_none=True)
    messages = fields.List(fields.Dict(), allow_none=True)
    tools = fields.List(fields.Dict(), allow_none=True)
    events = fields.List(fields.Dict(), allow_none=True)
    created_at = fields.DateTime(allow_none=True)
    references = fields.List(fields.Dict(), allow_none=True)
    reasoning_messages = fields.List(fields.Dict(), allow_none=True)
    session_state = fields.Dict(allow_none=True)
    images = fields.List(fields.Dict(), allow_none=True)
    videos = fields.List(fields.Dict(), allow_none=True)
    audio = fields.List(fields.Dict(), allow_none=True)
    files = fields.List(fields.Dict(), allow_none=True)
    input_media = fields.Dict(allow_none=True)
