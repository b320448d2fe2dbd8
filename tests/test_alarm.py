"""Alarm-level rows reach the disk at once; ordinary ones wait for ``flush_secs``.

Read back with TensorBoard's own loader while the monitor is still open, so what counts is what
a daemon tailing the file could see at that moment.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import lrwatch
from lrwatch import schema
from lrwatch.hook.alarm import RATIO, Alarm


def on_disk(run_dir: Path) -> dict[str, dict[int, float]]:
    files = list(run_dir.glob("*.lrwatch"))
    if not files:
        return {}
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def wait_for(run_dir: Path, tag: str, step: int, timeout: float = 5.0) -> dict[int, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = on_disk(run_dir).get(tag, {})
        if step in got:
            return got
        time.sleep(0.02)  # polling a condition with a bound
    return on_disk(run_dir).get(tag, {})


def test_a_nonfinite_step_reaches_the_disk_at_once_and_healthy_ones_wait(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, crit = nn.Linear(4, 2), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    mon = lrwatch.watch(model, opt, logdir=tmp_path, criterion=crit, flush_secs=3600, control=False)
    try:
        for _ in range(20):
            crit(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        assert mon._recorder is not None and mon._recorder.writer.flush()  # all it was handed
        assert 20 not in on_disk(tmp_path).get(schema.LOSS, {})  # healthy: waits for flush_secs
        bad = x.clone()
        bad[0, 0] = math.nan
        crit(model(bad), y).backward()  # step 21: a non-finite loss and gradient
        opt.step()
        opt.zero_grad()
        crit(model(x), y).backward()  # step 22: its rows show that step 21 is complete
        opt.step()
        opt.zero_grad()
        got = wait_for(tmp_path, schema.LOSS, 22)
        assert 21 in got and math.isnan(got[21])
        assert set(range(1, 23)) <= set(got)  # every row before it, in order
        assert 22 in wait_for(tmp_path, schema.LR, 22)  # the row that closes step 21
    finally:
        mon.close()


def test_alarm_rule_on_the_host() -> None:
    a = Alarm()
    one = torch.tensor(1.0)
    assert not any(a.check(one, torch.tensor(1.0 + 0.01 * i)) for i in range(40))
    assert a.check(one, torch.tensor(RATIO * 1.2))  # a spike against the median of ~1.2
    assert not a.check(one, torch.tensor(3.0))
    assert a.check(torch.tensor(math.inf), None)
    assert not a.check(None, None)
