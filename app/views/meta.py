"""Root, health, agents, the OpenAPI document and its offline docs page."""

from __future__ import annotations

import functools
import os

import swagger_ui
from flask import Blueprint, Response, jsonify, render_template, request, send_from_directory

from app.auth import authenticate, requires
from app.context import agentos
from app.errors import error_response
from app.observability import exposition
from app.openapi import VERSION, build_openapi
from app.representation import agent_object, config_object
from statemachine.errors import StoreUnavailable

bp = Blueprint("meta", __name__)

# Swagger UI 5 (reads OpenAPI 3.1), shipped as static files by the swagger-ui-py package.
SWAGGER_UI_ASSETS = os.path.join(os.path.dirname(swagger_ui.__file__), "static")


@bp.get("/")
def root() -> Response:
    return jsonify({"name": "AgentOS API", "id": agentos().settings["AGENTOS_ID"],
                    "version": VERSION})


@bp.get("/health")
def health() -> Response:
    deep = request.args.get("deep", "").strip().lower() in ("1", "true", "yes", "on")
    if deep:
        try:
            agentos().store.ping()
        except StoreUnavailable:
            return error_response(503, "The run store is unavailable",
                                  headers={"Retry-After": "1"})
    return jsonify({"status": "ok", "instantiated_at": agentos().instantiated_at})


@bp.get("/config")
@requires("system:read")
def config() -> Response:
    os = agentos()
    return jsonify(config_object(os.settings["AGENTOS_ID"], list(os.agents.values()),
                                 os.db_id))


@bp.get("/agents")
@requires("agents:read")
def list_agents() -> Response:
    os = agentos()
    return jsonify([agent_object(agent, os.db_id) for agent in os.agents.values()])


@bp.get("/agents/<agent_id>")
@requires("agents:read")
def get_agent(agent_id: str) -> Response:
    os = agentos()
    return jsonify(agent_object(os.service.agent(agent_id), os.db_id))


@bp.get("/teams")
@requires()
def list_teams() -> Response:
    """This server serves agents only; the reference's clients still ask."""
    return jsonify([])


@bp.get("/workflows")
@requires()
def list_workflows() -> Response:
    return jsonify([])


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(_openapi_document())


@functools.cache
def _openapi_document() -> dict:
    return build_openapi()


@bp.get("/docs")
def docs() -> Response:
    return Response(render_template("docs.html"), content_type="text/html; charset=utf-8")


@bp.get("/docs/assets/<path:name>")
def docs_assets(name: str) -> Response:
    return send_from_directory(SWAGGER_UI_ASSETS, name, max_age=86400)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format; behind the API's credentials when METRICS_REQUIRE_AUTH=1."""
    if agentos().settings["METRICS_REQUIRE_AUTH"]:
        authenticate(agentos().settings)
    return exposition(agentos().gauges)

