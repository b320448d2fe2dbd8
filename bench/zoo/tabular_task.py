"""``ctr_embed``: a ``holdout2`` zoo task, a click-through-style model with embeddings, Adagrad.

Generated tabular data of the kind Adagrad is still used for: six categorical fields (10 to 200
values each) and four numeric ones; the click probability is a logistic function of per-value
effects, one interaction between two fields and the numeric features, and each label is drawn
from it, so even the true model's validation loss stays well above zero. The model embeds each
field (8 dimensions), concatenates the numeric features and runs a two-layer MLP; binary
cross-entropy on logits, Adagrad at a constant LR: an optimizer whose step shrinks by itself as
squared gradients accumulate, and embedding rows that see a gradient only when their value
occurs. No other zoo task has embeddings of categories, a binary loss or Adagrad.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from plain_run import run_setup
from tasks import Setup, _sampler, constant
from torch import nn

FIELDS = (50, 100, 20, 200, 10, 30)  # categories per field
NUMERIC = 4
EMBED = 8


def clicks(
    n: int, rng: np.random.Generator, truth: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows (category ids as floats, then numeric features) and their drawn labels."""
    ids = np.stack([rng.integers(0, k, n) for k in FIELDS], axis=1)
    num = rng.standard_normal((n, NUMERIC))
    logit = truth["bias"] + num @ truth["w"] + truth["pair"][ids[:, 0], ids[:, 1]]
    logit += sum(e[ids[:, i]] for i, e in enumerate(truth["effects"]))
    y = rng.random(n) < 1 / (1 + np.exp(-logit))
    x = np.concatenate([ids, num], axis=1).astype(np.float32)
    return torch.tensor(x), torch.tensor(y.astype(np.float32))


class EmbedMLP(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(k, EMBED) for k in FIELDS)
        width = EMBED * len(FIELDS) + NUMERIC
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, : len(FIELDS)].long()
        cats = [e(ids[:, i]) for i, e in enumerate(self.embeds)]
        return self.mlp(torch.cat([*cats, x[:, len(FIELDS) :]], dim=1)).squeeze(1)


def _adagrad(p: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(p, lr=lr)


def ctr_embed(seed: int) -> Setup:
    rng = np.random.default_rng(300 + seed)
    truth = {
        "bias": -0.5,
        "w": rng.normal(0, 1.0, NUMERIC),
        "effects": [rng.normal(0, 1.5, k) for k in FIELDS],
        "pair": rng.normal(0, 1.5, (FIELDS[0], FIELDS[1])),
    }
    xtr, ytr = clicks(20000, rng, truth)
    val = clicks(2000, rng, truth)
    return Setup(
        EmbedMLP(), nn.BCEWithLogitsLoss(), _sampler(xtr, ytr, 128), val, _adagrad, constant
    )


def train(lr: float, steps: int, seed: int, mode: str, run_dir: Path) -> dict[str, Any]:
    """One run of ``ctr_embed`` in ``mode`` (plain_run.py)."""
    return run_setup(ctr_embed, lr, steps, seed, mode, run_dir)
