"""A deliberately mis-tuned trainer for tests/test_serve.py: trains until lrwatch acts on it.

Usage: ``python tests/serve_trainer.py LOGDIR LR MAX_STEPS``. An MLP on scikit-learn's digits
with SGD at a far too high LR, watched by ``lrwatch.watch`` (logging every step). It stops 20
steps after the hook applied a control action (``lrwatch_applied.json`` appears), or after
MAX_STEPS, and prints the step count and the effective LR it ended with.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import lrwatch
from lrwatch import schema

pace = threading.Event()  # never set: its wait() is the per-step pause


def wait_for_daemon(mon: lrwatch.Monitor, logdir: Path, timeout: float = 120.0) -> None:
    """Make the run visible (one scalar at step 0), then wait until the daemon has read it."""
    mon.log(**{"boot": 0.0})
    state = logdir / schema.DAEMON_SUBRUN / "state.json"
    deadline = time.monotonic() + timeout
    while not state.exists() and time.monotonic() < deadline:
        pace.wait(0.05)


def main() -> None:
    logdir, lr, max_steps = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    applied_at = None
    with lrwatch.watch(model, optimizer, logdir=logdir, criterion=loss_fn, log_every=1) as mon:
        wait_for_daemon(mon, logdir)
        for step in range(max_steps):
            pace.wait(0.002)  # a real trainer takes time per step; this one would finish in 1 s
            batch = torch.randint(0, len(x), (64,))
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
            if applied_at is None and (logdir / schema.APPLIED_FILENAME).exists():
                applied_at = step
            if mon.should_stop or (applied_at is not None and step >= applied_at + 20):
                break
    print(f"steps {step + 1} applied_at {applied_at}")


if __name__ == "__main__":
    main()
