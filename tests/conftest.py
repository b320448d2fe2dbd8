"""Shared fixtures: deterministic torch, and a guard against threads a test leaves running."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch() -> Iterator[None]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and t.name.startswith("lrwatch")
    ]
    for t in leaked:
        t.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test leaked lrwatch threads: {still}"
