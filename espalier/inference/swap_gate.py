"""A gate between requests and a weight swap: requests share it; a swap holds it alone.

A swap first stops new requests, then waits for the ones in flight to finish, so no request
ever runs on a mix of two policies' weights.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from espalier.inference.engine import EngineError


class SwapGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._swapping = False

    @contextmanager
    def shared(self, timeout: float) -> Iterator[None]:
        """Run a request; waits (at most `timeout` s) while a swap is pending or running."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._swapping, timeout):
                raise EngineError(f"the policy's weights were still being swapped after {timeout:.0f} s")
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self, timeout: float) -> Iterator[None]:
        """Swap: hold new requests, wait (at most `timeout` s) for those in flight, then run alone."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._swapping, timeout):
                raise EngineError(f"another weight swap was still running after {timeout:.0f} s")
            self._swapping = True
            if not self._cond.wait_for(lambda: self._active == 0, timeout):
                self._swapping = False
                self._cond.notify_all()
                raise EngineError(f"{self._active} requests were still in flight after {timeout:.0f} s; "
                                  "the policy was not swapped")
        try:
            yield
        finally:
            with self._cond:
                self._swapping = False
                self._cond.notify_all()
