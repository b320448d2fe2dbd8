"""``vit_digits``: a ``holdout2`` zoo task, a tiny vision transformer on scikit-learn's digits.

Each 8x8 image is cut into sixteen 2x2 patches, embedded linearly with a class token and learned
positions, and passed through two pre-norm encoder layers (d 32, 4 heads); the class token's
output is classified. AdamW (weight decay 0.05), a linear warm-up over the first 10% of the
steps then a linear decay to zero (LambdaLR), cross-entropy with label smoothing 0.1 (so the
validation loss bottoms out well above zero). The zoo has a transformer only as a language model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from plain_run import run_setup
from tasks import Setup, _digits, _sampler
from torch import nn

PATCH = 2
D = 32


class TinyViT(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        tokens = (8 // PATCH) ** 2
        self.embed = nn.Linear(PATCH * PATCH, D)
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, D))
        block = nn.TransformerEncoderLayer(
            D, 4, 2 * D, dropout=0.0, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = x.reshape(-1, 8 // PATCH, PATCH, 8 // PATCH, PATCH)
        patches = img.permute(0, 1, 3, 2, 4).reshape(x.shape[0], -1, PATCH * PATCH)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(patches)], dim=1)
        return self.head(self.norm(self.body(h + self.pos))[:, 0])


def warmup_linear(
    opt: torch.optim.Optimizer, lr: float, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over the first 10% of the steps, then linear decay to zero at the end."""
    warm = max(1, steps // 10)

    def f(s: int) -> float:
        return (s + 1) / warm if s < warm else max(0.0, (steps - s) / (steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _adamw(p: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(p, lr=lr, weight_decay=0.05)


def vit_digits(seed: int) -> Setup:
    xtr, ytr, xva, yva = _digits(seed)
    loss: nn.Module = nn.CrossEntropyLoss(label_smoothing=0.1)
    return Setup(TinyViT(), loss, _sampler(xtr, ytr, 32), (xva, yva), _adamw, warmup_linear)


def train(lr: float, steps: int, seed: int, mode: str, run_dir: Path) -> dict[str, Any]:
    """One run of ``vit_digits`` in ``mode`` (plain_run.py)."""
    return run_setup(vit_digits, lr, steps, seed, mode, run_dir)
