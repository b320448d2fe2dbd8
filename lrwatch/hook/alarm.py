"""Alarm-level values: rows that should reach the disk now, not at the next ``flush_secs``.

Rows wait on the device and are handed to the writer every ``flush_secs`` (1 s by default): one
hand-off, one host transfer, per second rather than per step. That is right for a healthy run,
and a second too late for one blowing up: at 150 steps/s the daemon would see a NaN 150 steps
after it happened (bench/loop_latency.py). So each step's loss and global gradient norm are
looked at on the host, and an alarm-level step (a non-finite value, or a gradient norm at least
``RATIO`` times the recent median) is flushed as soon as the next step is recorded: the daemon
judges a step once a later step's rows show that all of it is in (lrwatch/analysis/analyzer.py).

Looking must not sync the device. On the CPU a tensor's value is already on the host. On a
CUDA device the two values are copied to pinned host memory without blocking, behind an event,
and read one step later if the event has completed (never waited on): an alarm reaches the disk
one step late instead of up to ``flush_secs`` late.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import torch

RATIO = 10.0  # a grad norm this many times its recent median: the explosion detector's critical
_HISTORY = 64  # recent finite grad norms whose median is the reference
_REFRESH = 16  # steps between two medians of the history


class Alarm:
    """Say whether the step just recorded (on CUDA, the one before) is alarming. Other devices:
    never (their rows wait for ``flush_secs``)."""

    def __init__(self) -> None:
        self._norms: deque[float] = deque(maxlen=_HISTORY)
        self._ref = math.inf
        self._seen = 0
        self._pending: tuple[torch.Tensor, Any] | None = None  # pinned copy, event
        self._pinned: list[torch.Tensor] = []  # two host buffers, used in turn
        self._turn = 0
        self._broken = False

    def check(self, loss: torch.Tensor | None, grad_norm: torch.Tensor | None) -> bool:
        """True when the values just recorded (or those of the previous step) call for a flush."""
        if self._broken:
            return False
        pair = [t for t in (loss, grad_norm) if t is not None]
        if not pair:
            return False
        try:
            # is_cpu/is_cuda, not device.type: each .device builds an object, and this runs
            # every step, where a few microseconds each add up (bench/hook_overhead.py).
            if all(t.is_cpu for t in pair):  # already on the host: ~1 us a value
                return self._judge([t.item() for t in pair], has_norm=grad_norm is not None)
            if all(t.is_cuda for t in pair):
                values = torch.stack([t.detach().reshape(()).float() for t in pair])
                return self._check_async(values, has_norm=grad_norm is not None)
        except Exception:  # noqa: BLE001 - a failed look must not stop the row's normal flush
            self._broken = True
        return False  # other devices, or mixed ones: rows wait for flush_secs as before

    def _check_async(self, values: torch.Tensor, *, has_norm: bool) -> bool:
        """Read the previous step's copy if it has landed; start this step's copy."""
        alarm = False
        if self._pending is not None:
            host, event = self._pending
            if event.query():
                alarm = self._judge(host.tolist(), has_norm=has_norm)
        if not self._pinned or self._pinned[0].shape != values.shape:
            self._pinned = [torch.empty(values.shape, pin_memory=True) for _ in range(2)]
        self._turn ^= 1  # not the buffer the pending copy may still be writing
        host = self._pinned[self._turn]
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        self._pending = (host, event)
        return alarm

    def _judge(self, values: list[float], *, has_norm: bool) -> bool:
        if not all(math.isfinite(v) for v in values):
            return True
        if not has_norm:
            return False
        norm = values[-1]
        alarming = norm >= RATIO * self._ref
        self._norms.append(norm)
        self._seen += 1
        if self._seen % _REFRESH == 0:
            self._ref = statistics.median(self._norms)
        return alarming
