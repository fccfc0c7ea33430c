"""The WSGI entry point: gunicorn serves `wsgi:app`."""

import gc

from app import create_app, start_background

app = create_app()
start_background(app)  # a worker delivers its share of the webhook outbox without waiting

# Everything made so far (the modules, the app) lives as long as the worker: frozen out of the
# collector's scans, so a full collection pauses the worker for a few milliseconds instead of
# the ~50 ms that scanning them took (every request in flight waited that long: the p99).
gc.collect()
gc.freeze()
