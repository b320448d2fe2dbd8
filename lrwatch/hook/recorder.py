"""The writing rank's rows: loss, gradient norm, LR and each logging step's values.

Under DDP every rank counts steps and applies control actions, but only rank 0 measures and
writes (and an unwritable logdir leaves no rank writing). Under sharding every rank measures
(:mod:`.steps`), and rank 0 alone also has a :class:`Recorder`, which holds everything that
exists only to write. The monitor's hooks then ask two questions (does this rank measure? does
it write?) instead of one per method. The recorder wires the loss (:mod:`.capture`) and the
measured values to the rows that carry them (:mod:`.rows`) and the writer thread
(:mod:`lrwatch.events.writer`); it is called only from the monitor's hooks, which turn any
exception into one warning.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lrwatch import schema
from lrwatch.events.writer import EventWriter
from lrwatch.hook.alarm import Alarm
from lrwatch.hook.best import BestCopy
from lrwatch.hook.capture import LossCapture, write_named
from lrwatch.hook.measure import StepGrads
from lrwatch.hook.rows import HostColumns, Row, RowBuffer, write_acks
from lrwatch.hook.steps import Block


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
        flush_secs: float,
    ) -> None:
        self.writer = writer
        self.optimizer = optimizer
        self.rows = RowBuffer()
        self.loss = LossCapture()
        self.handles = self.loss.attach(model, criterion)
        self._host = HostColumns(optimizer, skips)
        self._flush_secs = flush_secs
        self._last_submit = time.monotonic()
        self._alarm = Alarm()
        self._alarmed = False  # the previous step was alarming: flush once this one is in
        self.best: BestCopy | None = None  # set when the run keeps copies for a stop to restore

    def before_step(
        self,
        step: int,
        acks: list[int],
        controller: Any,
        closure: bool,
        grads: StepGrads | None,
    ) -> None:
        """In the pre-hook: acknowledge action ids; the row, unless a closure is to come."""
        if acks:
            self.rows.submit(self.writer, before=step)  # keep every tag's steps in order
            write_acks(self.writer, step, acks, controller=controller, optimizer=self.optimizer)
        if not closure:
            self.add_row(step, grads)

    def after_step(
        self, step: int, block: Block | None, closure: bool, grads: StepGrads | None
    ) -> None:
        """In the post-hook: a closure step's row, the logging step's values; a flush."""
        if closure:  # the closure computed the grads inside step()
            self.add_row(step, grads)
        if block is not None:
            self.rows.add_event(step, *block)
        row = self.rows.last()
        # An alarming step goes to the disk with the next one: the daemon judges a step once a
        # later step's rows show it complete (``mon.log`` may still add to the step just taken).
        alarmed, self._alarmed = self._alarmed, False
        if row is not None and self._alarm.check(row.loss, row.grad_norm):
            self._alarmed = True
        if alarmed:
            self.rows.submit(self.writer, before=step + 1)  # a NaN or a spike: on disk now
            self.writer.flush(timeout=0.0)
            self._last_submit = time.monotonic()
        # One hand-off per flush_secs, not per step: each wakes the writer thread, which then
        # competes with training for the GIL.
        elif time.monotonic() - self._last_submit > self._flush_secs:
            self.rows.submit(self.writer, before=step)
            self._last_submit = time.monotonic()

    def add_row(self, step: int, grads: StepGrads | None) -> None:
        """This step's row: its loss, its gradient norm and host-side values (no sync)."""
        total = grads.total if grads is not None else None
        self.rows.add(Row(step, time.time(), self.loss.take(), total, *self._host.values()))

    def add_skipped_row(self, step: int, scale: float, share: int) -> None:
        """A GradScaler-skipped iteration: its share of the captured losses, flagged skipped."""
        tags, values = self._host.values(skipped_scale=scale)
        self.rows.add(Row(step, time.time(), self.loss.take_share(share), None, tags, values))

    def log(self, step: int | None, current: int, scalars: dict[str, Any]) -> None:
        """``mon.log``: the loss to its step, other names as given (``current``: steps so far).

        Without a ``step``, values logged between a forward and the next optimizer step belong
        to that step, like the loss; logged after ``optimizer.step()``, to the step just taken.
        """
        loss = scalars.pop("loss", None)
        if loss is not None:
            self.loss.log(loss, step, current=current, rows=self.rows, writer=self.writer)
        if scalars:
            at = self.loss.step_of(step, current)
            write_named(self.writer, at, scalars)
            kept = self.best.offer(scalars, at, self.optimizer) if self.best else None
            if kept is not None:  # tells the daemon a stop may name this step
                self.writer.add_scalars(at, [schema.KEPT_BEST], [kept])
