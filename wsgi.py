"""The WSGI entry point: gunicorn serves `wsgi:app`."""

from app import create_app, start_background

app = create_app()
start_background(app)  # a worker delivers its share of the webhook outbox without waiting

