"""Worker for test_lightning's DDP test: ``torchrun --nproc_per_node 2 THIS OUT_DIR``.

A Lightning DDP fit (gloo, CPU) with the LRWatch callback; rank 0 appends a stop action after
step 7, as the daemon would. Each rank records the step at which its trainer stopped.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrwatch.control import append_action
from lrwatch.lightning import LRWatch
from lrwatch.schema import ActionKind


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StopAfter(pl.Callback):
    def __init__(self, watcher: LRWatch) -> None:
        self.watcher = watcher

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_rank == 0 and trainer.global_step == 7:
            assert self.watcher.monitor is not None
            append_action(self.watcher.monitor.run_dir, action=ActionKind.STOP, reason="test")


def main(out: Path) -> None:
    warnings.simplefilter("ignore")  # Lightning's advice about workers and the like
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = (x[:, 0] > 0).long()
    watcher = LRWatch(log_every=1, control_every=5)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=100,
        logger=TensorBoardLogger(str(out), name="", version=""),
        callbacks=[watcher, StopAfter(watcher)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Tiny(), DataLoader(TensorDataset(x, y), batch_size=8))
    (out / f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"global_step": trainer.global_step, "should_stop": trainer.should_stop})
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
