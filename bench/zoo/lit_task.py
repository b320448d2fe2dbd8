"""``lit_digits``: a held-out zoo task written the way a Lightning user writes it.

A LightningModule CNN with batch normalisation on scikit-learn's digits (not the zoo's
``cnn_digits``: BatchNorm, global average pooling, SGD with Nesterov momentum and weight decay),
its warm-up + cosine schedule returned by ``configure_optimizers`` at step interval,
``gradient_clip_val`` in the Trainer, validation by Lightning's own validation loop every
``VAL_EVERY`` steps, lrwatch attached through ``lrwatch.lightning.LRWatch``. Lightning's logger,
checkpoints, progress bar and model summary are off: the run writes only lrwatch's events.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from framework_run import (
    STEP_SLEEP,
    VAL_EVERY,
    Facts,
    PlateauOnOptimizer,
    apply_daemon,
    wait_for_daemon,
    watch_kwargs,
)
from tasks import _digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lrwatch.lightning import LRWatch

BATCH = 32
WARMUP = 20
CLIP = 1.0  # the Trainer's gradient_clip_val (norm)


class DigitsBN(pl.LightningModule):
    """Conv-BN-ReLU twice, global average pooling, a linear head."""

    def __init__(self, lr: float, steps: int) -> None:
        super().__init__()
        self.lr, self.steps = lr, steps
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, 1, 8, 8))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
        )

        def f(s: int) -> float:
            if s < WARMUP:
                return (s + 1) / WARMUP
            return 0.5 * (1 + math.cos(math.pi * min((s - WARMUP) / (self.steps - WARMUP), 1)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _ZooFacts(pl.Callback):
    """Gathers the zoo's facts from Lightning's hooks; runs after lrwatch's callback."""

    def __init__(self, mode: str, run_dir: Path, lrw: LRWatch | None) -> None:
        self.mode, self.run_dir, self.lrw = mode, run_dir, lrw
        self.facts = Facts()
        self.plateau: PlateauOnOptimizer | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "plateau":
            self.plateau = PlateauOnOptimizer(trainer.optimizers[0])
        if self.mode == "apply" and self.lrw is not None:
            wait_for_daemon(self.lrw.monitor, self.run_dir)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        if self.mode == "apply":
            time.sleep(STEP_SLEEP)
        if self.facts.train_loss(trainer.global_step, float(outputs["loss"].item())):
            trainer.should_stop = True
        mon = self.lrw.monitor if self.lrw is not None else None
        if mon is not None and mon.should_stop:  # lrwatch's callback has set should_stop
            self.facts.stopped = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plateau is not None:
            self.plateau.remove()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return  # the final trainer.validate() after fit is not a curve point
        val = float(trainer.callback_metrics["val_loss"])
        self.facts.val_loss(trainer.global_step, val)
        if self.plateau is not None:
            self.plateau.val_loss(val)


def _loaders(seed: int, steps: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Batches drawn with replacement in a fixed order (as the plain loop's), the validation
    quarter in one batch, the same split per seed as the zoo's digits tasks."""
    xtr, ytr, xva, yva = _digits(seed)
    gen = torch.Generator().manual_seed(1234)
    sampler = RandomSampler(range(len(xtr)), True, steps * BATCH, generator=gen)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=BATCH, sampler=sampler)
    return train, DataLoader(TensorDataset(xva, yva), batch_size=len(xva))


def _quiet() -> None:
    """Lightning's info lines and its advice for a tiny CPU job are not the zoo's output."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for msg in (".*does not have many workers.*", ".*number of training batches.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", msg)


def train(lr: float, steps: int, seed: int, mode: str, run_dir: Path) -> dict[str, Any]:
    """One run of ``lit_digits`` in ``mode`` (trainer.py's modes), its facts as trainer.py's."""
    torch.set_num_threads(1)
    _quiet()
    pl.seed_everything(seed, verbose=False)
    model = DigitsBN(lr, steps)
    train_dl, val_dl = _loaders(seed, steps)
    lrw = LRWatch(logdir=run_dir, **watch_kwargs(mode)) if mode != "plateau" else None
    zoo = _ZooFacts(mode, run_dir, lrw)
    with apply_daemon(mode, run_dir):
        trainer = pl.Trainer(
            max_steps=steps,
            val_check_interval=VAL_EVERY,
            num_sanity_val_steps=0,
            gradient_clip_val=CLIP,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=run_dir,
            callbacks=[c for c in (lrw, zoo) if c is not None],
        )
        trainer.fit(model, train_dl, val_dl)
    final = trainer.validate(model, val_dl, verbose=False)[0]["val_loss"]
    return zoo.facts.result(float(final), zoo.plateau)
