"""Each step's measurement on every rank that measures: gradient norms every step, the rest on
logging steps.

Under DDP only rank 0 measures (and writes); under sharding (DTensor parameters) every rank
measures its shards, because a norm is then a sum over the ranks, and each step ends with one
all-reduce that every rank issues, whatever failed in lrwatch on one of them (every rank or
none: a hang in a collective would stop a multi-day job). The monitor holds a
:class:`StepMeasure` on each rank that measures; :class:`lrwatch.hook.recorder.Recorder` turns
its values into rows on the writing rank. Called only from the monitor's hooks, which turn any
exception into one warning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from lrwatch.hook import ranks
from lrwatch.hook.cadence import Cadence
from lrwatch.hook.capture import BackwardEnd
from lrwatch.hook.measure import Exchange, Measurer, Pending, StepGrads
from lrwatch.hook.snapshots import AUTO_LIMIT_BYTES

KEEP_BUFFERS_EVERY = 4  # keep the weight snapshot between logging steps up to this cadence
# ...and at any cadence for parameters up to this size (rollback="auto"'s limit, where three or
# four more copies are kept anyway): a fresh copy of a few MB on the CPU page-faults its way in at
# every logging step, 4-8 ms of a 9-15 ms logging step for the 1.86M-parameter MLP of
# bench/hook_overhead.py, against ~1 ms to copy into memory already in place.
KEEP_BUFFERS_BYTES = AUTO_LIMIT_BYTES
Block = tuple[list[str], torch.Tensor]


class StepMeasure:
    """One rank's measurement of each step: gradient norms every step, the rest on logging steps.

    ``handles``: the forward hook that finds where backward ends; the monitor removes it.
    ``world`` > 0 (sharded): each step ends with one all-reduce, which every rank issues.

    Sharded, a failure in this rank's measuring must not skip that all-reduce: the other ranks
    would wait in it until the process group's timeout. So once a step has begun, every rank
    issues it (:meth:`_exchanger`), a rank that failed with zeros and a 1 in its failure slot;
    every rank reads the reduced failure count at the start of the next step (:meth:`check`)
    and, if any rank failed, every rank stops measuring from that step on, together.
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, world: int, scaler: Any
    ) -> None:
        self.measure = Measurer(model, optimizer, world=world, scaler=scaler)
        self.pending: Pending | None = None  # a logging step between pre and post hook
        self.grads: StepGrads | None = None  # this step's gradient norms
        self.n_grads: int | None = None  # how many gradients they were taken of (no closure)
        # Seconds of this step's all-reduce outside a logging step. Every step pays it whatever
        # the cadence, so "auto" leaves it out of the per-step cost it budgets against: counted,
        # a gloo all-reduce alone can exceed 1% of a step and push the cadence to its maximum.
        self.reduce_s = 0.0
        self.off = False  # sharded: some rank's measuring failed; no rank measures any more
        self.error: Exception | None = None  # sharded: this rank's failure within this step
        self.logging = False  # this step logs (decided alike on every rank)
        self._failures: tuple[int, ranks.LateRead] | None = None  # last step's, reduced
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.handles = BackwardEnd(self.measure.on_backward).attach(model, params)

    def fail(self, exc: Exception) -> None:
        """A measuring stage raised (the monitor's guard caught it): drop this logging step.

        Sharded, the failure is kept for the step's all-reduce to carry to every rank.
        """
        self.pending = None
        if self.measure.world:
            self.error = exc

    def check(self) -> int | None:
        """First in the pre-hook (sharded): the step at which some rank's measuring failed.

        Every rank reads the same reduced count here, a step after its all-reduce, and turns
        measuring off at the same step; None when every rank measured the last step.
        """
        failures, self._failures = self._failures, None
        if failures is None or failures[1].value() == 0:
            return None
        self.off = True
        self.pending = self.grads = self.measure.backward = self.measure.buffers = None
        return failures[0]

    def take_grads(self, closure: bool) -> None:
        """First in the pre-hook, before any clip: the norms the last backward left.

        With a closure the step's gradients come inside ``step()``: taken by :meth:`end`.
        """
        self.grads, self.n_grads = None, None
        if closure or self.off:
            self.measure.backward = None
        else:
            try:
                self.grads = self.measure.step_grads()
            finally:
                # Sharded, counted now: a rollback later in this pre-hook drops the gradients
                # whose norms are taken here, and a rank whose measuring fails after it must
                # still pack as many values as the others (else gloo aborts the job). From the
                # norms when there are (no loop over the parameters), else the parameters.
                if self.measure.world:
                    got = self.grads
                    self.n_grads = got.norms.numel() if got else self.measure.count_grads()

    def begin(self, step: int, cadence: Cadence, closure: bool) -> None:
        """In the pre-hook: start a logging step (weights' norms and snapshot)."""
        self.pending, self.reduce_s = None, 0.0
        self.logging = not self.off and cadence.begin_logging(step)
        if self.logging:
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
        if self.off:
            return None
        if self.measure.world:
            return self._end_sharded(step, pending, cadence, closure, preclip, per_layer)
        if closure:
            self.grads = self.measure.step_grads()
            if pending is not None:
                pending.grads = self.grads
        if pending is None:
            return None
        return finish(self.measure, pending, step, cadence, preclip, per_layer)

    def _end_sharded(
        self,
        step: int,
        pending: Pending | None,
        cadence: Cadence,
        closure: bool,
        preclip: torch.Tensor | None,
        per_layer: bool,
    ) -> Block | None:
        """:meth:`end` on a sharded run: whatever happens, at most one all-reduce, on every rank."""
        exchange = self._exchanger(step, closure, cadence)
        if closure:  # the closure computed the gradients inside step(): their norms now
            self.grads = None
            if self.error is None:
                try:
                    self.grads = self.measure.step_grads()
                except Exception as exc:  # kept for the all-reduce below, which must still run
                    self.error = exc
            if pending is not None:
                pending.grads = self.grads
        if self.logging and pending is None and self.error is None:
            self.error = RuntimeError("the logging step's start was lost")
        if self.error is not None:
            exchange(None)  # raises this rank's error once the all-reduce is done
            return None
        if pending is not None:
            return finish(self.measure, pending, step, cadence, preclip, per_layer, exchange)
        if self.grads is not None:
            t0 = time.perf_counter()
            grads = self.grads
            packed = exchange(lambda proposal: self.measure.pack(grads, []))
            self.measure.unpack(packed, grads, [])
            self.reduce_s = time.perf_counter() - t0
        return None

    def _exchanger(self, step: int, closure: bool, cadence: Cadence) -> Exchange:
        """The step's all-reduce, issued even if this rank's part fails to build."""
        proposal = cadence.proposal if ranks.rank() == 0 else 0  # summed: rank 0's alone

        def exchange(build: Callable[[int], torch.Tensor] | None) -> torch.Tensor:
            packed: torch.Tensor | None = None
            if self.error is None and build is not None:
                try:
                    packed = build(proposal)
                except Exception as exc:  # kept: the all-reduce below must still run
                    self.error = exc
            if packed is None:
                packed = self.measure.failed_packet(
                    logging=self.logging, closure=closure, n_grads=self.n_grads
                )
            if packed is not None:
                ranks.all_sum(packed)
                self._failures = (step, ranks.LateRead(packed[-1:]))
            error, self.error = self.error, None
            if error is not None or packed is None:  # the monitor's guard warns with it
                raise error or RuntimeError("nothing to reduce")
            return packed

        return exchange


def finish(
    measure: Measurer,
    pending: Pending,
    step: int,
    cadence: Cadence,
    preclip: torch.Tensor | None,
    per_layer: bool,
    exchange: Exchange | None = None,
) -> Block | None:
    """End a logging step (on a sharded run, every rank's), then tell the cadence its cost."""
    t0 = time.perf_counter()
    try:
        keep = cadence.every <= KEEP_BUFFERS_EVERY or pending.plan.nbytes <= KEEP_BUFFERS_BYTES
        return measure.finish(
            pending, preclip=preclip, per_layer=per_layer, keep_buffers=keep, exchange=exchange
        )
    finally:
        cadence.logged(step, pending.cost + time.perf_counter() - t0, agreed=pending.agreed)
