"""The human-in-the-loop walkthrough runs for real: recommend, report, ``lrwatch apply``, resume.

Checked against the artefacts themselves (audit log, control file, TensorBoard's own
EventAccumulator, the PNG signature), not against what the script prints about them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrwatch import schema

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "human_in_the_loop.py"
PEAK_LR, WARMUP = 0.6, 20  # the walkthrough's defaults for mistuned.py
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scheduled_lr(step: int) -> float:
    """LR of optimizer step ``step`` (1-based) under mistuned.py's LambdaLR warm-up.

    That step runs after ``step - 1`` scheduler steps: multiplier ``min(1, step / WARMUP)``.
    """
    return PEAK_LR * min(1.0, step / WARMUP)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    logdir = tmp_path_factory.mktemp("human") / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--logdir", str(logdir)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return logdir, proc.stdout


def recommended_factor(run_dir: Path) -> int:
    lines = (run_dir / "lrwatch_audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    recs = [r for r in records if r["event"] == "decision"]
    assert recs, "the audit log holds no recommendation"
    assert all(r["mode"] == "recommend" and r["applied"] is False for r in recs)
    cuts = [r["factor"] for r in recs if r["action"] == "lr_cut"]
    return int(cuts[-1]) if cuts else 2


@pytest.mark.slow
def test_control_file_holds_one_human_cut(walkthrough: tuple[Path, str]) -> None:
    run_dir, _ = walkthrough
    factor = recommended_factor(run_dir)
    control = json.loads((run_dir / schema.CONTROL_FILENAME).read_text())
    [action] = control["actions"]
    assert action["action"] == "lr_cut"
    assert action["source"] == "human"
    assert action["factor"] == factor
    assert action["reason"]


@pytest.mark.slow
def test_ack_once_and_lr_divided(walkthrough: tuple[Path, str]) -> None:
    run_dir, _ = walkthrough
    factor = recommended_factor(run_dir)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    [ack] = acc.Scalars(schema.CONTROL_ACK)
    assert ack.value == 1.0  # the control file's only action
    lrs = acc.Scalars(schema.LR)
    before = [e for e in lrs if e.step < ack.step]
    after = [e for e in lrs if e.step >= ack.step]
    assert before and after
    # Uncut up to the resume, then the schedule divided by the factor from the ack onwards.
    assert all(math.isclose(e.value, scheduled_lr(e.step), rel_tol=1e-6) for e in before)
    assert all(math.isclose(e.value, scheduled_lr(e.step) / factor, rel_tol=1e-6) for e in after)
    assert math.isclose(after[0].value, before[-1].value / factor, rel_tol=1e-6)
    [cut] = {e.value for e in acc.Scalars(schema.LR_FACTOR)}
    assert cut == factor


@pytest.mark.slow
def test_report_and_tensorboard_hint(walkthrough: tuple[Path, str]) -> None:
    run_dir, stdout = walkthrough
    assert (run_dir / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert (run_dir / "report.html").stat().st_size > 0
    assert f"tensorboard --logdir {run_dir}" in stdout
    assert "lrwatch apply" in stdout
