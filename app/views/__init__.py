"""Thin views: validate, call one service function, answer."""
