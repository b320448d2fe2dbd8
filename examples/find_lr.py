"""Find a learning rate with the LR range test, then train at it, watched by lrwatch.

Sweeps the LR of a small MLP on scikit-learn's digits from 1e-7 to 10 (one SGD step per batch),
prints what each rule suggests, then trains a fresh run at lrwatch's suggestion::

    python examples/find_lr.py --logdir runs/digits_found
    python examples/find_lr.py --plot lr_find.png      # needs matplotlib
    tensorboard --logdir runs

Every script in examples/ accepts ``--logdir`` and ``--quick``: tests/test_examples.py runs them.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import lrwatch
from lrwatch.lr_finder.suggest import RULES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/digits_found", help="run directory")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs after the test")
    parser.add_argument("--plot", help="save the range-test plot here (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="2 epochs, for tests")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    result = lrwatch.find_lr(model, optimizer, batches, loss_fn)
    print(f"range test: {result.stop_reason} after {len(result.lrs)} steps")
    for rule in RULES:
        s = result.suggest(rule)
        shown = f"{s.lr:.2e}" if s.lr is not None else "none"
        print(f"  {rule:16} {shown:>9}  ({s.reason})")
    if args.plot:
        print(f"plot: {result.plot(args.plot)}")

    lr = result.suggestion.lr or 0.01  # the model and optimizer are untouched by the test
    for group in optimizer.param_groups:
        group["lr"] = lr
    print(f"training {epochs} epochs at lr={lr:.2e}")
    with lrwatch.watch(model, optimizer, logdir=args.logdir, criterion=loss_fn) as mon:
        for _ in range(epochs):
            for inputs, targets in batches:
                optimizer.zero_grad()
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                optimizer.step()
        print(f"final training loss {loss.item():.4f} after {mon.step} steps")
    print(f"tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
