"""The one-line hook: ``mon = lrwatch.watch(model, optimizer, logdir=...)``.

Every ``optimizer.step()`` is observed through the optimizer's step pre- and post-hooks (never by
patching ``step``). Each step leaves one small row (loss, non-finite flag, LR, loss scale) whose
tensors stay on the device until a batch of rows is handed to the background writer; on logging
steps the norms of gradients, weights and the update are computed with batched foreach kernels
(:mod:`.stats`) and written as one event. Nothing here calls ``.item()`` on a device tensor
on the hot path, and no exception raised inside lrwatch reaches the training step.

This module is the wiring every rank runs: the hooks and their handles, the step count, the
control file (:mod:`.controller`), ``close`` and ``state_dict``. The writing rank's work
is in :mod:`.recorder`, which wires :mod:`.capture` (where the loss comes from),
:mod:`.measure` (what a logging step computes) and the rows to the writer thread;
:mod:`.cadence` decides when a step logs.

What ``step`` counts: the optimizer steps of the run, GradScaler-skipped ones included (the HF
Trainer's ``global_step``). The n-th step is recorded at step n (1-based); ``mon.step`` is the
number of steps so far, so ``mon.log()`` after ``optimizer.step()`` lands on the step just taken.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from lrwatch import schema
from lrwatch.errors import ConfigError
from lrwatch.events.writer import EventWriter
from lrwatch.hook import ranks
from lrwatch.hook.amp import skip_counter
from lrwatch.hook.best import BestCopy
from lrwatch.hook.cadence import Cadence
from lrwatch.hook.capture import share
from lrwatch.hook.controller import Controller
from lrwatch.hook.measure import all_params
from lrwatch.hook.recorder import Recorder
from lrwatch.hook.snapshots import AUTO_LIMIT_BYTES, Snapshots, param_bytes
from lrwatch.hook.steps import StepMeasure
from lrwatch.objstore.location import is_url, spool_dir
from lrwatch.objstore.upload import REMOTE_APPLIED, Uploader

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
StepArgs = tuple[tuple[Any, ...], dict[str, Any]]


class StopTraining(Exception):  # noqa: N818  (a signal, not an error)
    """Raised out of ``optimizer.step()`` after a stop action, with ``raise_on_stop=True``."""


def default_logdir() -> Path:
    """``runs/<date>_<host>``, the directory ``SummaryWriter`` would pick."""
    now = datetime.datetime.now().strftime("%b%d_%H-%M-%S")
    return Path("runs") / f"{now}_{socket.gethostname()}"


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Monitor:
    """Monitor ``model`` trained by ``optimizer`` from now on; see :class:`Monitor`."""
    return Monitor(model, optimizer, **kwargs)


class Monitor:
    """Observes every optimizer step of a run and writes lrwatch's tags into its event files.

    Args:
        logdir: run directory (default ``runs/<date>_<host>``), or a URL such as
            ``s3://bucket/runs/exp1`` (``pip install 'lrwatch[s3]'``): then the run is written
            to a local spool directory (``mon.run_dir``) and uploaded by a background thread,
            and the control file comes down the same way (:mod:`lrwatch.objstore`).
        writer: an existing ``SummaryWriter``: lrwatch writes its own event file into its
            ``log_dir``, which TensorBoard shows as the same run.
        criterion: loss module whose grad-enabled forwards are the step's loss (mean over
            gradient-accumulation forwards). Without it, a model output with ``.loss`` (or a
            dict with ``"loss"``) is used, or ``mon.log(loss=...)``.
        scaler: the run's ``torch.amp.GradScaler``: logs its scale and the steps it skipped.
        log_every: steps between the update-ratio and weight-norm computations, or ``"auto"``:
            every step for the first 50, then adapted so their cost stays within ``budget`` of
            the measured step time. The global grad norm is every step's.
        per_layer: also write per-tensor norms and ratios (global values are always written).
        nonfinite: accepted for compatibility (``"sentinel"`` or ``"full"``); every step now
            checks the loss and every gradient, through the global grad norm.
        control: apply the run directory's control file (LR cut, clip, stop). A clip with
            ``optimizer.step(closure)`` acts on the gradients the closure computes.
        raise_on_stop: raise :class:`StopTraining` from ``optimizer.step()`` after a stop.
        rollback: keep in-memory copies of the weights and optimizer state (the first step's
            and the newest two of every 100 steps, on the parameters' device) so that a
            ``rollback`` action can undo a blow-up, and a copy at the lowest validation loss
            passed to ``log`` (one process, not DDP/FSDP) that a stop restores, as Keras's
            ``restore_best_weights``. ``"auto"``: only for parameters up to 32 MB (four copies
            of parameters and optimizer state then hold ~400 MB at most).

    Example::

        with lrwatch.watch(model, optimizer, logdir="runs/exp1", criterion=loss_fn) as mon:
            for x, y in loader:
                loss_fn(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
                if mon.should_stop:
                    break
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        logdir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        criterion: torch.nn.Module | None = None,
        scaler: Any = None,
        log_every: int | Literal["auto"] = "auto",
        budget: float = 0.01,
        per_layer: bool = True,
        nonfinite: Literal["sentinel", "full"] = "sentinel",
        control: bool = True,
        control_every: int = 10,
        min_lr: float = 0.0,
        raise_on_stop: bool = False,
        flush_secs: float = 1.0,
        rollback: bool | Literal["auto"] = "auto",
    ) -> None:
        _validate(log_every, budget, nonfinite, flush_secs)
        if rollback not in (True, False, "auto"):
            raise ConfigError(f"rollback must be True, False or 'auto', not {rollback!r}")
        self.model, self.optimizer = model, optimizer
        self.per_layer, self.raise_on_stop = per_layer, raise_on_stop
        target = _logdir(logdir, writer)
        #: the run's URL when it is in object storage (then ``run_dir`` is the local spool)
        self.url: str | None = target if is_url(target) else None
        self.run_dir = spool_dir(target) if is_url(target) else Path(target)
        self._uploader = self._start_uploader(flush_secs, control) if self.url else None
        self._step = 0
        self._closed = False
        self._warned: set[str] = set()
        self._cadence = Cadence(log_every, budget=budget)
        keep = rollback is True or (
            rollback == "auto" and param_bytes(optimizer) <= AUTO_LIMIT_BYTES
        )
        try:
            self._controller = self._make_controller(control, control_every, min_lr, keep)
        except BaseException:
            if self._uploader is not None:  # a bad setting: nothing was written, stop its thread
                self._uploader.close(timeout=0.0, warn=False)
            raise
        self._skips = skip_counter(scaler)
        self._closure_step = False
        self._recorder: Recorder | None = None  # only the writing rank records
        writer = self._open_writer() if ranks.rank() == 0 else None
        if writer is not None:
            self._recorder = Recorder(
                writer,
                model,
                optimizer,
                criterion=criterion,
                skips=self._skips,
                flush_secs=flush_secs,
            )
        snapshots = self._controller.snapshots if self._controller else None
        if self._recorder is not None and snapshots is not None:
            self._recorder.best = BestCopy(snapshots)
        # Sharded (DTensor) parameters: every rank measures, and the norms are one all-reduce.
        params = all_params(optimizer)
        world = ranks.world() if ranks.sharded(params) else 0
        self._steps: StepMeasure | None = None  # the ranks that measure
        if ranks.flat_sharded(params):  # values lrwatch cannot make right: none rather than wrong
            if writer is not None:
                logger.warning(
                    "lrwatch: FSDP1 (FullyShardedDataParallel) flat parameters: norms and update "
                    "ratios are not measured (use FSDP2, torch.distributed.fsdp.fully_shard); "
                    "loss, LR and control actions work as usual"
                )
        elif writer is not None or world:
            self._steps = StepMeasure(model, optimizer, world=world, scaler=scaler)
        if self._recorder is not None and world:
            self._recorder.rows.hold_events = True
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
            *(self._recorder.handles if self._recorder else ()),
            *(self._steps.handles if self._steps else ()),
        ]

    # ------------------------------------------------------------------ public surface
    @property
    def step(self) -> int:
        """Optimizer steps so far (GradScaler-skipped ones included)."""
        return self._step

    @property
    def log_every(self) -> int:
        """The current cadence of the norm computations, in steps."""
        return self._cadence.every

    @property
    def should_stop(self) -> bool:
        """True once a stop action was applied (from the control file)."""
        return self._controller is not None and self._controller.should_stop

    def log(self, step: int | None = None, **scalars: Tensor | float) -> None:
        """Write ``scalars`` (tensors stay on device) under ``step`` (default: the current one).

        Logged after ``optimizer.step()`` a value belongs to the step just taken; logged between
        a forward and the next step, to that step, so values logged before or after the step of
        one iteration land together. ``loss`` is the training loss (tag ``lrwatch/loss``); other
        names are written as given, e.g. ``mon.log(**{"val/loss": v})``.
        """
        if self._recorder is None:
            return
        try:
            self._recorder.log(step, self._step, scalars)
        except Exception as exc:  # the hook boundary: a bad value never breaks training
            self._warn_once("log", "lrwatch: mon.log() dropped a value (%r)", exc)

    def close(self) -> None:
        """Write everything pending, detach every hook and close the event file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._guard("close", self._finish, None)
        if self._uploader is not None:  # after the last rows reached the spool
            self._guard("uploading the rest", self._uploader.close, None)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Step count, cadence and the controller's applied actions, for a resumed run."""
        return {
            "version": 1,
            "step": self._step,
            "next_log": self._cadence.next_log,
            "log_every": self._cadence.every,
            "controller": self._controller.state_dict() if self._controller else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a run's step count and control state (load the scaler's state first)."""
        if state.get("version") != 1:
            raise ConfigError(f"not an lrwatch Monitor state of version 1: {dict(state)!r:.80}")
        self._step, self._cadence.every = int(state["step"]), int(state["log_every"])
        self._cadence.proposal = self._cadence.every
        self._cadence.next_log = int(state["next_log"])
        if self._controller is not None and state.get("controller") is not None:
            self._controller.load_state_dict(state["controller"])
        if self._skips is not None:
            self._skips.rebase()

    # ------------------------------------------------------------------ optimizer hooks
    # Both hooks run eagerly under a compiled optimizer step: traced, their clocks, dict updates
    # and writer hand-offs would cut the step's graph in a dozen places, for nothing to gain.
    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _pre_hook(
        self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StepArgs | None:
        now = time.perf_counter()
        self._cadence.start_step(now)
        rec = self._recorder
        skipped = self._guard("AMP skip count", self._skips.at_step, []) if self._skips else []
        n_share = share(len(rec.loss.captured), len(skipped)) if rec and skipped else 0
        for scale in skipped:
            self._step += 1
            if rec is not None:
                self._guard(
                    "skipped-step row", rec.add_skipped_row, None, self._step, scale, n_share
                )
        self._step += 1
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0]: the optimizer
        self._closure_step = closure is not None
        steps = self._steps
        if steps is not None:  # before anything clips
            if steps.measure.world:  # only a sharded step's all-reduce reports failed ranks
                self._guard("checking the ranks' measures", self._check_ranks, None, steps, rec)
            self._guard(
                "gradient norms", steps.take_grads, None, closure is not None, measuring=True
            )
        actions: list[Any] = []
        acks: list[int] = []  # action ids to acknowledge at this step (re-acks after a resume)
        new_args: StepArgs | None = None
        if self._controller is not None:  # never raises
            actions = self._controller.before_step(
                self.optimizer, self._step, closure=self._closure_step
            )
            acks = [*self._controller.take_reacks(), *(a.id for a in actions)]
            if closure is not None and self._controller.max_norm is not None:
                # The closure computes this step's gradients inside step(): clip after it.
                clipped = self._controller.clipping_closure(self.optimizer, closure)
                new_args = _with_closure(args, kwargs, clipped)
        # Bound methods and positional arguments, no wrappers: this runs every step, where
        # each Python call costs microseconds (bench/hook_overhead.py).
        cadence, grads = self._cadence, steps.grads if steps is not None else None
        if steps is not None:
            self._guard(
                "pre-step measure", steps.begin, None, self._step, cadence, self._closure_step,
                measuring=True,
            )  # fmt: skip
        if rec is not None:
            self._guard(
                "pre-step logging", rec.before_step, None,
                self._step, acks, self._controller, self._closure_step, grads,
            )  # fmt: skip
        cadence.pre_done(time.perf_counter() - now)
        return new_args

    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _post_hook(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        now = time.perf_counter()
        block = None
        steps, closure = self._steps, self._closure_step
        # Nothing to end on most steps: no logging step under way, no closure's gradients to
        # measure, no all-reduce (sharded runs have one every step).
        if steps is not None and (steps.pending is not None or closure or steps.measure.world):
            block = self._guard("post-step measure", self._end, None, steps, measuring=True)
        if self._recorder is not None:
            grads = steps.grads if steps is not None else None
            self._guard(
                "post-step logging", self._recorder.after_step, None,
                self._step, block, closure, grads,
            )  # fmt: skip
        if self._controller is not None:
            self._controller.after_step(self.optimizer)  # never raises
        reduce_s = steps.reduce_s if steps is not None else 0.0
        self._cadence.post_done(time.perf_counter() - now - reduce_s)
        if self.raise_on_stop and self.should_stop:
            raise StopTraining(f"lrwatch: stop action applied at step {self._step}")

    def _check_ranks(self, steps: StepMeasure, rec: Recorder | None) -> None:
        """Sharded: if a rank failed to measure the last step, every rank stops measuring now."""
        failed = steps.check()
        if failed is None:
            return
        if rec is not None:
            rec.rows.forget_measures(failed)  # a sum without that rank's shards: not written
        logger.warning(
            "lrwatch: a rank failed to measure step %d; every rank stops measuring (norms and "
            "update ratios) from step %d on, training continues",
            failed,
            self._step,
        )

    def _end(self, steps: StepMeasure) -> Any:
        preclip = self._controller.preclip_norm if self._controller else None
        cadence, closure = self._cadence, self._closure_step
        return steps.end(
            self._step, cadence=cadence, closure=closure, preclip=preclip, per_layer=self.per_layer
        )

    # ------------------------------------------------------------------ plumbing
    def _finish(self) -> None:
        rec = self._recorder
        if rec is None:
            return
        if self._steps is not None:
            self._steps.measure.buffers = None
            self._guard("checking the ranks' measures", self._check_ranks, None, self._steps, rec)
        try:
            self._guard("closing skipped steps", self._close_skips, None, rec)
            self._guard("writing the last rows", rec.rows.submit, None, rec.writer)
            # Last: a reader that sees it knows every record of this process is in (issue 9).
            self._guard(
                "marking the run closed",
                rec.writer.add_scalars, None, self._step, [schema.CLOSED], [float(self._step)],
            )  # fmt: skip
        finally:
            rec.writer.close()

    def _close_skips(self, rec: Recorder) -> None:
        """Iterations GradScaler skipped after the last real step."""
        skipped = self._skips.at_end() if self._skips is not None else []
        n_share = share(len(rec.loss.captured), len(skipped) - 1) if skipped else 0
        for scale in skipped:
            self._step += 1
            rec.add_skipped_row(self._step, scale, n_share)

    def _make_controller(
        self, control: bool, control_every: int, min_lr: float, keep: bool
    ) -> Controller | None:
        if not control:
            return None
        return Controller(
            self.run_dir,
            check_every=control_every,
            min_lr=min_lr,
            snapshots=Snapshots() if keep else None,
            # a URL: the control file is the spool's copy, looked at once the bucket answered
            gate=self._uploader.pulled.is_set if self._uploader else None,
            pulled_record=self.run_dir / REMOTE_APPLIED,
        )

    def _start_uploader(self, flush_secs: float, control: bool) -> Uploader | None:
        """The spool's upload thread (rank 0 only: the other ranks neither write nor read)."""
        if ranks.rank() != 0 or self.url is None:
            return None
        try:
            return Uploader(self.run_dir, self.url, put_secs=flush_secs, control=control)
        except Exception as exc:  # a bad spool must not stop the training
            logger.warning("lrwatch cannot upload to %s (%r): training continues", self.url, exc)
            return None

    def _open_writer(self) -> EventWriter | None:
        notify = self._uploader.notify if self._uploader is not None else None
        try:
            return EventWriter(
                self.run_dir, filename_suffix=schema.HOOK_FILE_SUFFIX, on_write=notify
            )
        except Exception as exc:  # an unwritable logdir must not stop the training
            logger.warning(
                "lrwatch cannot write to %s (%r): training continues unlogged", self.run_dir, exc
            )
            return None

    def _guard(self, what: str, fn: Any, default: Any, *args: Any, measuring: bool = False) -> Any:
        """Run ``fn``; any exception becomes one warning (per kind) and ``default``.

        ``measuring``: ``fn`` is a stage of the step's measure, whose failure drops the logging
        step and, sharded, rides on the step's all-reduce to every rank.
        """
        try:
            return fn(*args)
        except Exception as exc:  # the hook boundary: lrwatch never breaks a training step
            steps = self._steps
            if steps is not None and measuring:
                steps.fail(exc)
            elif steps is not None and not steps.measure.world:
                steps.pending = None  # unsharded: no other rank waits on this step's measure
            self._warn_once(what, "lrwatch: %s failed (%r); skipped, training continues", what, exc)
            return default

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key in self._warned:
            logger.debug(msg, *args)
        else:
            self._warned.add(key)
            logger.warning(msg, *args)


