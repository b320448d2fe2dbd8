"""The zoo's second held-out split, ``holdout2``: three tasks added after every other split was
read while tuning, to be scored once by the lead and never tuned on.

Three shapes the zoo lacked, in plain PyTorch through trainer.py's loop (plain_run.py): a tiny
vision transformer with label smoothing and a linear warm-up/decay (vit_task.py), an LSTM
forecaster of generated series under bf16 autocast with ExponentialLR (forecast_task.py), and a
click-through model with category embeddings under Adagrad (tabular_task.py). Each base LR was
chosen from ``none``-mode runs alone: the best mean final validation loss of seeds 0 and 1 over a
half-decade grid (``bench/zoo/tune_holdout.py --split holdout2``; its output is in
``tune_holdout2.txt``), as a user would. Nobody has read lrwatch's findings on these tasks.

The registry reuses holdout.py's ``HoldoutTask`` and its ``train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import holdout
from holdout import HoldoutTask

HERE = Path(__file__).resolve().parent

TASKS: dict[str, HoldoutTask] = {
    t.name: t
    for t in (
        HoldoutTask(
            "vit_digits", 1e-2, 400, "vit_task",
            "tiny ViT (2x2 patches, 2 pre-norm layers, d 32) on digits, AdamW, linear warm-up "
            "10% + linear decay, label smoothing 0.1",
        ),
        HoldoutTask(
            "lstm_forecast", 3e-2, 500, "forecast_task",
            "LSTM forecaster (48 past -> 12 ahead) of generated sines + trend + noise, Adam, "
            "ExponentialLR(0.995), bf16 autocast",
        ),
        HoldoutTask(
            "ctr_embed", 0.1, 400, "tabular_task",
            "click-through MLP over 6 category embeddings + 4 numeric features on generated "
            "data, Adagrad, constant LR, BCE",
        ),
    )
}  # fmt: skip


def source_files() -> list[Path]:
    """The zoo's files a ``holdout2`` run executes besides tasks.py and trainer.py (cache key)."""
    modules = ("holdout", "holdout2", "plain_run", "framework_run")
    return [HERE / f"{m}.py" for m in (*modules, *(t.module for t in TASKS.values()))]


def train(
    task: str, mult: float, seed: int, mode: str, run_dir: Path, *, steps: int | None = None
) -> dict[str, Any]:
    """trainer.py's ``train`` for a ``holdout2`` task; ``steps`` overrides its length (tests)."""
    return holdout.train(task, mult, seed, mode, run_dir, steps=steps, tasks=TASKS)
