"""Loop latency: from the step whose data triggers a decision to the step where the hook applies it.

A real trainer process (an MLP on scikit-learn's digits, paced at ~150 steps/s as a GPU-bound
loop would be) is watched by a real ``lrwatch serve --apply`` process. In each of ``--runs``
runs the trainer feeds one non-finite batch at a random step after 100 steps; the daemon decides
a cut at that step (the non-finite finding); the hook acknowledges it at the step it applied it.
The latency of a run is the trainer's own wall-clock time between the end of the trigger step
and the start of the applying step (both recorded in the loop), and the number of steps between.

Three configurations, measured in the same run of this script, interleaved:

- ``before``: the hook's defaults before issue 8 (rows reach the disk every ``flush_secs=1``,
  the control file is looked at every ``control_every=10`` steps only, no alarm flush);
- ``defaults``: the hook's defaults now: ``flush_secs=1``, but an alarm-level row (here the
  non-finite one) is flushed at once (lrwatch/hook/alarm.py), and the control file is also
  looked at by elapsed time (at most every 20 ms);
- ``fast``: as ``defaults`` with ``flush_secs=0.02``.

Usage::

    .venv/bin/python bench/loop_latency.py            # 10 runs per configuration
    .venv/bin/python bench/loop_latency.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP_SECS = 1 / 150  # the pace of the trainer: ~150 steps/s


def trainer(run_dir: Path, trigger: int, flush_secs: float, by_time: bool) -> None:
    """The trainer process: train until 30 steps after the first action was applied."""
    import torch
    from sklearn.datasets import load_digits

    import lrwatch
    from lrwatch import schema
    from lrwatch.hook import alarm, controller
    if not by_time:  # as before issue 8: no look by elapsed time, no alarm flush
        controller.LOOK_SECS = math.inf
        alarm.Alarm.check = lambda self, loss, grad_norm: False  # type: ignore[method-assign]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    ends: dict[int, float] = {}
    starts: dict[int, float] = {}
    state = run_dir / schema.DAEMON_SUBRUN / "state.json"
    with lrwatch.watch(model, opt, logdir=run_dir, criterion=loss_fn, log_every=1,
                       flush_secs=flush_secs) as mon:  # fmt: skip
        mon.log(**{"bench/boot": 0.0})  # makes the run visible to the daemon
        deadline = time.monotonic() + 60
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        step, applied_at = 0, None
        next_at = time.monotonic()
        while step < trigger + 2000:
            step += 1
            starts[step] = time.monotonic()
            idx = torch.randint(0, len(x), (32,))
            xb = x[idx] * (math.nan if step == trigger else 1.0)
            opt.zero_grad()
            loss_fn(model(xb), y[idx]).backward()
            if step == trigger:
                opt.zero_grad()  # the weights stay finite: only the step's data is non-finite
            opt.step()
            ends[step] = time.monotonic()
            if applied_at is None and (run_dir / schema.APPLIED_FILENAME).exists():
                applied_at = step
            if applied_at is not None and step >= applied_at + 30:
                break
            next_at += STEP_SECS
            time.sleep(max(0.0, next_at - time.monotonic()))
    (run_dir / "bench_times.json").write_text(json.dumps({"starts": starts, "ends": ends}))


def one_run(root: Path, name: str, trigger: int, flush_secs: float, by_time: bool) -> dict:
    """Train one run under a real daemon; (steps, ms) from the trigger to the applied step."""
    logdir = root / name
    run_dir = logdir / "run"
    run_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "lrwatch", "serve", "--apply", "--cooldown", "0", str(logdir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        subprocess.run(
            [sys.executable, __file__, "--trainer", str(run_dir), str(trigger), str(flush_secs),
             str(int(by_time))],
            env=env, check=True, timeout=300,
        )  # fmt: skip
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(10)
    times = json.loads((run_dir / "bench_times.json").read_text())
    audit = [json.loads(x) for x in (run_dir / "lrwatch_audit.jsonl").read_text().splitlines()]
    first = min((r for r in audit if r.get("event") == "decision" and r.get("applied")),
                key=lambda r: r["action_id"])  # fmt: skip
    ack = next(r for r in audit if r.get("event") == "acknowledged"
               and r["action_id"] == first["action_id"])  # fmt: skip
    ms = 1000 * (times["starts"][str(ack["step"])] - times["ends"][str(first["step"])])
    return {"trigger": trigger, "decision_step": first["step"], "applied_step": ack["step"],
            "steps": ack["step"] - first["step"], "ms": ms}  # fmt: skip


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--trainer", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trainer:
        run_dir, trigger, flush, by_time = args.trainer
        trainer(Path(run_dir), int(trigger), float(flush), bool(int(by_time)))
        return
    configs = {"before": (1.0, False), "defaults": (1.0, True), "fast": (0.02, True)}
    rng = random.Random(0)
    got: dict[str, list[dict]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            trigger = rng.randint(100, 300)
            for name, (flush, by_time) in configs.items():  # interleaved: same machine load
                got[name].append(one_run(Path(tmp), f"{name}{i}", trigger, flush, by_time))
    print("| configuration | p50 ms | p95 ms | max ms | p95 steps |")
    print("|---|---|---|---|---|")
    for name, rs in got.items():
        ms, steps = [r["ms"] for r in rs], [float(r["steps"]) for r in rs]
        print(f"| {name} | {percentile(ms, 0.5):.0f} | {percentile(ms, 0.95):.0f} | "
              f"{max(ms):.0f} | {percentile(steps, 0.95):.0f} |")  # fmt: skip
    p95 = {k: percentile([r["ms"] for r in rs], 0.95) for k, rs in got.items()}
    for name in ("defaults", "fast"):
        print(f"p95 {name} / before: {p95[name] / p95['before']:.2f}x ({args.runs} runs each)")


if __name__ == "__main__":
    main()
