"""Train a small MLP on scikit-learn's handwritten digits, watched by lrwatch.

A plain PyTorch loop on real data (the 1797 8x8 digit images that ship with scikit-learn, no
download), CPU-fast. The only lrwatch lines are ``lrwatch.watch(...)`` and ``mon.log(...)``::

    python examples/train_digits.py --logdir runs/digits              # healthy: ~98% accuracy
    python examples/train_digits.py --logdir runs/digits_hot --lr 3    # too high: stuck at chance
    python examples/train_digits.py --logdir runs/digits_boom --lr 30  # loss explodes to ~1e5
    tensorboard --logdir runs

Every script in examples/ accepts ``--logdir`` and ``--quick``: tests/test_examples.py runs them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import lrwatch


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as float tensors scaled to [0, 1], split 80/20 with a fixed permutation."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train, val = order[:cut], order[cut:]
    return x[train], y[train], x[val], y[val]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/digits", help="run directory for event files")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (try 3 or 30)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 epochs, for tests and smoke runs")
    args = parser.parse_args()
    epochs = 3 if args.quick else args.epochs

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    x_train, y_train, x_val, y_val = load_data(args.seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    with lrwatch.watch(model, optimizer, logdir=args.logdir, criterion=loss_fn) as mon:
        for epoch in range(epochs):
            model.train()
            for batch in torch.randperm(len(x_train)).split(args.batch_size):
                optimizer.zero_grad()
                loss_fn(model(x_train[batch]), y_train[batch]).backward()
                optimizer.step()
                if mon.should_stop:  # lrwatch's daemon (or `lrwatch apply`) asked to stop
                    break
            model.eval()
            with torch.no_grad():
                logits = model(x_val)
                val_loss = F.cross_entropy(logits, y_val).item()
                accuracy = (logits.argmax(1) == y_val).float().mean().item()
            mon.log(**{"val/loss": val_loss, "val/accuracy": accuracy})
            print(f"epoch {epoch + 1:3d}  val loss {val_loss:8.4f}  val accuracy {accuracy:.3f}")
            if mon.should_stop:
                print("stopped early: lrwatch asked to stop")
                break

    print(f"\nevent files in {Path(args.logdir).resolve()}")
    print(f"look at them with:  tensorboard --logdir {args.logdir}")
    print(f"or ask lrwatch:     lrwatch analyze {args.logdir}")


if __name__ == "__main__":
    main()
