"""What the held-out tasks' loops share: the facts a run reports, the plateau baseline on a
framework's optimizer, and the ``serve --apply`` daemon around a run.

trainer.py's plain loop measures these facts inline. A framework (Lightning, the Hugging Face
Trainer) owns its loop, so the same facts are gathered from its callbacks instead, with the same
definitions: the training loss of every step checked on the host (``.item()``, as the plain loop
does), validation every ``VAL_EVERY`` steps, a run ended after ``NAN_PATIENCE`` non-finite steps.
The daemon helpers are trainer.py's own, imported rather than copied; trainer.py is not edited
because its syntax tree keys the cache of every existing zoo run.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from trainer import (
    NAN_PATIENCE,
    STEP_SLEEP,
    VAL_EVERY,
    _Plateau,
    _start_daemon,
    _stop_daemon,
    _wait_for_acks,
    _wait_for_daemon,
)

import lrwatch

__all__ = [
    "STEP_SLEEP", "VAL_EVERY", "Facts", "PlateauOnOptimizer",
    "apply_daemon", "wait_for_daemon", "watch_kwargs",
]  # fmt: skip


class Facts:
    """The facts trainer.py's ``_loop`` returns, fed one step and one validation at a time."""

    def __init__(self) -> None:
        self.first_nan, self.bad_run, self.steps_run = -1, 0, 0
        self.curve: list[tuple[int, float | None]] = []
        self.stopped = False
        self.start = time.monotonic()

    def train_loss(self, step: int, loss: float) -> bool:
        """Record a step's loss; True once the run has been non-finite for ``NAN_PATIENCE``."""
        finite = math.isfinite(loss)
        self.first_nan = step if self.first_nan < 0 and not finite else self.first_nan
        self.bad_run = 0 if finite else self.bad_run + 1
        self.steps_run = step
        return self.bad_run >= NAN_PATIENCE

    def val_loss(self, step: int, val: float) -> None:
        self.curve.append((step, val if math.isfinite(val) else None))

    def result(self, final: float, plateau: PlateauOnOptimizer | None) -> dict[str, Any]:
        return {
            "final_val": final if math.isfinite(final) else None,
            "curve": self.curve,
            "first_nan_step": self.first_nan,
            "steps_run": self.steps_run,
            "stopped": self.stopped,
            "seconds": round(time.monotonic() - self.start, 2),
            "plateau_factor": 1.0 if plateau is None else plateau.factor,
        }


class PlateauOnOptimizer:
    """trainer.py's ``_Plateau`` applied through the optimizer's own step hooks.

    The plain loop multiplies every group's LR by the plateau factor around ``opt.step()`` and
    restores it after, so the factor composes with whatever the schedule sets. A framework calls
    ``step()`` itself; torch's step pre/post hooks do the same multiply and restore there, before
    the framework's scheduler steps.
    """

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.plateau = _Plateau()
        self.opt = opt
        self._stash: list[float] = []
        self._handles = [
            opt.register_step_pre_hook(lambda *_: self._scale()),
            opt.register_step_post_hook(lambda *_: self._restore()),
        ]

    @property
    def factor(self) -> float:
        return self.plateau.factor

    def val_loss(self, val: float) -> None:
        if math.isfinite(val):
            self.plateau.rlrop.step(val)

    def _scale(self) -> None:
        self._stash = [g["lr"] for g in self.opt.param_groups]
        for g in self.opt.param_groups:
            g["lr"] = g["lr"] * self.factor

    def _restore(self) -> None:
        for g, v in zip(self.opt.param_groups, self._stash, strict=True):
            g["lr"] = v

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def watch_kwargs(mode: str) -> dict[str, Any]:
    """The hook's options in ``mode``, exactly as trainer.py passes them to ``lrwatch.watch``."""
    return {"control": mode == "apply", "flush_secs": 0.02 if mode == "apply" else 1.0}


def wait_for_daemon(mon: lrwatch.Monitor | None, run_dir: Path) -> None:
    """trainer.py's wait, for a monitor that a framework callback created."""
    if mon is not None:
        _wait_for_daemon(mon, run_dir)


@contextmanager
def apply_daemon(mode: str, run_dir: Path) -> Iterator[subprocess.Popen[bytes] | None]:
    """A real ``lrwatch serve --apply`` on the run's parent in ``apply`` mode, else nothing.

    On exit (the framework has closed its monitor by then) it waits for the hook's acks of
    every applied action, then stops the daemon, as trainer.py's ``train`` does.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    daemon = _start_daemon(run_dir.parent) if mode == "apply" else None
    try:
        yield daemon
    finally:
        if daemon is not None:
            _wait_for_acks(run_dir)
            _stop_daemon(daemon)
