"""The OpenAPI document, built with apispec from our marshmallow schemas.

The continue operation is written out in the shape of the user's seed description (form body
`Body_continue_agent_run`, every response with its `{detail, error_code}` schema), so existing
generated clients keep working; the other operations are described from the same schemas.
"""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from app import schemas

VERSION = "2.5.6"

_ERRORS = {
    "BadRequestResponse": ("Bad request", "BAD_REQUEST"),
    "UnauthenticatedResponse": ("Unauthenticated access", "UNAUTHENTICATED"),
    "ForbiddenResponse": ("Forbidden", "FORBIDDEN"),
    "NotFoundResponse": ("Not found", "NOT_FOUND"),
    "ConflictResponse": ("run is already completed", "RUN_NOT_PAUSED"),
    "ValidationErrorResponse": ("Validation error", "VALIDATION_ERROR"),
    "PayloadTooLargeResponse": ("Request body too large", "PAYLOAD_TOO_LARGE"),
    "InternalServerErrorResponse": ("Internal server error", "INTERNAL_SERVER_ERROR"),
    "ServiceUnavailableResponse": ("The run store is unavailable; retry later",
                                   "SERVICE_UNAVAILABLE"),
}

_STATUS_SCHEMAS = {
    400: ("Bad request", "BadRequestResponse"),
    401: ("Unauthorized", "UnauthenticatedResponse"),
    403: ("Forbidden", "ForbiddenResponse"),
    404: ("Not found", "NotFoundResponse"),
    409: ("Conflict", "ConflictResponse"),
    413: ("Request body too large", "PayloadTooLargeResponse"),
    422: ("Validation Error", "ValidationErrorResponse"),
    500: ("Internal Server Error", "InternalServerErrorResponse"),
    503: ("Service unavailable", "ServiceUnavailableResponse"),
}

_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
_NULLABLE_ID = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": schemas.MAX_ID_LENGTH},
                          {"type": "null"}]}


def _error_schema(name: str, detail: str, code: str) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "properties": {
            "detail": {"type": "string", "title": "Detail", "description": "Error detail message"},
            "error_code": {**_NULLABLE_STRING, "title": "Error Code",
                           "description": "Error code for categorization"},
        },
        "type": "object",
        "required": ["detail"],
        "title": name,
        "example": {"detail": detail, "error_code": code},
    }
    if name == "ValidationErrorResponse":
        schema["properties"]["errors"] = {
            "type": "object", "title": "Errors",
            "additionalProperties": {"type": "array", "items": {}},
        }
    if name == "ConflictResponse":
        schema["properties"]["status"] = {"type": "string", "title": "Status"}
    return schema


def _error(status: int, description: str | None = None) -> dict[str, Any]:
    default, name = _STATUS_SCHEMAS[status]
    return {"description": description or default, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _json(schema: str, description: str = "Successful Response") -> dict[str, Any]:
    return {"description": description, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _json_list(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {
        "type": "array", "items": {"$ref": f"#/components/schemas/{schema}"}}}}}


def _json_list_of(items: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {
        "type": "array", "items": items}}}}


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Retry-safe key: the same key and body replay the first answer; another "
                   "body with the same key is a 422",
    "schema": {"type": "string", "minLength": 1, "maxLength": schemas.MAX_ID_LENGTH},
}


def _path_params(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True,
             "schema": {"type": "string", "title": n.replace("_", " ").title()}} for n in names]


def _query_params(schema: type) -> list[dict[str, Any]]:
    return [{"in": "query", "schema": schema}]


def _form_body(schema_name: str, required: bool = False) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema_name}"}
    return {"required": required,
            "content": {"application/x-www-form-urlencoded": {"schema": ref},
                        "multipart/form-data": {"schema": ref}}}


# One server-sent event (the schema of an event stream describes each of its events).
_EVENT_STREAM = {
    "schema": {"$ref": "#/components/schemas/ServerSentEvent"},
    "example": {"id": "7", "event": "RunContent",
                "data": '{"created_at": 1757348314, "event": "RunContent", "run_id": "123..."}'},
}

_SERVER_SENT_EVENT = {
    "properties": {
        "id": {"type": "string", "pattern": "^[1-9][0-9]*$",
               "description": "Run-scoped sequence number (resume with Last-Event-ID)"},
        "event": {"type": "string", "description": "Event name, also in `data`"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "The event as compact JSON on one line"},
    },
    "type": "object",
    "required": ["id", "event", "data"],
    "title": "ServerSentEvent",
}


