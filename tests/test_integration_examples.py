"""What tests/test_examples.py cannot see in the integration examples: their values.

test_examples.py already runs every script in examples/ as ``python SCRIPT --quick --logdir DIR``
and checks lrwatch's core tags. Here: the torchrun example with two real gloo processes (a stop
action lands on both ranks at the same step), and the AMP example's loss scale and skipped step
against GradScaler's own rules.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrwatch import schema
from lrwatch.schema import Kind

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def scalars(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_torchrun_example_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    logdir = tmp_path / "ddp"
    script = str(EXAMPLES / "torchrun_ddp.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    out = run([*launch, "2", script, "--quick", "--logdir", str(logdir), "--stop-at", "15"])
    ranks = dict(re.findall(r"rank (\d): (\d+ steps, stopped by lrwatch: (?:True|False))", out))
    # The hook checks the control file every 10 steps: the action appended after step 15
    # arrives at step 20's boundary, broadcast from rank 0, and both ranks leave the loop.
    assert ranks == {"0": "20 steps, stopped by lrwatch: True", "1": ranks["0"]}
    files = [f for f in logdir.iterdir() if "tfevents" in f.name]
    assert len(files) == 1  # only rank 0 writes
    acc = scalars(logdir)
    assert [(e.step, e.value) for e in acc.Scalars(schema.STOP)] == [(20, 1.0)]
    assert [e.step for e in acc.Scalars(schema.LOSS)] == list(range(1, 21))
    applied = json.loads((logdir / schema.APPLIED_FILENAME).read_text())
    assert "stop" in json.dumps(applied)


def expected_scales(steps: int, *, skip_at: int, init: float, interval: int) -> list[float]:
    """GradScaler's documented rules: halve and reset on a skip, double after ``interval`` good
    steps. Element ``i`` is the scale in effect during iteration ``i + 1``."""
    scale, good, out = init, 0, []
    for it in range(1, steps + 1):
        out.append(scale)
        if it == skip_at:
            scale, good = scale * 0.5, 0
        else:
            good += 1
            if good == interval:
                scale, good = scale * 2.0, 0
    return out


@pytest.mark.slow
def test_amp_example_records_the_loss_scale_and_the_one_skipped_step(tmp_path: Path) -> None:
    logdir = tmp_path / "amp"
    run([sys.executable, str(EXAMPLES / "amp_bf16.py"), "--quick", "--logdir", str(logdir)])
    acc = scalars(logdir)
    skipped = acc.Scalars(schema.SKIPPED)
    assert [e.step for e in skipped] == list(range(1, 61))  # skipped iterations count as steps
    assert [e.step for e in skipped if e.value == 1.0] == [20]  # the injected overflow
    scales = [e.value for e in acc.Scalars(schema.LOSS_SCALE)]
    assert scales == expected_scales(60, skip_at=20, init=2.0**16, interval=25)
    losses = acc.Scalars(schema.LOSS)
    assert len(losses) == 60 and all(math.isfinite(e.value) for e in losses)
    # An isolated back-off is not a divergence: the analyzer finds nothing non-finite or exploding.
    report = run([sys.executable, "-m", "lrwatch", "analyze", "--json", str(logdir)])
    kinds = {f["kind"] for f in json.loads(report)["findings"]}
    assert not kinds & {Kind.NONFINITE.value, Kind.EXPLOSION.value}
