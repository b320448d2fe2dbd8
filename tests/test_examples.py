"""Every script in examples/ runs for real (a subprocess, ``--quick``) and leaves lrwatch's tags.

Convention for examples: each accepts ``--logdir DIR`` and ``--quick`` (seconds on a CPU).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrwatch import schema

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
CORE_TAGS = {
    schema.LOSS,
    schema.NONFINITE,
    schema.LR,
    schema.GRAD_NORM,
    schema.UPDATE_RATIO,
    schema.WEIGHT_NORM,
}
EXTRA_TAGS = {  # what each example logs itself
    "train_digits.py": {"val/loss", "val/accuracy"},
    "lightning_digits.py": {"val_loss", "val_acc"},
    "hf_trainer.py": {"eval_loss"},
    "amp_bf16.py": {schema.LOSS_SCALE, schema.SKIPPED},
}
QUICK_STEPS = {"train_digits.py": 3 * math.ceil(1437 / 32)}  # epochs x batches of the train split


def run_example(script: Path, logdir: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--logdir", str(logdir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_examples_exist() -> None:
    assert [p.name for p in EXAMPLES if p.name == "train_digits.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_writes_lrwatch_tags(script: Path, tmp_path: Path) -> None:
    logdir = tmp_path / "run"
    stdout = run_example(script, logdir)
    assert f"tensorboard --logdir {logdir}" in stdout
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert CORE_TAGS | EXTRA_TAGS.get(script.name, set()) <= tags
    loss = acc.Scalars(schema.LOSS)
    assert all(math.isfinite(e.value) for e in loss)
    if script.name in QUICK_STEPS:  # one loss per optimizer step, at steps 1..n
        assert [e.step for e in loss] == list(range(1, QUICK_STEPS[script.name] + 1))