def _stream_or_run(description: str) -> dict[str, Any]:
    return {"description": description, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Run"}},
        "text/event-stream": _EVENT_STREAM,
    }}


CONTINUE_DESCRIPTION = (
    "Continue a paused or incomplete agent run with updated tool results.\n\n\n"
    "**Use Cases:**\n\n- Resume execution after tool approval/rejection\n\n"
    "- Provide manual tool execution results\n\n"
    "- Resume after admin approval (tools can be empty; resolution fetched from DB)\n\n\n"
    "**Tools Parameter:**\n\nJSON string containing array of tool execution objects with "
    "results.\n\nCan be empty when an admin-required approval has been resolved."
)

_BODY_CONTINUE = {
    "properties": {
        "tools": {"type": "string", "title": "Tools", "default": "",
                  "maxLength": schemas.MAX_TOOLS_LENGTH},
        "session_id": {**_NULLABLE_ID, "title": "Session Id"},
        "user_id": {**_NULLABLE_ID, "title": "User Id"},
        "stream": {"type": "boolean", "title": "Stream", "default": True},
    },
    "type": "object",
    "title": "Body_continue_agent_run",
}

_BODY_CREATE = {
    "properties": {
        "message": {"type": "string", "title": "Message", "minLength": 1,
                    "maxLength": schemas.MAX_MESSAGE_LENGTH},
        "stream": {"type": "boolean", "title": "Stream", "default": True},
        "session_id": {**_NULLABLE_ID, "title": "Session Id"},
        "user_id": {**_NULLABLE_ID, "title": "User Id"},
    },
    "type": "object",
    "required": ["message"],
    "title": "Body_create_agent_run",
}


def _continue_operation() -> dict[str, Any]:
    return {
        "tags": ["Agents"],
        "summary": "Continue Agent Run",
        "description": CONTINUE_DESCRIPTION,
        "operationId": "continue_agent_run",
        "parameters": _path_params("agent_id", "run_id"),
        "requestBody": _form_body("Body_continue_agent_run"),
        "responses": {
            "200": _stream_or_run("Agent run continued successfully"),
            "400": _error(400, "Invalid JSON in tools field or invalid tool structure"),
            "401": _error(401),
            "403": _error(403, "Run has a pending admin approval and cannot be continued by "
                               "the user yet."),
            "404": _error(404, "Agent not found"),
            "409": _error(409, "Run is not paused (e.g. run is already running, continued, "
                               "or errored). Only PAUSED runs can be continued."),
            "413": _error(413),
            "422": _error(422),
            "500": _error(500),
            "503": _error(503),
        },
        "security": [{"HTTPBearer": []}],
    }


def _op(op_id: str, summary: str, tag: str, responses: dict[int, Any], *,
        params: list | None = None, body: dict | None = None, secure: bool = True):
    operation: dict[str, Any] = {
        "tags": [tag], "summary": summary, "operationId": op_id,
        "parameters": params or [],
        "responses": {str(code): value for code, value in responses.items()},
    }
    if body is not None:
        operation["requestBody"] = body
    if secure:
        operation["security"] = [{"HTTPBearer": []}]
    return operation


def _errors(*codes: int) -> dict[int, Any]:
    return {code: _error(code) for code in (*codes, 500)}


def _paths() -> dict[str, dict[str, Any]]:
    return {**_meta_paths(), **_run_paths(), **_approval_paths(), **_session_paths()}


def _meta_paths() -> dict[str, dict[str, Any]]:
    return {
        "/": {"get": _op("get_root", "API information", "Core",
                         {200: _json("Root")}, secure=False)},
        "/health": {"get": _op("get_health", "Health check", "Core",
                               {200: _json("Health"), 503: _error(503)},
                               params=[{"name": "deep", "in": "query", "required": False,
                                        "schema": {"type": "string"}}], secure=False)},
        "/config": {"get": _op("get_config", "AgentOS configuration", "Core",
                               {200: _json("Config"), **_errors(401, 403)})},
        "/teams": {"get": _op("get_teams", "List teams (always empty)", "Core",
                              {200: _json_list_of({"type": "object"}, "No teams"),
                               **_errors(401)})},
        "/workflows": {"get": _op("get_workflows", "List workflows (always empty)", "Core",
                                  {200: _json_list_of({"type": "object"}, "No workflows"),
                                   **_errors(401)})},
        "/agents": {"get": _op("get_agents", "List agents", "Agents",
                               {200: _json_list("Agent", "The served agents"),
                                **_errors(401, 403)})},
        "/agents/{agent_id}": {"get": _op("get_agent", "Get an agent", "Agents",
                                          {200: _json("Agent"), **_errors(401, 403, 404)},
                                          params=_path_params("agent_id"))},
    }


