"""The zoo's held-out split: tasks added after all tuning, to be scored once and never tuned on.

Two are written with the frameworks users train with, which the rest of the zoo lacks
(Lightning, the Hugging Face Trainer: lrwatch attached through its integrations, the framework
owning the loop, the schedule and the clipping), and one is plain PyTorch of a new shape and
optimizer. Their base LRs were chosen from ``none``-mode sweeps alone (the best final validation
loss of a quick LR sweep without lrwatch, ``bench/zoo/tune_holdout.py``), as a user would.
Each task's module is imported only when it runs: Lightning and transformers take seconds.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class HoldoutTask:
    name: str
    lr: float  # the tuned learning rate: multiplier 1 of the sweep
    steps: int
    module: str  # the module in bench/zoo/ whose ``train(lr, steps, seed, mode, run_dir)`` runs it
    note: str


TASKS: dict[str, HoldoutTask] = {
    t.name: t
    for t in (
        HoldoutTask(
            "lit_digits", 1.0, 400, "lit_task",
            "Lightning CNN + BatchNorm on digits, SGD Nesterov 0.9, warm-up 20 + cosine "
            "(configure_optimizers), gradient_clip_val 1.0",
        ),
        HoldoutTask(
            "hf_gpt2", 3e-3, 300, "hf_task",
            "HF Trainer, 2-layer GPT-2 from a config on stdlib source, AdamW, warm-up 30 + "
            "cosine, max_grad_norm 1.0",
        ),
        HoldoutTask(
            "ae_signals", 1e-3, 360, "ae_task",
            "1-D conv denoising autoencoder on generated signals, RMSprop, StepLR(120, 0.5)",
        ),
    )
}  # fmt: skip


def source_files() -> list[Path]:
    """The zoo's files a held-out run executes besides tasks.py and trainer.py (cache key)."""
    return [
        HERE / f"{m}.py"
        for m in ("holdout", "framework_run", "plain_run", "lit_task", "hf_task", "ae_task")
    ]


def train(
    task: str,
    mult: float,
    seed: int,
    mode: str,
    run_dir: Path,
    *,
    steps: int | None = None,
    tasks: Mapping[str, HoldoutTask] = TASKS,
) -> dict[str, Any]:
    """trainer.py's ``train`` for a held-out task of ``tasks`` (this split's, or holdout2's);
    ``steps`` overrides its length (tests only)."""
    t = tasks[task]
    run = importlib.import_module(t.module).train
    facts: dict[str, Any] = run(t.lr * mult, steps or t.steps, seed, mode, run_dir)
    facts.update(task=task, mult=mult, seed=seed, mode=mode)
    return facts
