"""The run lifecycle: states, the one transitions Machine, and the stores that commit it.

Nothing here knows about HTTP or Flask; `app/` translates these outcomes to status codes.
"""
