"""DDP for real: two gloo processes under torchrun; only rank 0 writes, and writes the truth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_ddp_only_rank0_writes_and_its_values_match(tmp_path: Path) -> None:
    logdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        "--logdir",
        str(logdir),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    files = [f for f in logdir.iterdir() if "tfevents" in f.name]
    assert len(files) == 1  # rank 1 wrote nothing
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    expected = json.loads((tmp_path / "expected.json").read_text())
    for tag, values in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx({int(s): v for s, v in values.items()}, rel=1e-4), tag
