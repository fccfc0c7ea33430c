"""Browser access (CORS): the reference's default origins plus `CORS_ORIGINS`.

flask-cors answers every preflight (it runs before any view, so no credential is needed for
an OPTIONS request) and adds the `Access-Control-Allow-*` headers to every answer, errors
included, for an allowed origin only: any other origin gets no CORS header at all, and
neither does a request without an `Origin` (not a browser's cross-origin request: flask-cors
is not even asked, which spares every API client its matching on the hot path).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, request
from flask_cors import CORS

# The origins Agno's AgentOS allows out of the box: the local Agent UI and the hosted apps.
DEFAULT_ORIGINS = (
    "http://localhost:3000",
    "https://agno.com",
    "https://www.agno.com",
    "https://app.agno.com",
    "https://os-stg.agno.com",
    "https://os.agno.com",
)


def allowed_origins(setting: Any) -> list[str]:
    """The defaults merged with `CORS_ORIGINS` (comma-separated), each once, in order."""
    extra = [o.strip().rstrip("/") for o in str(setting or "").split(",") if o.strip()]
    return list(dict.fromkeys([*DEFAULT_ORIGINS, *extra]))


def enable_cors(app: Flask, setting: Any) -> None:
    """Exact-match origins (never a pattern), credentials allowed, `Location` readable."""
    CORS(app, origins=allowed_origins(setting), supports_credentials=True,
         expose_headers=["Location"], max_age=600, always_send=False)
    _only_with_origin(app)


def _only_with_origin(app: Flask) -> None:
    """flask-cors's answer hook (the one `CORS` just added) runs only for a request with an
    `Origin`, which every browser preflight and cross-origin request carries."""
    hooks = app.after_request_funcs.setdefault(None, [])
    cors_hook = hooks.pop()
    if cors_hook.__name__ != "cors_after_request":  # a flask-cors that hooks in otherwise
        raise RuntimeError(f"unexpected flask-cors hook {cors_hook!r}")

    def cross_origin_only(response: Response) -> Response:
        return cors_hook(response) if "Origin" in request.headers else response

    hooks.append(cross_origin_only)
