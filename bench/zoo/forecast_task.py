"""``lstm_forecast``: a ``holdout2`` zoo task, an LSTM forecaster on generated time series.

Each series is a sum of three sinusoids (periods of 6 to 24 steps, random amplitude and phase)
plus a slow linear trend and Gaussian noise; the model reads ``PAST`` values and predicts the
next ``AHEAD`` (a multi-step regression read off the LSTM's last state). Adam,
ExponentialLR(0.995) (the LR ends near a seventh of its start), the forward under bf16 autocast
on the CPU, the loss in float32. The zoo has recurrent models only as character language models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from plain_run import run_setup
from tasks import Setup, _sampler
from torch import nn

PAST = 48
AHEAD = 12
NOISE = 0.1


def series(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (past, future) windows, each cut from its own generated series."""
    t = np.arange(PAST + AHEAD, dtype=np.float64)
    period = rng.uniform(6, 24, (n, 3, 1))
    amp = rng.uniform(0.2, 1.0, (n, 3, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 3, 1))
    trend = rng.uniform(-0.01, 0.01, (n, 1)) * t
    clean = (amp * np.sin(2 * np.pi * t / period + phase)).sum(1) + trend
    noisy = (clean + NOISE * rng.standard_normal(clean.shape)).astype(np.float32)
    return torch.tensor(noisy[:, :PAST]), torch.tensor(noisy[:, PAST:])


class Forecaster(nn.Module):
    def __init__(self, hidden: int = 48) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, AHEAD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.unsqueeze(-1))
        return self.head(out[:, -1])


class FloatMSE(nn.Module):
    """Mean squared error in float32, whatever precision the forward ran in."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(pred.float(), target.float())


def _adam(p: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(p, lr=lr)


def exponential(
    opt: torch.optim.Optimizer, lr: float, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.ExponentialLR(opt, 0.995)


def lstm_forecast(seed: int) -> Setup:
    rng = np.random.default_rng(200 + seed)
    xtr, ytr = series(4000, rng)
    val = series(512, rng)
    return Setup(
        Forecaster(), FloatMSE(), _sampler(xtr, ytr, 32), val, _adam, exponential, bf16=True
    )


def train(lr: float, steps: int, seed: int, mode: str, run_dir: Path) -> dict[str, Any]:
    """One run of ``lstm_forecast`` in ``mode`` (plain_run.py)."""
    return run_setup(lstm_forecast, lr, steps, seed, mode, run_dir)
