"""Each step's measurement on every rank that measures, and the writing rank's rows.

Under DDP every rank counts steps and applies control actions, but only rank 0 measures and
writes (and an unwritable logdir leaves no rank writing). Under sharding (DTensor parameters)
every rank measures its shards, because a norm is then a sum over the ranks: a
:class:`StepMeasure` runs on each of them, and rank 0 alone also has a :class:`Recorder`, which
holds everything that exists only to write. The monitor's hooks then ask two questions (does
this rank measure? does it write?) instead of one per method. The recorder wires the parts
that compute (:mod:`.capture`, :mod:`.measure`) to the rows that carry their
results (:mod:`.rows`) and the writer thread (:mod:`lrwatch.events.writer`); both classes are
called only from the monitor's hooks, which turn any exception into one warning.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lrwatch.events.writer import EventWriter
from lrwatch.hook import ranks
from lrwatch.hook.alarm import Alarm
from lrwatch.hook.cadence import Cadence
from lrwatch.hook.capture import BackwardEnd, LossCapture, write_named
from lrwatch.hook.measure import Measurer, Pending, StepGrads
from lrwatch.hook.rows import HostColumns, Row, RowBuffer, write_acks

KEEP_BUFFERS_EVERY = 4  # keep the weight snapshot between logging steps up to this cadence
Block = tuple[list[str], torch.Tensor]


class StepMeasure:
    """One rank's measurement of each step: gradient norms every step, the rest on logging steps.

    ``handles``: the forward hook that finds where backward ends; the monitor removes it.
    ``world`` > 0 (sharded): each step ends with one all-reduce, which every rank issues.
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, world: int, scaler: Any
    ) -> None:
        self.measure = Measurer(model, optimizer, world=world, scaler=scaler)
        self.pending: Pending | None = None  # a logging step between pre and post hook
        self.grads: StepGrads | None = None  # this step's gradient norms
        # Seconds of this step's all-reduce outside a logging step. Every step pays it whatever
        # the cadence, so "auto" leaves it out of the per-step cost it budgets against: counted,
        # a gloo all-reduce alone can exceed 1% of a step and push the cadence to its maximum.
        self.reduce_s = 0.0
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.handles = BackwardEnd(self.measure.on_backward).attach(model, params)

    def take_grads(self, *, closure: bool) -> None:
        """First in the pre-hook, before any clip: the norms the last backward left.

        With a closure the step's gradients come inside ``step()``: taken by :meth:`end`.
        """
        if closure:
            self.measure.backward = self.grads = None
        else:
            self.grads = self.measure.step_grads()

    def begin(self, step: int, *, cadence: Cadence, closure: bool) -> None:
        """In the pre-hook: start a logging step (weights' norms and snapshot)."""
        self.pending, self.reduce_s = None, 0.0
        if cadence.begin_logging(step):
            t0 = time.perf_counter()
            self.pending = self.measure.start(self.grads, closure_step=closure)
            self.pending.cost = time.perf_counter() - t0

    def end(
        self,
        step: int,
        *,
        cadence: Cadence,
        closure: bool,
        preclip: torch.Tensor | None,
        per_layer: bool,
    ) -> Block | None:
        """In the post-hook: finish a logging step, or (sharded) reduce the gradient norms."""
        pending, self.pending = self.pending, None
        if closure:
            self.grads = self.measure.step_grads()
            if pending is not None:
                pending.grads = self.grads
        if pending is not None:
            return finish(self.measure, pending, step, cadence, preclip, per_layer)
        if self.measure.world and self.grads is not None:
            t0 = time.perf_counter()
            self.measure.reduce(self.grads, [])
            self.reduce_s = time.perf_counter() - t0
        return None


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

    def before_step(
        self,
        step: int,
        acks: list[int],
        *,
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
        self, step: int, block: Block | None, *, closure: bool, grads: StepGrads | None
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
            write_named(self.writer, self.loss.step_of(step, current), scalars)


def finish(
    measure: Measurer,
    pending: Pending,
    step: int,
    cadence: Cadence,
    preclip: torch.Tensor | None,
    per_layer: bool,
) -> Block | None:
    """End a logging step (on a sharded run, every rank's), then tell the cadence its cost."""
    t0 = time.perf_counter()
    try:
        keep = cadence.every <= KEEP_BUFFERS_EVERY
        return measure.finish(
            pending,
            preclip=preclip,
            per_layer=per_layer,
            keep_buffers=keep,
            proposal=cadence.proposal if ranks.rank() == 0 else 0,  # summed: rank 0's alone
        )
    finally:
        cadence.logged(step, pending.cost + time.perf_counter() - t0, agreed=pending.agreed)
