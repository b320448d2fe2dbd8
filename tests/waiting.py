"""Waiting on a condition in a test, with a bound: never a sleep used for synchronisation."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], *, timeout: float = 30.0, every: float = 0.02) -> None:
    """Poll ``condition`` every ``every`` seconds until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(every)
