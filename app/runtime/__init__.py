"""Agents, tools, models and the loop that runs them; nothing here touches flask.request."""
