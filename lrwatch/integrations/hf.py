"""Hugging Face Transformers: ``Trainer(..., callbacks=[lrwatch.hf.LRWatchCallback()])``.

The callback attaches :func:`lrwatch.watch` to the Trainer's model and optimizer when training
begins. The training loss comes from the model's own output: the hook reads ``outputs.loss`` of
every grad-enabled forward, so each optimizer step gets the mean loss of its accumulated
micro-batches, NaN and Inf included. That matters because the Trainer's logs hide them: with
``logging_nan_inf_filter=True`` (the default) a non-finite loss is replaced by the running mean
before it is logged. Only when the model returns no ``loss`` (a ``compute_loss`` override that
pops the labels) does the callback fall back to the ``loss`` of the Trainer's logs.

Evaluation metrics (``eval_loss``, ...) are written into the run under the Trainer's names, and a
stop action from the control file sets ``control.should_training_stop``. Under DDP the hook
applies actions at the same step on every rank, so every rank stops at the same step.

Event files go to ``logdir`` if given, else ``$TENSORBOARD_LOGGING_DIR`` (where the Trainer's
own TensorBoard callback writes when it is set), else ``<output_dir>/lrwatch``.

This module imports ``transformers``; ``import lrwatch`` does not.
"""

from __future__ import annotations

import logging
import os
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
        self.monitor = watch(model, inner, logdir=self._run_dir(args), **self.watch_kwargs)
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
        if mon is None or not metrics:
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

    def _run_dir(self, args: TrainingArguments) -> Path:
        if self.logdir is not None:
            return Path(self.logdir)
        env = os.environ.get("TENSORBOARD_LOGGING_DIR")
        if env:
            return Path(env).expanduser()
        legacy = getattr(args, "logging_dir", None)  # transformers < 5
        if legacy:
            return Path(legacy)
        return Path(args.output_dir or "trainer_output") / "lrwatch"


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
