"""Mixed precision on CPU: bf16 autocast plus ``torch.amp.GradScaler``, watched by lrwatch.

Pass the scaler to ``lrwatch.watch(..., scaler=scaler)`` and lrwatch records the loss scale
(``lrwatch.diagnostics/loss_scale``) and every step the scaler skipped because of Inf/NaN
gradients (``lrwatch.diagnostics/skipped_step``). An isolated skip with a scale back-off is normal
mixed-precision life, not a divergence; a scale that keeps collapsing, or a loss that is
non-finite after unscaling, is. bf16 has fp32's exponent range and rarely overflows, so this
script injects one overflowing gradient (``--overflow-at``) to show what a skip looks like::

    python examples/amp_bf16.py --logdir runs/amp_bf16
    lrwatch analyze runs/amp_bf16          # the lone skip is not reported as a divergence
    tensorboard --logdir runs

Every script in examples/ accepts ``--logdir`` and ``--quick``: tests/test_examples.py runs them.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import lrwatch


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/amp_bf16", help="run directory")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--overflow-at", type=int, default=20, help="inject Inf grads (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="60 steps, for tests and smoke runs")
    args = parser.parse_args()
    steps = 60 if args.quick else args.steps

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x, y = load_data()
    first = nn.Linear(64, 256)
    model = nn.Sequential(first, nn.GELU(), nn.Linear(256, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=25)
    loss_fn = nn.CrossEntropyLoss()

    # criterion=: lrwatch reads each forward's loss, and gives a skipped iteration its own.
    with lrwatch.watch(
        model, optimizer, logdir=args.logdir, scaler=scaler, criterion=loss_fn
    ) as mon:
        for it in range(1, steps + 1):
            batch = torch.randint(0, len(x), (64,))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(x[batch]), y[batch])
            scaler.scale(loss).backward()
            if it == args.overflow_at and first.weight.grad is not None:
                first.weight.grad[0, 0] = math.inf  # what an fp16 overflow leaves behind
            scaler.step(optimizer)  # skipped (no optimizer.step()) when a gradient is Inf/NaN
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if mon.should_stop:
                print("stopped early: lrwatch asked to stop")
                break
            if it % 20 == 0:
                print(f"iteration {it:4d}  loss {loss.item():.4f}  scale {scaler.get_scale():.0f}")

    print(f"\nevent files in {Path(args.logdir).resolve()}")
    print(f"look at them with:  tensorboard --logdir {args.logdir}")
    print(f"or ask lrwatch:     lrwatch analyze {args.logdir}")


if __name__ == "__main__":
    main()
