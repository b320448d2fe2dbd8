"""PyTorch Lightning: ``Trainer(callbacks=[lrwatch.lightning.LRWatch()])``.

The callback attaches :func:`lrwatch.watch` to the trainer's optimizer when fitting starts, so
every optimizer step is observed by the hook's own step hooks. What Lightning knows and the hook
cannot see, the callback hands over:

- the training loss, from the training step's output (a device tensor, never ``.item()``). With
  ``accumulate_grad_batches=k`` Lightning divides that loss by ``k``; the callback undoes the
  division and records the mean over the accumulated batches at the step they led to;
- the validation metrics (``trainer.callback_metrics`` after validation) when lrwatch writes
  somewhere the trainer's loggers do not (a TensorBoardLogger already writes them into the run);
- the GradScaler of ``precision="16-mixed"``, so the loss scale and skipped steps are recorded;
- a stop action from the control file, as ``trainer.should_stop = True``. The hook applies
  actions at the same step on every DDP rank, so every rank sets it at the same batch.

Event files go to the trainer's TensorBoardLogger ``log_dir`` when it has one (TensorBoard then
shows lrwatch's charts in the same run), else to ``<default_root_dir>/lrwatch``.

This module imports Lightning (``lightning.pytorch``, or the older ``pytorch_lightning``);
``import lrwatch`` does not.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from lrwatch.hook.monitor import Monitor, watch

try:  # the unified package first: its Trainer only accepts its own Callback subclasses
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # pragma: no cover - only the standalone package installed
    import pytorch_lightning as pl  # type: ignore[no-redef,unused-ignore]
    from pytorch_lightning.loggers import TensorBoardLogger  # type: ignore[assignment]

logger = logging.getLogger(__name__)

VAL_PREFIXES = ("val", "valid", "validation", "eval", "test")  # callback_metrics worth keeping


class LRWatch(pl.Callback):
    """Records lrwatch's tags for a Lightning run and obeys its control file.

    Args:
        logdir: run directory; default: the TensorBoardLogger's ``log_dir`` or
            ``<default_root_dir>/lrwatch``.
        log_val_metrics: write validation metrics into the run; default (``None``): only when no
            TensorBoardLogger writes them into the same directory already.
        **watch_kwargs: passed to :func:`lrwatch.watch` (``log_every``, ``per_layer``,
            ``control``, ``control_every``, ``scaler``, ...).
    """

    def __init__(
        self,
        *,
        logdir: str | os.PathLike[str] | None = None,
        log_val_metrics: bool | None = None,
        **watch_kwargs: Any,
    ) -> None:
        for reserved in ("writer", "raise_on_stop"):
            if reserved in watch_kwargs:
                raise TypeError(f"LRWatch sets {reserved!r} itself; remove it from the arguments")
        self.logdir = logdir
        self.log_val_metrics = log_val_metrics
        self.watch_kwargs = watch_kwargs
        self.monitor: Monitor | None = None
        self._pending: list[torch.Tensor] = []  # losses of batches whose step has not come yet
        self._step_before = 0
        self._resume: dict[str, Any] | None = None  # loaded from a checkpoint, for fit start
        self._final: dict[str, Any] = {}  # the closed monitor's, for a checkpoint saved after fit
        self._write_val = False

    # ------------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach to the optimizer, which Lightning has set up by now."""
        self.close()
        if not trainer.optimizers:
            logger.warning("lrwatch: the trainer has no optimizer; nothing to watch")
            return
        if len(trainer.optimizers) > 1:
            logger.warning("lrwatch: %d optimizers; watching the first", len(trainer.optimizers))
        run_dir, logged_there = self._run_dir(trainer)
        self._write_val = not logged_there if self.log_val_metrics is None else self.log_val_metrics
        kwargs = dict(self.watch_kwargs)
        if "scaler" not in kwargs:  # precision="16-mixed": Lightning's own GradScaler
            kwargs["scaler"] = getattr(trainer.precision_plugin, "scaler", None)
        self.monitor = watch(pl_module, trainer.optimizers[0], logdir=run_dir, **kwargs)
        if self._resume is not None:
            self.monitor.load_state_dict(self._resume)
            self._resume = None
        self._pending = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.close()  # keep what was recorded up to the failure

    def close(self) -> None:
        """Write everything pending and detach from the optimizer. Idempotent."""
        if self.monitor is not None:
            self._final = self.monitor.state_dict()
            self.monitor.close()
            self.monitor = None

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is not None:
            self._step_before = self.monitor.step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        mon = self.monitor
        if mon is None:
            return
        loss = _loss_of(outputs)
        if loss is not None:
            if pl_module.automatic_optimization:  # undo Lightning's 1/k for accumulation
                loss = loss * trainer.accumulate_grad_batches
            self._pending.append(loss.detach())
        # A batch that ended with a step: its loss, with those of the batches accumulated
        # before it (and of a GradScaler-skipped iteration, which cannot be told apart here).
        if mon.step != self._step_before and self._pending:
            losses, self._pending = self._pending, []
            mean = losses[0] if len(losses) == 1 else torch.stack(losses).float().mean()
            mon.log(step=mon.step, loss=mean)
        if mon.should_stop and not trainer.should_stop:
            logger.warning(
                "lrwatch: stop action applied at step %d; stopping the trainer", mon.step
            )
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mon = self.monitor
        if mon is None or trainer.sanity_checking or not self._write_val:
            return
        metrics = {
            name: value
            for name, value in trainer.callback_metrics.items()
            if name.lower().startswith(VAL_PREFIXES)
            and isinstance(value, torch.Tensor | float | int)
        }
        if metrics:
            mon.log(step=mon.step, **metrics)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The monitor's step count and applied actions, saved in Lightning's checkpoints."""
        if self.monitor is not None:
            return self.monitor.state_dict()
        return dict(self._resume) if self._resume is not None else dict(self._final)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) if state_dict else None

    # ------------------------------------------------------------------ helpers
    def _run_dir(self, trainer: pl.Trainer) -> tuple[Path, bool]:
        """Where to write, and whether a TensorBoardLogger writes the metrics there too."""
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if self.logdir is not None:
            run_dir = Path(self.logdir)
            same = tb is not None and Path(tb.log_dir).resolve() == run_dir.resolve()
            return run_dir, same
        if tb is not None:
            return Path(tb.log_dir), True
        return Path(trainer.default_root_dir) / "lrwatch", False


def _loss_of(outputs: Any) -> torch.Tensor | None:
    """The loss tensor in what ``training_step`` returned (a tensor or a dict with ``loss``)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None
