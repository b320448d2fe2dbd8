"""A checkpointing, resuming hooked trainer for the chaos suite and the read-boundary test.

Usage: ``python tests/chaos_trainer.py LOGDIR STEPS [--lr LR] [--val-every N] [--ckpt-every N]
[--pace SECONDS] [--fresh]``. An MLP on scikit-learn's digits with SGD, watched by
``lrwatch.watch``. Every ``--val-every`` steps it logs ``val/loss`` through ``mon.log`` (so those
values reach the event file before the step's batched rows, as in issue 9). Every
``--ckpt-every`` steps it saves model, optimizer, data position and ``mon.state_dict()``
atomically to ``LOGDIR/ckpt.pt``, and a restarted process resumes from it (unless ``--fresh``),
as a preempted job would. It prints one line per applied action and ``done STEP`` at the end.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

import lrwatch

pace = threading.Event()  # never set: its wait() is the per-step pause


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, mon: Any) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lrwatch": mon.state_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("logdir", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--ckpt-every", type=int, default=50, help="0: no checkpoints")
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    ckpt = args.logdir / "ckpt.pt"
    args.logdir.mkdir(parents=True, exist_ok=True)
    mon = lrwatch.watch(
        model, optimizer, logdir=args.logdir, criterion=loss_fn, log_every=5, control_every=1
    )
    start = 0
    resuming = ckpt.exists() and not args.fresh
    if not resuming and args.ckpt_every:  # step 0 is a checkpoint too: every restart resumes
        save_checkpoint(ckpt, {**_state(model, optimizer, mon), "step": 0})
    if resuming:
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        mon.load_state_dict(state["lrwatch"])
        start = state["step"]
        print(f"resumed {start}", flush=True)
    gen = torch.Generator().manual_seed(start)
    with mon:
        for step in range(start, args.steps):
            if args.pace:
                pace.wait(args.pace)
            batch = torch.randint(0, len(x), (64,), generator=gen)
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
            if (step + 1) % args.val_every == 0:
                with torch.no_grad():
                    mon.log(**{"val/loss": float(loss_fn(model(x[:300]), y[:300]))})
            if args.ckpt_every and (step + 1) % args.ckpt_every == 0:
                save_checkpoint(ckpt, {**_state(model, optimizer, mon), "step": step + 1})
            if mon.should_stop:
                break
    print(f"done {step + 1}", flush=True)


if __name__ == "__main__":
    main()
