"""A deliberately mis-tuned training for lrwatch's whole loop to rescue.

A small MLP learns scikit-learn's handwritten digits (1797 8x8 images that ship with the package,
no download) with SGD + momentum 0.9, a 20-step warm-up and then a peak learning rate of 0.6, about
ten times what this model trains well with. Left alone, the updates are ~6% of the weights every
step, the loss bounces and the run ends with a validation loss near 1 (with ``--lr 5`` the loss
explodes at once and the ReLUs die: stuck at chance). Watched by ``lrwatch serve --apply``, the
daemon notices within the first ~150 steps, cuts the LR inside the running job, and the run ends
with a validation loss of 0.1-0.5, depending on what else the daemon decides (a stop, later cuts)::

    lrwatch serve runs --apply &                                    # the daemon
    python examples/mistuned.py --logdir runs/mistuned --step-delay 0.01
    python examples/mistuned.py --logdir runs/baseline --no-lrwatch  # the same run, unwatched

The only lrwatch lines are ``lrwatch.watch(...)``, ``mon.log(...)``, ``mon.should_stop`` and
``mon.state_dict()`` / ``mon.load_state_dict()`` in the checkpoint. A checkpoint (model,
optimizer, scheduler, data order, monitor) is written every ``--ckpt-every`` steps; ``--resume``
continues from it, and lrwatch neither reapplies nor loses an LR cut across the restart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import lrwatch

DAEMON_STATE = Path("lrwatch_daemon") / "state.json"  # written once `lrwatch serve` read a run


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1], split 80/20 by a seeded permutation."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def warmup(steps: int) -> Callable[[int], float]:
    """LambdaLR multiplier: linear warm-up over ``steps``, then constant (the mis-tuned peak)."""
    return lambda step: min(1.0, (step + 1) / steps)


class Batches:
    """An endless, seeded stream of minibatch indices whose position survives a checkpoint."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[torch.Tensor] = []

    def next(self) -> torch.Tensor:
        if not self.queue:
            self.queue = list(
                torch.randperm(self.n, generator=self.generator).split(self.batch_size)
            )
        return self.queue.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "queue": self.queue}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.queue = list(state["queue"])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    model.train()
    return loss


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file, then rename: a kill mid-save leaves the previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def wait_for_daemon(run_dir: Path, timeout: float) -> bool:
    """Block until ``lrwatch serve`` has read this run (its state file exists), or ``timeout``.

    Only for short demo runs: a real job is long enough for the daemon to catch up on its own.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / DAEMON_STATE).exists():
            return True
        time.sleep(0.05)
    return False


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", type=Path, default=Path("runs/mistuned"), help="run directory")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--lr", type=float, default=0.6, help="peak LR after warm-up (too high)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps to the peak LR")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=25, help="steps between validations")
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds of pause per step")
    p.add_argument("--flush-secs", type=float, default=0.25, help="hook's event flush interval")
    p.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--checkpoint", type=Path, help="default: LOGDIR/checkpoint.pt")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--no-lrwatch", action="store_true", help="the same run without the hook")
    p.add_argument(
        "--wait-for-daemon",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before training, wait until `lrwatch serve` has read the run",
    )
    p.add_argument("--result", type=Path, help="also write the final losses here as JSON")
    p.add_argument("--quick", action="store_true", help="150 steps, for tests and smoke runs")
    return p.parse_args()  # fmt: skip


class Job:
    """The training's state: what a checkpoint must hold to continue the run exactly."""

    def __init__(self, args: argparse.Namespace, *, n_train: int) -> None:
        torch.manual_seed(args.seed)
        self.model = make_model()
        self.loss_fn = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup(args.warmup))
        self.batches = Batches(n_train, args.batch_size, args.seed)
        self.step = 0
        self.mon: lrwatch.Monitor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "batches": self.batches.state_dict(),
            "step": self.step,
            "lrwatch": self.mon.state_dict() if self.mon is not None else None,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.batches.load_state_dict(ckpt["batches"])
        self.step = ckpt["step"]
        if self.mon is not None and ckpt.get("lrwatch") is not None:
            self.mon.load_state_dict(ckpt["lrwatch"])  # lrwatch never reapplies an action


def train(job: Job, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """The plain training loop; returns the final losses."""
    x_train, y_train, x_val, y_val = data
    steps = 150 if args.quick else args.steps
    model, optimizer, loss_fn, mon = job.model, job.optimizer, job.loss_fn, job.mon
    train_loss, stopped = math.nan, False
    while job.step < steps:
        batch = job.batches.next()
        optimizer.zero_grad()
        loss = loss_fn(model(x_train[batch]), y_train[batch])
        loss.backward()
        optimizer.step()
        job.scheduler.step()
        job.step += 1
        train_loss = loss.item()
        if mon is not None and job.step % args.val_every == 0:
            mon.log(**{"val/loss": evaluate(model, x_val, y_val)})
        if job.step % args.ckpt_every == 0:
            save_checkpoint(args.checkpoint, job.state_dict())
        if job.step % 100 == 0:
            lr = job.scheduler.get_last_lr()[0]
            print(f"step {job.step:5d}  train loss {train_loss:10.4g}  scheduler lr {lr:.3g}")
        if mon is not None and mon.should_stop:  # the daemon (or `lrwatch apply`) said stop
            stopped = True
            print(f"stopped at step {job.step}: lrwatch asked to stop")
            break
        if args.step_delay > 0:
            time.sleep(args.step_delay)  # pacing, so a live daemon has time to act
    val_loss = evaluate(model, x_val, y_val)
    if mon is not None and job.step % args.val_every:
        mon.log(**{"val/loss": val_loss})
    return {"step": job.step, "train_loss": train_loss, "val_loss": val_loss, "stopped": stopped}


def main() -> None:
    args = parse_args()
    args.checkpoint = args.checkpoint or args.logdir / "checkpoint.pt"
    torch.set_num_threads(1)  # deterministic, and polite on a shared machine
    data = load_data(args.seed)
    job = Job(args, n_train=len(data[0]))
    if not args.no_lrwatch:  # the one-line hook
        job.mon = lrwatch.watch(
            job.model, job.optimizer, logdir=args.logdir, criterion=job.loss_fn,
            log_every=5, flush_secs=args.flush_secs,
        )  # fmt: skip
    args.logdir.mkdir(parents=True, exist_ok=True)
    if args.resume and args.checkpoint.exists():
        job.load_state_dict(torch.load(args.checkpoint, weights_only=False))
        print(f"resumed from {args.checkpoint} at step {job.step}")
    elif job.mon is not None:  # the first event: the daemon finds the run from here
        job.mon.log(step=0, **{"val/loss": evaluate(job.model, data[2], data[3])})
    if job.mon is not None and args.wait_for_daemon > 0:
        if not wait_for_daemon(args.logdir, args.wait_for_daemon):
            print(f"no daemon read {args.logdir} within {args.wait_for_daemon} s; going on")
    try:
        result = train(job, args, data)
    finally:
        if job.mon is not None:
            job.mon.close()
    print(f"final train loss {result['train_loss']:.4g}  val loss {result['val_loss']:.4g}"
          f"  (step {result['step']})")  # fmt: skip
    print(f"open it: tensorboard --logdir {args.logdir}")
    if args.result is not None:
        args.result.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