def _with_closure(args: tuple[Any, ...], kwargs: dict[str, Any], closure: Any) -> StepArgs:
    """``step``'s arguments (``args[0]``: the optimizer) with ``closure`` for the user's."""
    if len(args) > 1:
        return (args[0], closure, *args[2:]), kwargs
    return args, {**kwargs, "closure": closure}


def _validate(log_every: Any, budget: float, nonfinite: str, flush_secs: float) -> None:
    if log_every != "auto" and (not isinstance(log_every, int) or log_every < 1):
        raise ConfigError(f"log_every must be an integer >= 1 or 'auto', not {log_every!r}")
    if not 0 < budget < 1:
        raise ConfigError(f"budget is a fraction of the step time in (0, 1), not {budget!r}")
    if nonfinite not in ("sentinel", "full"):
        raise ConfigError(f"nonfinite must be 'sentinel' or 'full', not {nonfinite!r}")
    if not flush_secs > 0:
        raise ConfigError(f"flush_secs must be > 0, not {flush_secs!r}")


def _logdir(logdir: str | os.PathLike[str] | None, writer: Any) -> str:
    """The run directory or URL (``s3://...``), as given or as the ``SummaryWriter`` has it."""
    if writer is not None:
        logdir = writer.get_logdir() if hasattr(writer, "get_logdir") else writer.log_dir
    return os.fspath(logdir) if logdir is not None else os.fspath(default_logdir())
