"""A mis-tuned trainer writing to object storage, for tests/test_objstore_e2e.py.

Usage: ``python tests/objstore_trainer.py URL LR MAX_STEPS [STEP_SECS]``. An MLP on
scikit-learn's digits with SGD at a far too high LR, watched by ``lrwatch.watch(logdir=URL)``.
It stops 20 steps after the hook applied a control action (the spool's
``lrwatch_applied.json`` appears), or after MAX_STEPS, and prints one JSON line: the steps, the
step the action was applied at, the LR it ended with, and each logged loss by step.
"""

from __future__ import annotations

import json
import sys
import threading

import torch
from sklearn.datasets import load_digits
from torch import nn

import lrwatch
from lrwatch import schema

pace = threading.Event()  # never set: its wait() is the per-step pause


def main() -> None:
    url, lr, max_steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    step_secs = float(sys.argv[4]) if len(sys.argv) > 4 else 0.01
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    applied_at, losses = None, {}
    with lrwatch.watch(model, optimizer, logdir=url, flush_secs=0.2, log_every=1) as mon:
        for _ in range(max_steps):
            pace.wait(step_secs)  # a real trainer takes time per step
            batch = torch.randint(0, len(x), (64,))
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            mon.log(loss=loss)
            optimizer.step()
            losses[mon.step] = loss.item()
            if applied_at is None and (mon.run_dir / schema.APPLIED_FILENAME).exists():
                applied_at = mon.step
            if mon.should_stop or (applied_at is not None and mon.step >= applied_at + 20):
                break
    lr_now = optimizer.param_groups[0]["lr"] / (mon._controller.lr_factor if mon._controller else 1)
    doc = {"steps": mon.step, "applied_at": applied_at, "lr": lr_now, "losses": losses}
    print(json.dumps({**doc, "spool": str(mon.run_dir)}))


if __name__ == "__main__":
    main()
