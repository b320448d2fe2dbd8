"""Train scikit-learn's digits with PyTorch Lightning, watched by lrwatch's Lightning callback.

The only lrwatch line is the callback in ``Trainer(callbacks=[LRWatch()])``: it attaches to the
optimizer Lightning builds, takes the loss from ``training_step``, writes next to the
TensorBoardLogger's own events and stops the trainer when lrwatch's daemon (or ``lrwatch apply``)
asks it to::

    pip install lightning
    python examples/lightning_digits.py --logdir runs/lightning_digits
    lrwatch analyze runs/lightning_digits
    tensorboard --logdir runs

Every script in examples/ accepts ``--logdir`` and ``--quick``: tests/test_examples.py runs them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lrwatch.lightning import LRWatch


class DigitsClassifier(pl.LightningModule):
    """A small MLP; logs ``val_loss`` and ``val_acc``, which lrwatch's analyzer picks up."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)  # lrwatch reads this loss, no self.log needed

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loaders(batch_size: int, seed: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Digits scaled to [0, 1], split 80/20 with a fixed permutation."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train = TensorDataset(x[order[:cut]], y[order[:cut]])
    val = TensorDataset(x[order[cut:]], y[order[cut:]])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True),
        DataLoader(val, batch_size=len(val)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/lightning_digits", help="run directory")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (try 3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 epochs, for tests and smoke runs")
    args = parser.parse_args()

    pl.seed_everything(args.seed, verbose=False)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    train, val = loaders(args.batch_size, args.seed)
    # name="" and version="" put the events straight into --logdir (one run, no version_N).
    tb = TensorBoardLogger(save_dir=args.logdir, name="", version="")
    trainer = pl.Trainer(
        max_epochs=2 if args.quick else args.epochs,
        accelerator="cpu",
        devices=1,
        logger=tb,
        callbacks=[LRWatch()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsClassifier(args.lr), train, val)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
    print(f"after {trainer.global_step} steps: {metrics}")
    if trainer.should_stop:  # nothing else in this script sets it
        print("stopped early: lrwatch asked to stop")

    print(f"\nevent files in {Path(tb.log_dir).resolve()}")
    print(f"look at them with:  tensorboard --logdir {args.logdir}")
    print(f"or ask lrwatch:     lrwatch analyze {args.logdir}")


if __name__ == "__main__":
    main()
