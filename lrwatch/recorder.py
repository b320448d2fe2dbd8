"""The writing rank's half of the monitor: rows, logging steps and the event file.

Under DDP every rank counts steps and applies control actions, but only rank 0 writes (and an
unwritable logdir leaves no rank writing). Everything that exists only to write lives in a
:class:`Recorder`, which the monitor creates on the writing rank alone: its hooks then ask one
question (is there a recorder?) instead of one per method. The recorder wires the parts that
compute (:mod:`lrwatch.capture`, :mod:`lrwatch.measure`) to the rows that carry their results
(:mod:`lrwatch._rows`) and the writer thread (:mod:`lrwatch.writer`); it is called only from
the monitor's hooks, which turn any exception into one warning.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lrwatch._rows import HostColumns, Row, RowBuffer, write_acks
from lrwatch.cadence import Cadence
from lrwatch.capture import LossCapture, write_named
from lrwatch.measure import Measurer, Pending
from lrwatch.writer import EventWriter

KEEP_BUFFERS_EVERY = 4  # keep the weight snapshot between logging steps up to this cadence


class Recorder:
    """Records the steps of one optimizer into ``writer``, which it closes at the end.

    ``handles`` are the forward hooks that capture the loss; the monitor removes them.
    """

    def __init__(
        self,
        writer: EventWriter,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        criterion: torch.nn.Module | None,
        skips: Any,
        full_check: bool,
        flush_secs: float,
    ) -> None:
        self.writer = writer
        self.optimizer = optimizer
        self.rows = RowBuffer()
        self.loss = LossCapture()
        self.measure = Measurer(model, optimizer, full_check=full_check)
        self.pending: Pending | None = None  # a logging step between pre and post hook
        self.handles = self.loss.attach(model, criterion)
        self._host = HostColumns(optimizer, skips)
        self._flush_secs = flush_secs
        self._last_submit = time.monotonic()

    def before_step(
        self, step: int, acks: list[int], *, controller: Any, cadence: Cadence, closure: bool
    ) -> None:
        """In the pre-hook: acknowledge action ids, start a logging step, record the grads."""
        if acks:
            self.rows.submit(self.writer, before=step)  # keep every tag's steps in order
            write_acks(self.writer, step, acks, controller=controller, optimizer=self.optimizer)
        if cadence.begin_logging(step):
            t0 = time.perf_counter()
            self.pending = self.measure.start(closure_step=closure)
            self.pending.cost = time.perf_counter() - t0
        if not closure:
            self.add_row(step)

    def after_step(
        self,
        step: int,
        *,
        cadence: Cadence,
        closure: bool,
        preclip: torch.Tensor | None,
        per_layer: bool,
    ) -> None:
        """In the post-hook: finish a logging step, hand rows to the writer once per flush."""
        if closure:  # the closure computed the grads inside step()
            self.add_row(step)
        pending, self.pending = self.pending, None
        if pending is not None:
            t0 = time.perf_counter()
            try:
                keep = cadence.every <= KEEP_BUFFERS_EVERY
                block = self.measure.finish(
                    pending, preclip=preclip, per_layer=per_layer, keep_buffers=keep
                )
                if block is not None:
                    self.rows.add_event(step, *block)
            finally:
                cadence.logged(step, pending.cost + time.perf_counter() - t0)
        # One hand-off per flush_secs, not per step: each wakes the writer thread, which then
        # competes with training for the GIL.
        if time.monotonic() - self._last_submit > self._flush_secs:
            self.rows.submit(self.writer, before=step)
            self._last_submit = time.monotonic()

    def add_row(self, step: int) -> None:
        """This step's row: its loss and a non-finite check of its gradients (no sync)."""
        pending = self.pending
        t0 = time.perf_counter()
        checks = self.measure.grad_checks(pending)
        if pending is not None:
            pending.cost += time.perf_counter() - t0
        self.rows.add(Row(step, time.time(), self.loss.take(), checks, *self._host.values()))

    def add_skipped_row(self, step: int, scale: float, share: int) -> None:
        """A GradScaler-skipped iteration: its share of the captured losses, flagged skipped."""
        tags, values = self._host.values(skipped_scale=scale)
        self.rows.add(Row(step, time.time(), self.loss.take_share(share), [], tags, values))

    def log(self, step: int | None, current: int, scalars: dict[str, Any]) -> None:
        """``mon.log``: the loss to its step, other names as given (``current``: steps so far)."""
        loss = scalars.pop("loss", None)
        if loss is not None:
            self.loss.log(loss, step, current=current, rows=self.rows, writer=self.writer)
        if scalars:
            write_named(self.writer, current if step is None else int(step), scalars)