def _run_paths() -> dict[str, dict[str, Any]]:
    run_params = _path_params("agent_id", "run_id")
    return {
        "/agents/{agent_id}/runs": {
            "post": _op("create_agent_run", "Create Agent Run", "Agents",
                        {200: _stream_or_run("The run, or its event stream"),
                         **_errors(401, 403, 404, 413, 422, 503)},
                        params=[*_path_params("agent_id"), _IDEMPOTENCY_KEY],
                        body=_form_body("Body_create_agent_run", required=True)),
            "get": _op("get_agent_runs", "List Agent Runs", "Agents",
                       {200: _json_list("Run", "Runs, newest first"),
                        **_errors(401, 403, 404, 422, 503)},
                       params=_path_params("agent_id") + _query_params(
                           schemas.ListRunsQuerySchema)),
        },
        "/agents/{agent_id}/runs/{run_id}": {"get": _op(
            "get_agent_run", "Get Agent Run", "Agents",
            {200: _json("Run"), **_errors(401, 403, 404, 422, 503)},
            params=run_params + _query_params(schemas.GetRunQuerySchema))},
        "/agents/{agent_id}/runs/{run_id}/continue": {"post": _continue_operation()},
        "/agents/{agent_id}/runs/{run_id}/cancel": {"post": _op(
            "cancel_agent_run", "Cancel Agent Run", "Agents",
            {200: {"description": "Cancelled", "content": {"application/json": {
                "schema": {"type": "object"}}}}, **_errors(401, 403, 404, 409, 503)},
            params=run_params)},
        "/agents/{agent_id}/runs/{run_id}/events": {"get": _op(
            "get_agent_run_events", "Resume a run's event stream", "Agents",
            {200: {"description": "The run's events after Last-Event-ID", "content": {
                "text/event-stream": _EVENT_STREAM}},
             **_errors(401, 403, 404, 422, 503)},
            params=run_params + _query_params(schemas.EventsQuerySchema) + [
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]{0,15}$"}}])},
    }


def _approval_paths() -> dict[str, dict[str, Any]]:
    approval = _path_params("approval_id")
    return {
        "/approvals": {"get": _op("list_approvals", "List approvals", "Approvals",
                                  {200: _json("ApprovalPage"), **_errors(401, 403, 422, 503)},
                                  params=_query_params(schemas.ApprovalsQuerySchema))},
        "/approvals/count": {"get": _op("count_approvals", "Count pending approvals",
                                        "Approvals",
                                        {200: _json("Count"), **_errors(401, 403, 422, 503)},
                                        params=_query_params(schemas.ApprovalCountQuerySchema))},
        "/approvals/{approval_id}": {
            "get": _op("get_approval", "Get an approval", "Approvals",
                       {200: _json("Approval"), **_errors(401, 403, 404, 503)}, params=approval),
            "delete": _op("delete_approval", "Delete a resolved approval", "Approvals",
                          {204: {"description": "Deleted"}, **_errors(401, 403, 404, 409, 503)},
                          params=approval),
        },
        "/approvals/{approval_id}/status": {"get": _op(
            "get_approval_status", "Get an approval's status", "Approvals",
            {200: _json("ApprovalStatus"), **_errors(401, 403, 404, 503)}, params=approval)},
        "/approvals/{approval_id}/resolve": {"post": _op(
            "resolve_approval", "Resolve an approval", "Approvals",
            {200: _json("Approval"), **_errors(401, 403, 404, 409, 413, 422, 503)},
            params=approval, body={"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ResolveApproval"}}}})},
    }


