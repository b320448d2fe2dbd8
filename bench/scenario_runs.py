"""Real small trainings that make the labelled scenarios of ``bench/scenarios.py``.

Each scenario is a genuine PyTorch training on data shipped with scikit-learn (digits: 8x8 images,
10 classes; diabetes: 10 features, a regression target), recorded with the real hook
``lrwatch.watch``. Nothing is synthesised: a diverging run diverges because its learning rate is
too high, an overfitting run overfits because its training set is tiny.

The labels say which finding kinds a scenario *must* produce (``expect``) and which are
acceptable side effects (``allow``); any other warning-level finding counts as a false positive.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lrwatch

Schedule = Callable[[int], float]  # step -> LR multiplier (torch's LambdaLR convention)


@dataclass(frozen=True)
class Recipe:
    """How to train one scenario: data, model, optimizer, schedule, length."""

    data: str  # "digits" or "diabetes"
    hidden: tuple[int, ...]
    optimizer: str  # "sgd", "momentum", "adam", "adamw"
    lr: float
    steps: int
    schedule: Schedule = lambda step: 1.0  # noqa: E731
    batch: int = 32
    train_subset: int | None = None  # a tiny training set makes a model overfit
    val_every: int = 25
    weight_decay: float = 0.0
    seed: int = 0
    steps_after_nan: int = 20  # a real job keeps stepping for a while after its first NaN


@dataclass(frozen=True)
class Scenario:
    """One labelled training run."""

    name: str
    recipe: Recipe
    expect: frozenset[str] = frozenset()
    allow: frozenset[str] = frozenset()
    quick: bool = True
    note: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def _split(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[torch.Tensor, ...]:
    """Standardise features with training statistics and hold out a fixed validation split."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_val = len(x) // 4
    val, tr = idx[:n_val], idx[n_val:]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    x = (x - mu) / sd
    return (
        torch.tensor(x[tr], dtype=torch.float32),
        torch.tensor(y[tr]),
        torch.tensor(x[val], dtype=torch.float32),
        torch.tensor(y[val]),
    )


def load_data(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    """Training and validation tensors of a scikit-learn dataset that ships with the package."""
    from sklearn import datasets

    if name == "digits":
        d = datasets.load_digits()
        return _split(d.data, d.target.astype(np.int64), seed)
    if name == "diabetes":
        d = datasets.load_diabetes()
        y = (d.target - d.target.mean()) / d.target.std()
        return _split(d.data, y.astype(np.float32)[:, None], seed)
    raise ValueError(f"unknown dataset {name!r}")


def _model(n_in: int, hidden: tuple[int, ...], n_out: int) -> nn.Module:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(n_in, width), nn.ReLU()]
        n_in = width
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def _optimizer(r: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr, weight_decay=r.weight_decay)
    if r.optimizer == "momentum":
        return torch.optim.SGD(params, lr=r.lr, momentum=0.9, weight_decay=r.weight_decay)
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay or 0.01)
    raise ValueError(f"unknown optimizer {r.optimizer!r}")


def train(r: Recipe, run_dir: Path, *, log_every: int | None = None) -> dict[str, float | int]:
    """Train ``r`` with the hook writing into ``run_dir``; returns facts measured in the loop."""
    torch.manual_seed(r.seed)
    xtr, ytr, xva, yva = load_data(r.data, r.seed)
    if r.train_subset is not None:
        xtr, ytr = xtr[: r.train_subset], ytr[: r.train_subset]
    classify = r.data == "digits"
    model = _model(xtr.shape[1], r.hidden, 10 if classify else 1)
    loss_fn: nn.Module = nn.CrossEntropyLoss() if classify else nn.MSELoss()
    opt = _optimizer(r, list(model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, r.schedule)
    kwargs = {} if log_every is None else {"log_every": log_every}
    gen = torch.Generator().manual_seed(r.seed)
    first_nan, best_val, best_val_step, stop_at = -1, math.inf, -1, r.steps
    with lrwatch.watch(model, opt, logdir=str(run_dir), **kwargs) as mon:
        step = 0
        while step < stop_at:
            for idx in torch.randperm(len(xtr), generator=gen).split(r.batch):
                loss = loss_fn(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                mon.log(loss=loss)
                opt.step()
                sched.step()
                step += 1
                if first_nan < 0 and not math.isfinite(loss.item()):
                    first_nan, stop_at = step, min(stop_at, step + r.steps_after_nan)
                if step % r.val_every == 0 and first_nan < 0:
                    with torch.no_grad():
                        val = loss_fn(model(xva), yva).item()
                    mon.log(**{"val/loss": val})
                    if val < best_val:
                        best_val, best_val_step = val, step
                if step >= stop_at:
                    break
    return {"steps": step, "first_nan_step": first_nan, "best_val_step": best_val_step}


def warmup_to(peak: float, warm: int) -> Schedule:
    """A linear ramp from 1x to ``peak``x over ``warm`` steps, then flat (a mis-set warm-up)."""
    return lambda s: 1.0 + (peak - 1.0) * min(s / warm, 1.0)


def step_decay(every: int, gamma: float) -> Schedule:
    return lambda s: gamma ** (s // every)


def cosine(total: int, warm: int = 0) -> Schedule:
    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        t = min((s - warm) / max(total - warm, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * t)) * 0.99 + 0.01

    return f


def write_facts(run_dir: Path, facts: dict[str, float | int]) -> None:
    (run_dir / "facts.json").write_text(json.dumps(facts))


def read_facts(run_dir: Path) -> dict[str, float | int] | None:
    path = run_dir / "facts.json"
    return json.loads(path.read_text()) if path.exists() else None
