"""GET /console: the operator page. It holds no data and no credential of its own.

The page is static HTML and a little JavaScript that call the public API with the credential
the operator types (kept in the browser's sessionStorage), so the API's auth decides what it
shows: it can never show more than the caller may see.
"""

from __future__ import annotations

from flask import Blueprint, Response, render_template

bp = Blueprint("console", __name__)


@bp.get("/console")
def console() -> Response:
    return Response(render_template("console.html"), content_type="text/html; charset=utf-8")
