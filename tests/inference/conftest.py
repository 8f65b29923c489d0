"""Fixtures of the serving tests live in `serving_fixtures.py` (a unique module name, shared with tests/program)."""

from serving_fixtures import served_app, served_server, tiny_chat_dir  # noqa: F401
