"""One run of a plain-PyTorch held-out task in one of the zoo's three modes.

trainer.py's ``train`` does this for the tasks of tasks.py; it cannot take a task from
elsewhere without an edit that would change the syntax tree keying every cached run of the
``tune``, ``report`` and ``fresh`` splits. ``ae_signals`` and the ``holdout2`` tasks share this one
instead: the task's ``Setup`` is built for the seed, then trainer.py's own ``_loop`` runs it, with
the hook attached exactly as trainer.py attaches it (``control=False`` in ``none`` mode).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from framework_run import apply_daemon, watch_kwargs
from tasks import Setup
from trainer import STEP_SLEEP, _loop, _Plateau, _wait_for_daemon

import lrwatch


def run_setup(
    build: Callable[[int], Setup], lr: float, steps: int, seed: int, mode: str, run_dir: Path
) -> dict[str, Any]:
    """Train ``build(seed)`` at ``lr`` for ``steps`` in ``mode``; the facts of trainer.py."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    s = build(seed)
    opt = s.optimizer(list(s.model.parameters()), lr)
    sched = s.schedule(opt, lr, steps)
    with apply_daemon(mode, run_dir):
        mon = None
        if mode != "plateau":
            mon = lrwatch.watch(
                s.model, opt, logdir=str(run_dir), criterion=s.loss_fn, **watch_kwargs(mode)
            )
        try:
            if mode == "apply" and mon is not None:
                _wait_for_daemon(mon, run_dir)
            plateau = _Plateau() if mode == "plateau" else None
            sleep = STEP_SLEEP if mode == "apply" else 0.0
            return _loop(steps, s, opt, sched, mon, plateau, sleep=sleep)
        finally:
            if mon is not None:
                mon.close()
