"""Hugging Face Transformers: ``Trainer(..., callbacks=[lrwatch.hf.LRWatchCallback()])``.

The callback attaches :func:`lrwatch.watch` to the Trainer's model and optimizer when training
begins. The training loss comes from the model's own output: the hook reads ``outputs.loss`` of
every grad-enabled forward, so each optimizer step gets the mean loss of its accumulated
micro-batches, NaN and Inf included. That matters because the Trainer's logs hide them: with
``logging_nan_inf_filter=True`` (the default) a non-finite loss is replaced by the running mean
before it is logged. Only when the model returns no ``loss`` (a ``compute_loss`` override that
pops the labels) does the callback fall back to the ``loss`` of the Trainer's logs.

A stop action from the control file sets ``control.should_training_stop``. Under DDP the hook
applies actions at the same step on every rank, so every rank stops at the same step.

Event files go to ``logdir`` if given, else into the Trainer's own TensorBoard run when it has one
(``report_to`` includes ``tensorboard``: ``$TENSORBOARD_LOGGING_DIR``, or the
``<output_dir>/runs/<date>_<host>`` directory its TensorBoardCallback has just created, which runs
before user callbacks), so TensorBoard lists the training once; else ``<output_dir>/lrwatch``.
Evaluation metrics (``eval_loss``, ...) are written under the Trainer's names only in that last
case: in the Trainer's run its callback already writes them (``eval/loss``).

This module imports ``transformers``; ``import lrwatch`` does not.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lrwatch.hook.monitor import Monitor, watch

logger = logging.getLogger(__name__)


class LRWatchCallback(TrainerCallback):
    """Records lrwatch's tags for a Hugging Face ``Trainer`` run and obeys its control file.

    Args:
        logdir: run directory (default: ``$TENSORBOARD_LOGGING_DIR`` or ``<output_dir>/lrwatch``).
        **watch_kwargs: passed to :func:`lrwatch.watch` (``log_every``, ``per_layer``,
            ``control``, ``control_every``, ``criterion``, ...).
    """

    def __init__(
        self, *, logdir: str | os.PathLike[str] | None = None, **watch_kwargs: Any
    ) -> None:
        for reserved in ("writer", "raise_on_stop"):
            if reserved in watch_kwargs:
                raise TypeError(
                    f"LRWatchCallback sets {reserved!r} itself; remove it from the arguments"
                )
        self.logdir = logdir
        self.watch_kwargs = watch_kwargs
        self.monitor: Monitor | None = None
        self._model_gives_loss = False
        self._handle: Any = None
        self._shared = False  # writing into the Trainer's own TensorBoard run

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Attach to the model and the optimizer the Trainer has built by now."""
        self.close()
        inner = _unwrap(optimizer)
        if model is None or inner is None:
            logger.warning("lrwatch: the Trainer passed no model or optimizer; nothing to watch")
            return
        run_dir, self._shared = self._run_dir(args)
        self.monitor = watch(model, inner, logdir=run_dir, **self.watch_kwargs)
        if state.global_step > 0:  # resumed from a checkpoint: the step axis goes on
            resumed = self.monitor.state_dict()
            resumed.update(step=state.global_step, next_log=state.global_step + 1)
            resumed["controller"] = None  # the hook reloads what it applied from the run dir
            self.monitor.load_state_dict(resumed)
        self._model_gives_loss = "criterion" in self.watch_kwargs
        self._handle = model.register_forward_hook(self._on_forward)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        mon = self.monitor
        if mon is not None and mon.should_stop and not control.should_training_stop:
            logger.warning("lrwatch: stop action applied at step %d; stopping training", mon.step)
            control.should_training_stop = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Fallback for a loss the model does not return: the (averaged, filtered) logged one."""
        mon = self.monitor
        if mon is None or self._model_gives_loss or not logs or "loss" not in logs:
            return
        mon.log(step=state.global_step, loss=float(logs["loss"]))

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        mon = self.monitor
        if mon is None or not metrics or self._shared:
            return
        values = {k: float(v) for k, v in metrics.items() if _is_metric(k, v)}
        if values:
            mon.log(step=state.global_step, **values)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    def close(self) -> None:
        """Write everything pending and detach from the model and optimizer. Idempotent."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None

    def _on_forward(self, module: Any, inputs: Any, output: Any) -> None:
        """Notes whether the model's output carries the loss the hook reads (training only)."""
        if not self._model_gives_loss and torch.is_grad_enabled():
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            self._model_gives_loss = isinstance(loss, torch.Tensor)

    def _run_dir(self, args: TrainingArguments) -> tuple[Path, bool]:
        """The run directory, and whether the Trainer's TensorBoard callback writes there too."""
        if self.logdir is not None:
            return Path(self.logdir), False
        shared = _reports_to_tensorboard(args)
        env = os.environ.get("TENSORBOARD_LOGGING_DIR")
        if env:
            return Path(env).expanduser(), shared
        legacy = getattr(args, "logging_dir", None)  # transformers < 5
        if legacy:
            return Path(legacy), shared
        found = (
            _fresh_tensorboard_run(Path(args.output_dir or "trainer_output")) if shared else None
        )
        if found is not None:
            return found, True
        return Path(args.output_dir or "trainer_output") / "lrwatch", False


def _reports_to_tensorboard(args: TrainingArguments) -> bool:
    report_to = getattr(args, "report_to", None) or []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return "tensorboard" in names or "all" in names


FRESH_S = 600.0  # an event file this recent is the one the Trainer's callback just opened


def _fresh_tensorboard_run(output_dir: Path) -> Path | None:
    """``<output_dir>/runs/<date>_<host>`` that TensorBoardCallback.on_train_begin created.

    Its SummaryWriter opens the event file at once, and the Trainer calls its callback before
    user callbacks, so the newest such file on this host is this training's.
    """
    host = socket.gethostname()
    files = [f for f in (output_dir / "runs").glob(f"*_{host}/*tfevents*") if f.is_file()]
    newest = max(files, key=lambda f: f.stat().st_mtime, default=None)
    if newest is None or time.time() - newest.stat().st_mtime > FRESH_S:
        return None
    return newest.parent


def _unwrap(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside Accelerate's wrapper, whose step the hook must observe."""
    seen = 0
    while optimizer is not None and seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer, seen = inner, seen + 1
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _is_metric(name: str, value: Any) -> bool:
    """Evaluation metrics worth a chart: numbers, not throughput bookkeeping."""
    skip = ("_runtime", "_samples_per_second", "_steps_per_second", "epoch")
    return isinstance(value, int | float) and not name.endswith(skip)
