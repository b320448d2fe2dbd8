"""``ae_signals``: a held-out plain-PyTorch zoo task of a shape the zoo lacks.

A 1-D convolutional denoising autoencoder on generated signals (sums of three sinusoids plus
Gaussian noise; the target is the clean signal), RMSprop, StepLR(120, 0.5), no clipping. It runs
through trainer.py's own plain loop with the same modes, set up by plain_run.py like the
``holdout2`` tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from plain_run import run_setup
from tasks import Setup, _sampler, step_lr
from torch import nn

LENGTH = 64
NOISE = 0.3


def signals(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (noisy, clean) pairs: three sinusoids of 1-8 cycles, random amplitude and phase."""
    t = np.linspace(0.0, 1.0, LENGTH, endpoint=False)
    freq = rng.uniform(1, 8, (n, 3, 1))
    amp = rng.uniform(0.2, 1.0, (n, 3, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 3, 1))
    clean = (amp * np.sin(2 * np.pi * freq * t + phase)).sum(1).astype(np.float32)
    noisy = clean + NOISE * rng.standard_normal(clean.shape).astype(np.float32)
    return torch.tensor(noisy), torch.tensor(clean)


class ConvAE(nn.Module):
    """Two strided convolutions down to 16 positions, two transposed ones back to 64."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(1, 32, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(32, 64, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.ConvTranspose1d(64, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose1d(32, 1, 4, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.unsqueeze(1)).squeeze(1)


def ae_signals(seed: int) -> Setup:
    rng = np.random.default_rng(100 + seed)
    xtr, ytr = signals(4000, rng)
    val = signals(512, rng)
    return Setup(
        ConvAE(), nn.MSELoss(), _sampler(xtr, ytr, 32), val,
        lambda p, lr: torch.optim.RMSprop(p, lr=lr), step_lr(120, 0.5),
    )  # fmt: skip


def train(lr: float, steps: int, seed: int, mode: str, run_dir: Path) -> dict[str, Any]:
    """One run of ``ae_signals`` in ``mode``: trainer.py's ``train`` for a task outside tasks.py."""
    return run_setup(ae_signals, lr, steps, seed, mode, run_dir)