def _json_body(schema: str, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _session_paths() -> dict[str, dict[str, Any]]:
    """Agno 2.5.6's session router: the same operation ids, queries and bodies."""
    session = _path_params("session_id")

    def one() -> list[dict[str, Any]]:  # a fresh list each time: the plugin expands it
        return _query_params(schemas.SessionQuerySchema)

    detail = {200: _json("AgentSessionDetailSchema"), **_errors(401, 403, 404, 422, 503)}
    return {
        "/sessions": {
            "get": _op("get_sessions", "List Sessions", "Sessions",
                       {200: _json("PaginatedResponse_SessionSchema_"),
                        **_errors(401, 403, 404, 422, 503)},
                       params=_query_params(schemas.SessionsQuerySchema)),
            "post": _op("create_session", "Create New Session", "Sessions",
                        {201: _json("AgentSessionDetailSchema", "Session created"),
                         **_errors(401, 403, 404, 409, 413, 422, 503)},
                        params=one(), body=_json_body("CreateSessionRequest", required=False)),
            "delete": _op("delete_sessions", "Delete Multiple Sessions", "Sessions",
                          {204: {"description": "Deleted"},
                           **_errors(401, 403, 404, 409, 413, 422, 503)},
                          params=one(), body=_json_body("DeleteSessionRequest")),
        },
        "/sessions/{session_id}": {
            "get": _op("get_session_by_id", "Get Session by ID", "Sessions", detail,
                       params=session + one()),
            "patch": _op("update_session", "Update Session", "Sessions",
                         {**detail, 413: _error(413)}, params=session + one(),
                         body=_json_body("UpdateSessionRequest")),
            "delete": _op("delete_session", "Delete Session", "Sessions",
                          {204: {"description": "Deleted with its runs"},
                           **_errors(401, 403, 404, 409, 422, 503)}, params=session + one()),
        },
        "/sessions/{session_id}/rename": {"post": _op(
            "rename_session", "Rename Session", "Sessions", {**detail, 413: _error(413)},
            params=session + one(), body=_json_body("RenameSessionRequest"))},
        "/sessions/{session_id}/runs": {"get": _op(
            "get_session_runs", "Get Session Runs", "Sessions",
            {200: _json_list("RunSchema", "The session's runs, oldest first"),
             **_errors(401, 403, 404, 422, 503)},
            params=session + _query_params(schemas.SessionRunsQuerySchema))},
        "/sessions/{session_id}/runs/{run_id}": {"get": _op(
            "get_session_run", "Get Run by ID", "Sessions",
            {200: _json("RunSchema"), **_errors(401, 403, 404, 422, 503)},
            params=_path_params("session_id", "run_id") + one())},
    }


_OUTPUT_SCHEMAS = {
    "ToolExecution": schemas.ToolExecutionSchema,
    "Run": schemas.RunSchema,
    "Approval": schemas.ApprovalSchema,
    "ApprovalPage": schemas.ApprovalPageSchema,
    "ApprovalStatus": schemas.ApprovalStatusSchema,
    "ResolveApproval": schemas.ResolveApprovalSchema,
    "Count": schemas.CountSchema,
    "Agent": schemas.AgentSchema,
    "Config": schemas.ConfigSchema,
    "Health": schemas.HealthSchema,
    "Root": schemas.RootSchema,
    "SessionSchema": schemas.SessionOutSchema,
    "PaginatedResponse_SessionSchema_": schemas.SessionPageSchema,
    "AgentSessionDetailSchema": schemas.AgentSessionDetailSchema,
    "RunSchema": schemas.SessionRunSchema,
    "CreateSessionRequest": schemas.CreateSessionSchema,
    "UpdateSessionRequest": schemas.UpdateSessionSchema,
    "RenameSessionRequest": schemas.RenameSessionSchema,
    "DeleteSessionRequest": schemas.DeleteSessionsSchema,
}


def build_openapi() -> dict[str, Any]:
    """The whole document; built once per app and cached by the view."""
    spec = APISpec(title="Agno API Reference", version=VERSION, openapi_version="3.1.0",
                   plugins=[MarshmallowPlugin()],
                   info={"description": "AgentOS-compatible server for pausing and continuing "
                                        "agent runs exactly once."})
    spec.components.security_scheme("HTTPBearer", {"type": "http", "scheme": "bearer"})
    for name, schema in _OUTPUT_SCHEMAS.items():
        spec.components.schema(name, schema=schema)
    spec.components.schema("Body_continue_agent_run", _BODY_CONTINUE)
    spec.components.schema("Body_create_agent_run", _BODY_CREATE)
    spec.components.schema("ServerSentEvent", _SERVER_SENT_EVENT)
    for name, (detail, code) in _ERRORS.items():
        spec.components.schema(name, _error_schema(name, detail, code))
    for path, operations in _paths().items():
        spec.path(path=path, operations=operations)
    document = spec.to_dict()
    document["servers"] = []
    return document
