"""One zoo run in one of three modes, as a user's loop would run it.

- ``none``: the hook attached with ``control=False`` (the training is exactly what it would be
  without lrwatch); replaying its event file through the analyzer is the recommend mode.
- ``apply``: a real ``lrwatch serve --apply`` process watches the run while it trains; the trainer
  sleeps ``STEP_SLEEP`` per step, as a GPU step would hold it, and stops on ``mon.should_stop``.
- ``plateau``: no lrwatch; torch's ``ReduceLROnPlateau`` (patience 5, factor 0.5) on the
  validation loss, composed with the task's own schedule (its factor multiplies the schedule's
  LR for the step, the way lrwatch's cuts do).

The returned facts are measured in the loop: final validation loss (None when non-finite), the
validation curve, the first non-finite step, the steps run and whether the run was stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tasks import TASKS, Setup

import lrwatch
from lrwatch import schema

VAL_EVERY = 20
STEP_SLEEP = 0.005  # apply mode: seconds a (GPU-bound) step holds the loop
NAN_PATIENCE = 30  # a real job would keep stepping a while after its loss went NaN; not forever


def _val_loss(s: Setup) -> float:
    s.model.eval()
    with torch.no_grad(), _autocast(s):
        out = s.loss_fn(s.model(s.val[0]), s.val[1]).item()
    s.model.train()
    return out


def _autocast(s: Setup) -> contextlib.AbstractContextManager[Any]:
    if s.bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Plateau:
    """torch's ReduceLROnPlateau driving a factor on a one-parameter optimizer, so its cuts
    compose with a schedule that sets the LR every step (LambdaLR, OneCycle)."""

    def __init__(self) -> None:
        self.opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self.rlrop = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, patience=5, factor=0.5)

    @property
    def factor(self) -> float:
        return float(self.opt.param_groups[0]["lr"])


def _start_daemon(logdir: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "lrwatch", "serve", "--apply", str(logdir)]
    with open(logdir / "serve.log", "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_daemon(mon: lrwatch.Monitor, run_dir: Path, timeout: float = 60.0) -> None:
    """Make the run visible, then wait until the daemon has read it (its state file exists)."""
    mon.log(**{"zoo/boot": 0.0})
    state = run_dir / schema.DAEMON_SUBRUN / "state.json"
    deadline = time.monotonic() + timeout
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_for_acks(run_dir: Path, timeout: float = 10.0) -> None:
    """Wait until the daemon has read back the hook's ack of every action it applied."""
    from lrwatch.daemon.outputs import read_audit
    from lrwatch.hook.applied import Applied

    applied = Applied.load(run_dir / schema.APPLIED_FILENAME)
    if applied is None:  # nothing applied (no file, or one the daemon must not wait on)
        return
    want = set(applied.ids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        acked = {r["action_id"] for r in read_audit(run_dir) if r.get("event") == "acknowledged"}
        if want <= acked:
            return
        time.sleep(0.02)  # polling a condition with a bound, not a sleep for synchronisation


def _stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def train(task: str, mult: float, seed: int, mode: str, run_dir: Path) -> dict[str, Any]:
    """Train one run; ``run_dir`` receives its event files (modes ``none`` and ``apply``)."""
    torch.set_num_threads(1)
    t = TASKS[task]
    torch.manual_seed(seed)
    s = t.build(seed)
    lr = t.lr * mult
    opt = s.optimizer(list(s.model.parameters()), lr)
    sched = s.schedule(opt, lr, t.steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    daemon = _start_daemon(run_dir.parent) if mode == "apply" else None
    mon = None
    if mode != "plateau":
        mon = lrwatch.watch(
            s.model,
            opt,
            logdir=str(run_dir),
            criterion=s.loss_fn,
            control=mode == "apply",  # log_every: the default ("auto"), as users run it
            # A CPU task does ~100 steps/s; a GPU job a few. 20 ms keeps the daemon as many
            # steps behind as the default 1 s does on a real job (bench/loop_latency.py).
            flush_secs=0.02 if mode == "apply" else 1.0,
        )
    try:
        if daemon is not None and mon is not None:
            _wait_for_daemon(mon, run_dir)
        facts = _loop(
            t.steps,
            s,
            opt,
            sched,
            mon,
            _Plateau() if mode == "plateau" else None,
            sleep=STEP_SLEEP if mode == "apply" else 0.0,
        )
    finally:
        if mon is not None:
            mon.close()
        if daemon is not None:
            _wait_for_acks(run_dir)
            _stop_daemon(daemon)
    facts.update(task=task, mult=mult, seed=seed, mode=mode)
    return facts


def _loop(
    steps: int,
    s: Setup,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    mon: lrwatch.Monitor | None,
    plateau: _Plateau | None,
    *,
    sleep: float,
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1234)
    first_nan, bad_run, curve, stopped = -1, 0, [], False
    step = 0
    start = time.monotonic()
    for step in range(1, steps + 1):
        x, y = s.batch(gen)
        with _autocast(s):
            loss = s.loss_fn(s.model(x), y)
        opt.zero_grad()
        loss.backward()
        if s.clip is not None:
            total = torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.clip)
            if mon is not None:
                mon.log(**{schema.GRAD_NORM_PRECLIP: total})
        stash = [g["lr"] for g in opt.param_groups]
        if plateau is not None:
            for g in opt.param_groups:
                g["lr"] = g["lr"] * plateau.factor
        opt.step()
        if plateau is not None:
            for g, v in zip(opt.param_groups, stash, strict=True):
                g["lr"] = v
        sched.step()
        if sleep:
            time.sleep(sleep)
        finite = math.isfinite(loss.item())
        first_nan = step if first_nan < 0 and not finite else first_nan
        bad_run = 0 if finite else bad_run + 1
        if step % VAL_EVERY == 0:
            val = _val_loss(s)
            curve.append((step, val if math.isfinite(val) else None))
            if mon is not None:
                mon.log(**{"val/loss": val})
            if plateau is not None and math.isfinite(val):
                plateau.rlrop.step(val)
        if mon is not None and mon.should_stop:
            stopped = True
            break
        if bad_run >= NAN_PATIENCE:
            break
    final = _val_loss(s)
    return {
        "final_val": final if math.isfinite(final) else None,
        "curve": curve,
        "first_nan_step": first_nan,
        "steps_run": step,
        "stopped": stopped,
        "seconds": round(time.monotonic() - start, 2),
        "plateau_factor": 1.0 if plateau is None else plateau.factor,
    }
