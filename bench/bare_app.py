"""The yardstick: a bare Flask app with one trivial form POST, served like the real one.

`make bench` runs it under the same gunicorn configuration as the server, so the ratio of
our request rate to this one's says what our own work costs per request, on this machine,
in the same run.
"""

from __future__ import annotations

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/echo")
def echo():
    """Parse a small form and answer a small JSON body: the least a form endpoint does."""
    return jsonify({"message": request.form.get("message", ""), "status": "ok"})


@app.get("/health")
def health():
    return jsonify({"status": "ok"})
