"""Compare the LR range test's rules by outcome: spread across seeds, then loss after training.

For each real setup (digits MLP with SGD+momentum, digits MLP with Adam, diabetes regression with
Adam) and a few seeds: run ``lrwatch.find_lr`` on a fresh model, read every rule's LR, then train
a fresh model briefly at that LR and measure the validation loss. A good rule gives a low final
loss and the same LR whatever the seed (the seed changes the initial weights and the batch
order). The last row is the best LR of a half-decade grid from 1e-4 to 1, for scale::

    python bench/lr_finder_compare.py           # 5 seeds, 4 epochs per training
    python bench/lr_finder_compare.py --quick   # 2 seeds, 2 epochs
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sklearn.datasets import load_diabetes, load_digits
from torch import nn

import lrwatch
from lrwatch.lr_finder.suggest import RULES

Tensor = torch.Tensor


@dataclass(frozen=True)
class Setup:
    name: str
    data: tuple[Tensor, Tensor, Tensor, Tensor]
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
    criterion: nn.Module


def split(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def setups() -> list[Setup]:
    digits = load_digits()
    dx = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    dy = torch.tensor(digits.target, dtype=torch.long)
    diabetes = load_diabetes()
    rx = torch.tensor(diabetes.data, dtype=torch.float32)
    rx = (rx - rx.mean(0)) / rx.std(0)
    ry = torch.tensor(diabetes.target, dtype=torch.float32)[:, None]
    ry = (ry - ry.mean()) / ry.std()

    def mlp(n_in: int, n_out: int) -> Callable[[], nn.Module]:
        return lambda: nn.Sequential(nn.Linear(n_in, 64), nn.ReLU(), nn.Linear(64, n_out))

    def sgd(p: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(p, lr=lr, momentum=0.9)

    def adam(p: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(p, lr=lr)

    ce, mse = nn.CrossEntropyLoss(), nn.MSELoss()
    return [
        Setup("digits MLP, SGD m=0.9", split(dx, dy), mlp(64, 10), sgd, ce),
        Setup("digits MLP, Adam", split(dx, dy), mlp(64, 10), adam, ce),
        Setup("diabetes MLP, Adam", split(rx, ry), mlp(10, 1), adam, mse),
    ]


def batches(x: Tensor, y: Tensor, seed: int, size: int = 32) -> list[tuple[Tensor, Tensor]]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(x), size)]


def train(setup: Setup, lr: float, seed: int, epochs: int) -> float:
    """Validation loss after ``epochs`` epochs at a constant ``lr`` (inf if it diverged)."""
    x, y, vx, vy = setup.data
    torch.manual_seed(seed)
    model = setup.make_model()
    opt = setup.make_optimizer(list(model.parameters()), lr)
    for epoch in range(epochs):
        for bx, by in batches(x, y, seed * 100 + epoch):
            opt.zero_grad()
            setup.criterion(model(bx), by).backward()
            opt.step()
    with torch.no_grad():
        loss = float(setup.criterion(model(vx), vy))
    return loss if math.isfinite(loss) else math.inf


def compare(setup: Setup, seeds: int, epochs: int) -> None:
    x, y, _, _ = setup.data
    found: dict[str, list[float | None]] = {rule: [] for rule in RULES}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = setup.make_model()
        opt = setup.make_optimizer(list(model.parameters()), 1e-3)
        result = lrwatch.find_lr(model, opt, batches(x, y, seed), setup.criterion)
        for rule in RULES:
            found[rule].append(result.suggest(rule).lr)
    print(f"\n## {setup.name} ({seeds} seeds, {epochs} epochs of training per LR)")
    print(f"{'rule':16} {'median LR':>10} {'spread (decades)':>17} {'val loss after training':>24}")
    for rule in RULES:
        lrs = [lr for lr in found[rule] if lr is not None]
        if not lrs:
            print(f"{rule:16} {'none':>10}")
            continue
        logs = [math.log10(lr) for lr in lrs]
        losses = [train(setup, lr, seed, epochs) for seed, lr in enumerate(found[rule]) if lr]
        print(
            f"{rule:16} {10 ** statistics.median(logs):10.2e} {max(logs) - min(logs):17.2f} "
            f"{statistics.median(losses):12.4f} (worst {max(losses):.4f})"
        )
    grid = [10 ** (k / 2) for k in range(-8, 1)]  # 1e-4 .. 1, half a decade apart
    tried = {lr: train(setup, lr, 0, epochs) for lr in grid}
    best = min(tried, key=tried.__getitem__)
    print(f"{'grid best (seed 0)':16} {best:10.2e} {'':17} {tried[best]:12.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs")
    args = parser.parse_args()
    seeds, epochs = (2, 2) if args.quick else (5, 4)
    torch.set_num_threads(1)
    start = time.perf_counter()
    for setup in setups():
        compare(setup, seeds, epochs)
    print(f"\n{time.perf_counter() - start:.1f} s (figures from a shared, loaded 2-core machine)")


if __name__ == "__main__":
    main()
