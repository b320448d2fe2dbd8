"""A real, tiny training run written by ``lrwatch.watch``: the input of the view tests.

Shared by test_status, test_plot and test_tb_layout (pytest puts this directory on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import torch

import lrwatch

VAL_EVERY = 10


def train(
    run_dir: Path, *, steps: int = 60, lr: float = 0.05, blow_at: int | None = None
) -> lrwatch.Monitor:
    """Regress a linear target with a small MLP; from ``blow_at`` on the LR is 3.0 (it diverges).

    Validation loss goes to ``val/loss`` every ``VAL_EVERY`` steps. Stops early when a stop
    action from the control file was applied. Returns the closed monitor.
    """
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x = torch.randn(128, 8, generator=gen)
    y = 2 * x[:, :1] + 0.1 * torch.randn(128, 1, generator=gen)
    xv, yv = x[:32] + 0.05, 2 * x[:32, :1]
    loss_fn = torch.nn.MSELoss()
    with lrwatch.watch(
        model, opt, logdir=run_dir, criterion=loss_fn, log_every=1, control_every=1
    ) as mon:
        for step in range(steps):
            if blow_at is not None and step == blow_at:
                for group in opt.param_groups:
                    group["lr"] = 3.0
            idx = torch.randint(0, 128, (32,), generator=gen)
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            if step % VAL_EVERY == VAL_EVERY - 1:
                with torch.no_grad():
                    mon.log(**{"val/loss": loss_fn(model(xv), yv).item()})
            if mon.should_stop:
                break
    return mon
