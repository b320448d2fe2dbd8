"""The one-line hook: ``mon = lrwatch.watch(model, optimizer, logdir=...)``.

Every ``optimizer.step()`` is observed through the optimizer's step pre- and post-hooks (never by
patching ``step``). Each step leaves one small row (loss, non-finite flag, LR, loss scale) whose
tensors stay on the device until a batch of rows is handed to the background writer; on logging
steps the norms of gradients, weights and the update are computed with batched foreach kernels
(:mod:`lrwatch.stats`) and written as one event. Nothing here calls ``.item()`` on a device tensor
on the hot path, and no exception raised inside lrwatch reaches the training step.

What ``step`` counts: the optimizer steps of the run, GradScaler-skipped ones included (the HF
Trainer's ``global_step``). The n-th step is recorded at step n (1-based); ``mon.step`` is the
number of steps so far, so ``mon.log()`` after ``optimizer.step()`` lands on the step just taken.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import statistics
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from lrwatch import schema, stats
from lrwatch._amp import SkipCounter
from lrwatch._rows import Row, RowBuffer
from lrwatch.controller import Controller
from lrwatch.errors import ConfigError
from lrwatch.writer import EventWriter

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

MAX_EVERY = 1000  # an adaptive cadence never logs the norms less often than this
KEEP_BUFFERS_EVERY = 4  # keep the weight snapshot between logging steps up to this cadence


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
        logdir: run directory (default ``runs/<date>_<host>``).
        writer: an existing ``SummaryWriter``: lrwatch writes its own event file into its
            ``log_dir``, which TensorBoard shows as the same run.
        criterion: loss module whose grad-enabled forwards are the step's loss (mean over
            gradient-accumulation forwards). Without it, a model output with ``.loss`` (or a
            dict with ``"loss"``) is used, or ``mon.log(loss=...)``.
        scaler: the run's ``torch.amp.GradScaler``: logs its scale and the steps it skipped.
        log_every: steps between the norm computations, or ``"auto"``: adapted so their cost
            stays within ``budget`` of the measured step time.
        per_layer: also write per-tensor norms and ratios (global values are always written).
        nonfinite: per step, check the loss and the small gradients (``"sentinel"``: biases and
            norm gains, which a non-finite activation gradient reaches at every layer) or every
            gradient (``"full"``, one memory pass). Logging steps always check every gradient.
        control: apply the run directory's control file (LR cut, clip, stop).
        raise_on_stop: raise :class:`StopTraining` from ``optimizer.step()`` after a stop.

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
    ) -> None:
        _validate(log_every, budget, nonfinite, flush_secs)
        self.model, self.optimizer = model, optimizer
        self.per_layer, self.raise_on_stop = per_layer, raise_on_stop
        self._full_check = nonfinite == "full"
        self._auto = log_every == "auto"
        self._every = 10 if log_every == "auto" else int(log_every)
        self._budget, self._flush_secs = budget, flush_secs
        self._step = 0
        self._next_log = 1
        self._rank = _rank()
        self._warned: set[str] = set()
        self._closed = False
        self.run_dir = _run_dir(logdir, writer)
        self._controller = (
            Controller(self.run_dir, check_every=control_every, min_lr=min_lr) if control else None
        )
        self._skips = _skip_counter(scaler)
        self._writer = self._open_writer() if self._rank == 0 else None
        self._rows = RowBuffer()
        self._names = _param_names(model)
        self._captured: list[Tensor] = []
        self._explicit: list[Tensor] = []
        self._forwards = 0
        self._closure_step = False
        self._pending: dict[str, Any] | None = None  # a logging step between pre and post hook
        self._buffers: list[Tensor] | None = None
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._n_params = -1
        self._sentinels: list[Tensor] = []
        self._n_amp_tags = 2 if self._skips is not None else 0
        self._lr_tags: tuple[str, ...] = ()
        # Medians of recent samples: an evaluation pass or a checkpoint between two steps, or a
        # preempted logging step, must not swing the cadence.
        self._intervals: deque[float] = deque(maxlen=33)  # seconds per step without logging
        self._costs: deque[float] = deque(maxlen=5)  # seconds of work per logging step
        self._overheads: deque[float] = deque(maxlen=33)  # seconds in the hooks, other steps
        self._t_hooks = 0.0
        self._t_pre = 0.0
        self._logged_last = False
        self._last_submit = time.monotonic()
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        if self._writer is not None:  # only the writing rank needs the loss
            self._handles.append(model.register_forward_hook(self._on_model_forward))
            if criterion is not None:
                self._handles.append(criterion.register_forward_hook(self._on_criterion))
        self._has_criterion = criterion is not None

    # ------------------------------------------------------------------ public surface
    @property
    def step(self) -> int:
        """Optimizer steps so far (GradScaler-skipped ones included)."""
        return self._step

    @property
    def log_every(self) -> int:
        """The current cadence of the norm computations, in steps."""
        return self._every

    @property
    def should_stop(self) -> bool:
        """True once a stop action was applied (from the control file)."""
        return self._controller is not None and self._controller.should_stop

    def log(self, step: int | None = None, **scalars: Tensor | float) -> None:
        """Write ``scalars`` (tensors stay on device) under ``step`` (default: the current one).

        ``loss`` is the training loss (tag ``lrwatch/loss``): logged after ``optimizer.step()``
        it belongs to the step just taken, logged between a forward and the next step to that
        step. Other names are written as given, e.g. ``mon.log(**{"val/loss": v})``.
        """
        try:
            loss = scalars.pop("loss", None)
            if loss is not None:
                self._log_loss(loss, step)
            if scalars and self._writer is not None:
                self._write_named(self._step if step is None else int(step), scalars)
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
            "next_log": self._next_log,
            "log_every": self._every,
            "controller": self._controller.state_dict() if self._controller else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a run's step count and control state (load the scaler's state first)."""
        if state.get("version") != 1:
            raise ConfigError(f"not an lrwatch Monitor state of version 1: {dict(state)!r:.80}")
        self._step, self._every = int(state["step"]), int(state["log_every"])
        self._next_log = int(state["next_log"])
        if self._controller is not None and state.get("controller") is not None:
            self._controller.load_state_dict(state["controller"])
        if self._skips is not None:
            self._skips.rebase()

    # ------------------------------------------------------------------ optimizer hooks
    def _pre_hook(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self._t_pre and not self._logged_last:  # an interval without logging work in it
            self._intervals.append(now - self._t_pre)
        self._t_pre, self._logged_last, self._pending = now, False, None
        skipped = self._guard("AMP skip count", self._skips.at_step, []) if self._skips else []
        share = _share(len(self._captured), len(skipped))
        for scale in skipped:
            self._step += 1
            if self._writer is not None:
                self._guard("skipped-step row", self._add_skipped_row, None, scale, share)
        self._step += 1
        actions: list[Any] = []
        if self._controller is not None:
            actions = self._controller.before_step(self.optimizer, self._step)  # never raises
        if self._writer is not None:
            self._closure_step = (bool(args) and args[0] is not None) or kwargs.get(
                "closure"
            ) is not None
            self._guard("pre-step logging", self._log_before, None, actions)
        self._t_hooks = time.perf_counter() - now

    def _post_hook(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self._writer is not None:
            self._guard("post-step logging", self._log_after, None)
        if self._controller is not None:
            self._controller.after_step(self.optimizer)  # never raises
        if not self._logged_last:  # what every step costs, logging or not
            self._overheads.append(self._t_hooks + time.perf_counter() - now)
        if self.raise_on_stop and self.should_stop:
            raise StopTraining(f"lrwatch: stop action applied at step {self._step}")

    def _log_before(self, actions: list[Any]) -> None:
        if actions:
            self._write_acks(actions)
        if self._step >= self._next_log:
            t0 = time.perf_counter()
            self._next_log = self._step + self._every  # even if this logging step fails
            self._pending = self._start_logging()
            self._pending["cost"] = time.perf_counter() - t0
        if not self._closure_step:
            self._measure_grads()

    def _log_after(self) -> None:
        assert self._writer is not None
        if self._closure_step:  # the closure computed the grads inside step()
            self._measure_grads()
        pending, self._pending = self._pending, None
        if pending is not None:
            t0 = time.perf_counter()
            try:
                self._finish_logging(pending)
            finally:
                self._logged_last = True
                self._adapt(pending["cost"] + time.perf_counter() - t0)
        # One hand-off per flush_secs, not per step: each wakes the writer thread, which then
        # competes with training for the GIL.
        if time.monotonic() - self._last_submit > self._flush_secs:
            self._rows.submit(self._writer, before=self._step)
            self._last_submit = time.monotonic()

    # ------------------------------------------------------------------ per-step rows
    def _measure_grads(self) -> None:
        """This step's row: its loss and a non-finite check of its gradients (no sync)."""
        pending = self._pending
        if pending is not None:
            t0 = time.perf_counter()
            checks = self._grad_norms(pending)
            pending["cost"] += time.perf_counter() - t0
        else:
            grads = [p.grad for p in self._check_params() if p.grad is not None]
            checks = [torch.stack(torch._foreach_norm(grads))] if grads else []
        self._rows.add(Row(self._step, time.time(), self._take_loss(), checks, *self._host()))

    def _add_skipped_row(self, scale: float, share: int) -> None:
        """A GradScaler-skipped iteration: its share of the captured losses, flagged skipped."""
        loss = None
        if share:
            loss = _mean(self._captured[:share])
            del self._captured[:share]
        tags, values = self._host()
        values[-2:] = [scale, 1.0]
        self._rows.add(Row(self._step, time.time(), loss, [], tags, values))

    def _host(self) -> tuple[tuple[str, ...], list[float]]:
        """Host-side values of the row: LR per group (as the optimizer steps with it), scale."""
        groups = self.optimizer.param_groups
        values = [float(g["lr"]) for g in groups]
        if len(groups) != len(self._lr_tags) - self._n_amp_tags:
            amp = (schema.LOSS_SCALE, schema.SKIPPED) if self._skips is not None else ()
            self._lr_tags = tuple(schema.lr_group_tag(i) for i in range(len(groups))) + amp
        if self._skips is not None:
            values += [self._skips.scale, 0.0]
        return self._lr_tags, values

    def _take_loss(self) -> Tensor | None:
        losses = self._explicit or self._captured
        loss = _mean(losses) if losses else None
        self._explicit, self._captured, self._forwards = [], [], 0
        return loss

    def _check_params(self) -> list[Tensor]:
        """Parameters whose gradients are checked every step (see ``nonfinite``)."""
        n = sum(len(g["params"]) for g in self.optimizer.param_groups)
        if n != self._n_params:
            params = _all_params(self.optimizer)
            small = [p for p in params if p.dim() <= 1]
            if self._full_check:
                self._sentinels = params
            else:
                self._sentinels = small or sorted(params, key=lambda p: p.numel())[:1]
            self._n_params = n
        return self._sentinels

    # ------------------------------------------------------------------ loss capture
    def _on_criterion(self, module: Any, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor):  # no_grad: evaluation
            self._captured.append(_scalar(output))

    def _on_model_forward(self, module: Any, inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self._forwards += 1
        if self._has_criterion:
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, Tensor):
            self._captured.append(_scalar(loss))

    def _log_loss(self, loss: Tensor | float, step: int | None) -> None:
        if self._writer is None:
            return
        t = _scalar(loss) if isinstance(loss, Tensor) else torch.tensor(float(loss))
        last = self._rows.last()
        if step is not None and (last is None or last.step != step):
            self._writer.add_scalars(int(step), [schema.LOSS], t.reshape(1).float())
        elif step is None and (self._forwards or last is None or last.step != self._step):
            self._explicit.append(t)  # logged before its step: that step's loss
        elif last is not None:  # logged after optimizer.step(): the step just taken
            last.loss = t

    def _write_named(self, step: int, scalars: dict[str, Tensor | float]) -> None:
        assert self._writer is not None
        tensors = {k: _scalar(v) for k, v in scalars.items() if isinstance(v, Tensor)}
        floats = {k: float(v) for k, v in scalars.items() if not isinstance(v, Tensor)}
        if tensors:
            device = next(iter(tensors.values())).device
            values = torch.stack([v.to(device, torch.float32) for v in tensors.values()])
            self._writer.add_scalars(step, list(tensors), values)
        if floats:
            self._writer.add_scalars(step, list(floats), list(floats.values()))

    # ------------------------------------------------------------------ logging steps
    def _start_logging(self) -> dict[str, Any]:
        """Weights before the step: their norms and a snapshot (dropped or reused after)."""
        params = _all_params(self.optimizer)
        moving = tuple(
            i
            for i, p in enumerate(params)
            if p.grad is not None or (self._closure_step and p.requires_grad)
        )
        plan = self._plan(moving, params)
        weights = [params[i] for i in moving]
        return {
            "params": params,
            "weights": weights,
            "plan": plan,
            "w_before": stats.foreach_norms(weights, plan.groups),
            "snapshot": stats.snapshot(weights, self._buffers),
        }

    def _grad_norms(self, pending: dict[str, Any]) -> list[Tensor]:
        """Per-tensor norms of the gradients stepped with; their total is the full check."""
        params = pending["params"]
        with_grad = tuple(i for i, p in enumerate(params) if p.grad is not None)
        if not with_grad:
            return []
        plan = self._plan(with_grad, params)
        pending["g_plan"] = plan
        pending["g"] = stats.foreach_norms([params[i].grad for i in with_grad], plan.groups)
        pending["g_total"] = stats.total_norm(pending["g"]).reshape(1)
        return [pending["g_total"]]

    def _finish_logging(self, pending: dict[str, Any]) -> None:
        """After the step: update and weight norms, then one event with every value.

        Few kernels on purpose: on a model of many small tensors the per-op overhead, not the
        arithmetic, is what a logging step costs beyond the floor.
        """
        weights, plan, w_before = pending["weights"], pending["plan"], pending["w_before"]
        tags: list[str] = []
        head: list[Tensor] = []
        tail: list[Tensor] = []
        if "g" in pending:
            tags.append(schema.GRAD_NORM)
            head.append(pending["g_total"])
        preclip = self._controller.preclip_norm if self._controller is not None else None
        if preclip is not None:
            tags.append(schema.GRAD_NORM_PRECLIP)
            head.append(preclip.detach().reshape(1).to(torch.float32))
        if weights:
            u = stats.update_norms(pending["snapshot"], weights, plan.groups)
            w_after = stats.foreach_norms(weights, plan.groups)
            totals = torch.linalg.vector_norm(torch.stack([u, w_before, w_after]), dim=1)
            ratios = stats.ratio(torch.cat([totals[:1], u]), torch.cat([totals[1:2], w_before]))
            tags += [schema.UPDATE_RATIO, schema.WEIGHT_NORM]
            head += [ratios[:1], totals[2:]]
            tail += [ratios[1:], w_after]
        if self.per_layer:
            if "g" in pending:
                tags += pending["g_plan"].grad_tags
                head.append(pending["g"])
            if weights:
                tags += plan.update_tags + plan.weight_tags
                head += tail
        self._buffers = pending["snapshot"] if self._every <= KEEP_BUFFERS_EVERY else None
        if tags:
            self._rows.add_event(self._step, tags, torch.cat(head))

    def _plan(self, key: tuple[int, ...], params: list[Tensor]) -> _Plan:
        """Foreach groups and tag names for a set of parameters (cached: it rarely changes)."""
        plan = self._plans.get(key)
        if plan is None:
            tensors = [params[i] for i in key]
            names = [self._names.get(id(p)) or _fallback_name(self.optimizer, p) for p in tensors]
            plan = self._plans[key] = _Plan(stats.group_by_device_dtype(tensors), names)
        return plan

    def _adapt(self, cost: float) -> None:
        """Pick the next logging step.

        With ``"auto"``: the smallest readable cadence for which the per-step hooks plus the
        logging work spread over ``every`` steps stay within ``budget`` of the step time.
        """
        self._costs.append(cost)
        if self._auto and len(self._intervals) >= 3:
            period = statistics.median(self._intervals)
            per_step = statistics.median(self._overheads) if self._overheads else 0.0
            left = self._budget * period - per_step  # what the logging work may take
            cost = statistics.median(self._costs)
            self._every = _nice(cost / left) if left > 0 else MAX_EVERY
        self._next_log = (self._step // self._every + 1) * self._every

    def _write_acks(self, actions: list[Any]) -> None:
        """One event per applied action at this step, on disk before training goes on."""
        assert self._writer is not None and self._controller is not None
        self._rows.submit(self._writer, before=self._step)  # keep every tag's steps in order
        c = self._controller
        groups = self.optimizer.param_groups
        tags = [schema.CONTROL_ACK, schema.LR_FACTOR, schema.CLIP_MAX_NORM, schema.STOP]
        tags += [schema.lr_group_tag(i) for i in range(len(groups))]
        for action in actions:
            values = [float(action.id), c.lr_factor, c.max_norm or 0.0, float(c.should_stop)]
            values += [float(g["lr"]) for g in groups]
            self._writer.add_scalars(self._step, tags, values)
        self._writer.flush(timeout=2.0)

    # ------------------------------------------------------------------ plumbing
    def _finish(self) -> None:
        self._buffers = None
        if self._writer is None:
            return
        try:
            self._guard("closing skipped steps", self._close_skips, None)
            self._guard("writing the last rows", self._rows.submit, None, self._writer)
        finally:
            self._writer.close()

    def _close_skips(self) -> None:
        """Iterations GradScaler skipped after the last real step."""
        skipped = self._skips.at_end() if self._skips is not None else []
        share = _share(len(self._captured), len(skipped) - 1) if skipped else 0
        for scale in skipped:
            self._step += 1
            self._add_skipped_row(scale, share)

    def _open_writer(self) -> EventWriter | None:
        try:
            return EventWriter(self.run_dir, filename_suffix=".lrwatch")
        except Exception as exc:  # an unwritable logdir must not stop the training
            logger.warning(
                "lrwatch cannot write to %s (%r): training continues unlogged", self.run_dir, exc
            )
            return None

    def _guard(self, what: str, fn: Any, default: Any, *args: Any) -> Any:
        """Run ``fn``; any exception becomes one warning (per kind) and ``default``."""
        try:
            return fn(*args)
        except Exception as exc:  # the hook boundary: lrwatch never breaks a training step
            self._pending = None
            self._warn_once(what, "lrwatch: %s failed (%r); skipped, training continues", what, exc)
            return default

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key in self._warned:
            logger.debug(msg, *args)
        else:
            self._warned.add(key)
            logger.warning(msg, *args)


class _Plan:
    """How to reduce one set of parameters: foreach groups and the tags of its values."""

    def __init__(self, groups: list[list[int]], names: list[str]) -> None:
        self.groups = groups
        self.grad_tags = [schema.per_tensor_tag("grad_norm", n) for n in names]
        self.update_tags = [schema.per_tensor_tag("update_ratio", n) for n in names]
        self.weight_tags = [schema.per_tensor_tag("weight_norm", n) for n in names]


def _validate(log_every: Any, budget: float, nonfinite: str, flush_secs: float) -> None:
    if log_every != "auto" and (not isinstance(log_every, int) or log_every < 1):
        raise ConfigError(f"log_every must be an integer >= 1 or 'auto', not {log_every!r}")
    if not 0 < budget < 1:
        raise ConfigError(f"budget is a fraction of the step time in (0, 1), not {budget!r}")
    if nonfinite not in ("sentinel", "full"):
        raise ConfigError(f"nonfinite must be 'sentinel' or 'full', not {nonfinite!r}")
    if not flush_secs > 0:
        raise ConfigError(f"flush_secs must be > 0, not {flush_secs!r}")


def _nice(x: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... >= x, capped at MAX_EVERY: readable cadences."""
    every = 1
    while every < min(x, MAX_EVERY):
        every = every * 5 // 2 if str(every)[0] == "2" else every * 2
    return min(every, MAX_EVERY)


def _share(n_captured: int, n_skipped: int) -> int:
    """Forwards per iteration when ``n_captured`` split evenly over the skips and the step.

    0 when they do not: the losses then all go to the real step rather than being guessed.
    """
    n_iterations = n_skipped + 1
    return n_captured // n_iterations if n_captured % n_iterations == 0 else 0


def _mean(losses: list[Tensor]) -> Tensor:
    return losses[0] if len(losses) == 1 else torch.stack([t.float() for t in losses]).mean()


def _scalar(t: Tensor) -> Tensor:
    t = t.detach()
    return t if t.dim() == 0 else t.float().mean()


def _all_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _fallback_name(optimizer: torch.optim.Optimizer, param: Tensor) -> str:
    """Name of a parameter the model does not own: its place in the optimizer."""
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if p is param:
                return f"group{gi}.param{pi}"
    return "unknown"


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    """Parameter names without the wrappers' prefixes (DDP ``module.``, compile ``_orig_mod.``)."""
    inner = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module) and isinstance(
        inner, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel
    ):
        inner = inner.module
    inner = getattr(inner, "_orig_mod", inner)
    return {id(p): name for name, p in inner.named_parameters()}


def _run_dir(logdir: str | os.PathLike[str] | None, writer: Any) -> Path:
    if writer is not None:
        return Path(writer.get_logdir() if hasattr(writer, "get_logdir") else writer.log_dir)
    return Path(logdir) if logdir is not None else default_logdir()


def _skip_counter(scaler: Any) -> SkipCounter | None:
    if scaler is None or not scaler.is_enabled():
        return None
    try:
        return SkipCounter(scaler)
    except Exception as exc:  # a scaler we cannot read: log the rest, not the skips
        logger.warning("lrwatch cannot read this GradScaler (%r): skipped steps not recorded", exc)
        return None


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
