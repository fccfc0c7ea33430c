"""GET /openapi.json and GET /docs.

The document must be OpenAPI 3.1 in shape (structural checks: `openapi-spec-validator` is not a
dependency), and its `continue_agent_run` operation must match the user's own description
(`tests/data/seed-openapi.yaml`, a copy of the seed), so clients generated from it keep working.
The docs page must load everything from this server.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

SEED = yaml.safe_load((Path(__file__).parent / "data" / "seed-openapi.yaml").read_text())
CONTINUE_PATH = "/agents/{agent_id}/runs/{run_id}/continue"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PATH_ITEM_KEYS = METHODS | {"summary", "description", "parameters", "servers", "$ref"}
# Properties our error schemas add to the seed's `{detail, error_code}`, by schema.
DOCUMENTED_EXTRAS = {"ValidationErrorResponse": {"errors"}}
KEY = "openapi-test-key"
# Validation keywords our schemas may add to the seed's definitions: they narrow what the
# server accepts, not the shape of the data, so a client generated from the seed still fits.
CONSTRAINTS = {"maxLength", "minLength"}


@pytest.fixture
def store_kind() -> str:
    """The document does not depend on the store: these tests run on SQLite only."""
    return "sqlite"


@pytest.fixture
def document(client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.json


def refs(value: Any) -> list[str]:
    """Every `$ref` in a JSON value."""
    if isinstance(value, dict):
        own = [value["$ref"]] if isinstance(value.get("$ref"), str) else []
        return own + [r for v in value.values() for r in refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs(v)]
    return []


def resolve(document: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        assert part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def assert_extends(ours: Any, seed: Any, where: str) -> None:
    """`ours` is `seed`, plus at most CONSTRAINTS keywords in any schema object."""
    if isinstance(seed, dict):
        assert isinstance(ours, dict), where
        assert set(ours) - set(seed) <= CONSTRAINTS, (where, set(ours) - set(seed))
        for key, value in seed.items():
            assert key in ours, (where, key)
            assert_extends(ours[key], value, f"{where}.{key}")
    elif isinstance(seed, list):
        assert isinstance(ours, list) and len(ours) == len(seed), where
        for index, (mine, theirs) in enumerate(zip(ours, seed, strict=True)):
            assert_extends(mine, theirs, f"{where}[{index}]")
    else:
        assert ours == seed, where


def operations(document: dict[str, Any]):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


# -- OpenAPI 3.1 in shape ---------------------------------------------------------------------


def test_the_document_is_openapi_3_1_in_shape(document):
    assert re.fullmatch(r"3\.1\.\d+", document["openapi"])
    assert isinstance(document["info"]["title"], str)
    assert isinstance(document["info"]["version"], str)
    assert isinstance(document["paths"], dict) and document["paths"]
    for path, item in document["paths"].items():
        assert path.startswith("/"), path
        assert set(item) <= PATH_ITEM_KEYS, (path, set(item) - PATH_ITEM_KEYS)
    for ref in refs(document):
        resolve(document, ref)


def test_every_operation_is_well_formed(document):
    ids = []
    schemes = document["components"].get("securitySchemes", {})
    for path, method, operation in operations(document):
        where = f"{method.upper()} {path}"
        ids.append(operation["operationId"])
        assert operation["responses"], where
        for status, response in operation["responses"].items():
            assert re.fullmatch(r"[1-5]\d\d|[1-5]XX|default", status), (where, status)
            assert isinstance(response.get("description"), str), (where, status)
        params = operation.get("parameters", [])
        assert all({"name", "in"} <= set(p) for p in params), where
        declared = {p["name"] for p in params if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), where
        assert all(p["required"] is True for p in params if p["in"] == "path"), where
        assert all(isinstance(tag, str) for tag in operation.get("tags", [])), where
        for requirement in operation.get("security", []):
            assert set(requirement) <= set(schemes), where
    assert len(ids) == len(set(ids)), "operationIds must be unique"


# -- the continue operation matches the seed --------------------------------------------------


def seed_operation() -> dict[str, Any]:
    return SEED["paths"][CONTINUE_PATH]["post"]


def test_continue_operation_matches_the_seed(document):
    ours, seed = document["paths"][CONTINUE_PATH]["post"], seed_operation()
    for key in ("operationId", "tags", "summary", "parameters", "security"):
        assert ours[key] == seed[key], key
    assert [m for m in document["paths"][CONTINUE_PATH] if m in METHODS] == ["post"]
    for media_type, body in seed["requestBody"]["content"].items():
        assert ours["requestBody"]["content"][media_type]["schema"] == body["schema"]
    assert document["components"]["securitySchemes"]["HTTPBearer"] == \
        SEED["components"]["securitySchemes"]["HTTPBearer"]


def test_continue_form_body_matches_the_seed(document):
    ours = document["components"]["schemas"]["Body_continue_agent_run"]
    assert_extends(ours, SEED["components"]["schemas"]["Body_continue_agent_run"], "Body")
    properties = ours["properties"]
    assert set(properties) == {"tools", "session_id", "user_id", "stream"}
    assert (properties["tools"]["type"], properties["tools"]["default"]) == ("string", "")
    assert (properties["stream"]["type"], properties["stream"]["default"]) == ("boolean", True)
    for name in ("session_id", "user_id"):
        assert [t["type"] for t in properties[name]["anyOf"]] == ["string", "null"]


def test_continue_responses_match_the_seed(document):
    ours = document["paths"][CONTINUE_PATH]["post"]["responses"]
    seed = seed_operation()["responses"]
    assert set(seed) == {"200", "400", "401", "403", "404", "409", "422", "500"}
    assert set(seed) <= set(ours)
    assert {"application/json", "text/event-stream"} <= set(ours["200"]["content"])
    for status, response in seed.items():
        if status == "200" or "content" not in response:
            continue
        seed_ref = response["content"]["application/json"]["schema"]["$ref"]
        our_ref = ours[status]["content"]["application/json"]["schema"]["$ref"]
        assert our_ref == seed_ref, status
        assert_same_error_schema(resolve(document, our_ref), resolve(SEED, seed_ref))


def assert_same_error_schema(ours: dict[str, Any], seed: dict[str, Any]) -> None:
    """Same type, title, required and property definitions; documented extras only."""
    name = seed["title"]
    for key in ("type", "title", "required"):
        assert ours.get(key) == seed.get(key), (name, key)
    for prop, definition in seed["properties"].items():
        assert_extends(ours["properties"].get(prop), definition, f"{name}.{prop}")
    extras = set(ours["properties"]) - set(seed["properties"])
    assert extras == DOCUMENTED_EXTRAS.get(name, set()), (name, extras)


def test_every_error_answer_is_documented_with_the_error_shape(document):
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            if not status.startswith(("4", "5")):
                continue
            schema = resolve(document, response["content"]["application/json"]["schema"]
                             ["$ref"])
            assert schema["required"] == ["detail"], (method, path, status)
            assert {"detail", "error_code"} <= set(schema["properties"]), (method, path)


# -- the docs page ----------------------------------------------------------------------------


def asset_urls(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_the_docs_page_loads_everything_from_this_server(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert not re.search(r"(?:https?:)?//[\w.-]", html.replace("<!doctype", "")), html
    urls = asset_urls(html)
    assert any(u.endswith(".js") for u in urls) and any(u.endswith(".css") for u in urls)
    for url in [*urls, "/openapi.json"]:
        assert url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.get_data(), url
        asset.close()
    assert "/openapi.json" in html


@pytest.mark.parametrize("app_config", [{"OS_SECURITY_KEY": KEY}], ids=["security-key"])
def test_the_document_and_the_docs_need_no_credentials(client):
    html = client.get("/docs").get_data(as_text=True)
    for url in ["/openapi.json", "/docs", *asset_urls(html)]:
        response = client.get(url)
        assert response.status_code == 200, url
        response.close()
    assert client.get("/agents").status_code == 401


# Routes that are not API operations: the document itself, its docs page and their assets,
# the operator page (HTML) and Prometheus' scrape (its text format).
UNDOCUMENTED = {"/openapi.json", "/docs", "/docs/assets/{name}", "/static/{filename}",
                "/console", "/metrics"}


def test_every_served_route_is_described(app, document):
    """The document cannot drift from the routes: each route and method is an operation."""
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        if path in UNDOCUMENTED:
            continue
        assert path in document["paths"], path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in document["paths"][path], (method, path)
