"""Typed messages on a multiprocessing pipe (the trainer's, `training/protocol.py`; the engine's, `engine_process.py`)."""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any


def send_typed(conn: Connection, message: Any, kinds: tuple[type, ...]) -> None:
    """Put `message`, one of `kinds`, on the pipe (pickled); raises OSError when the other end is gone."""
    if not isinstance(message, kinds):
        raise TypeError(f"not one of {[k.__name__ for k in kinds]}: {message!r}")
    conn.send(message)


def receive_typed(conn: Connection, kinds: tuple[type, ...]) -> Any:
    """The next message on the pipe, which must be one of `kinds`; EOFError when the other end closed it."""
    message = conn.recv()
    if not isinstance(message, kinds):
        raise TypeError(f"expected one of {[k.__name__ for k in kinds]} on the pipe, got {type(message).__name__}")
    return message
