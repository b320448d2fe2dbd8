"""Issue 9, defects 2 and 3: every decision line, hook run and acknowledgement exactly once.

Restarts are real (a new WatchedRun reads state.json and the audit log from disk); the kills
themselves are in ``bench/chaos.py``, with a small deterministic subset in ``test_chaos.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_serve import RAILS, LossAbove, losses, write
from torch import nn

import lrwatch
from lrwatch import schema
from lrwatch.control import append_action
from lrwatch.daemon.notify import HookRunner
from lrwatch.daemon.outputs import read_audit
from lrwatch.daemon.watched_run import WatchedRun, run_once
from lrwatch.events.reader import read_run
from lrwatch.schema import ActionKind


def counting_hook(tmp_path: Path) -> Path:
    """A hook executable that appends the step of each decision it is run for to steps.txt."""
    hook = tmp_path / "hooks" / "count"
    hook.parent.mkdir()
    out = str(hook.parent / "steps.txt")
    body = f"step = json.load(sys.stdin)['step']\nopen({out!r}, 'a').write(f'{{step}}\\n')\n"
    hook.write_text(f"#!{sys.executable}\nimport json, sys\n{body}")
    hook.chmod(0o755)
    return hook


def once(run_dir: Path, mode: str, hook: Path) -> None:
    """One daemon life: start, one pass, stop (its hook runs end before it does)."""
    with HookRunner([hook]) as runner:
        run = WatchedRun(run_dir, analyzer_factory=LossAbove, mode=mode)  # type: ignore[arg-type]
        run_once(run, rails=RAILS, hooks=runner)
        run.close()


@pytest.mark.parametrize("mode", ["recommend", "apply"])
def test_a_rolled_back_state_repeats_no_decision_line_and_no_hook(
    tmp_path: Path, mode: str
) -> None:
    run_dir = tmp_path / "run"
    hook = counting_hook(tmp_path)
    write(run_dir, losses((1, 0.5)))
    once(run_dir, mode, hook)
    state = run_dir / schema.DAEMON_SUBRUN / "state.json"
    saved = state.read_bytes()
    write(run_dir, losses((2, 3.0), (3, 4.0)))
    once(run_dir, mode, hook)
    state.write_bytes(saved)  # as if killed after the lines, before the state reached disk
    once(run_dir, mode, hook)
    lines = [r["step"] for r in read_audit(run_dir) if r["event"] == "decision"]
    assert lines == [2, 3]
    assert sorted((hook.parent / "steps.txt").read_text().split()) == ["2", "3"]


def test_a_resumed_trainer_acknowledges_again_and_the_daemon_records_it_once(
    tmp_path: Path,
) -> None:
    """Defect 3: the applied record was saved, the ack never reached the event file."""
    run_dir = tmp_path / "run"
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = lrwatch.watch(model, opt, logdir=run_dir, control_every=1, log_every=1)
    cut = append_action(run_dir, action=ActionKind.LR_CUT, factor=2)
    mon.log(loss=1.0)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    checkpoint = mon.state_dict()
    mon.close()
    for f in run_dir.glob("*.lrwatch"):  # the kill: nothing of this process's events remains
        f.unlink()
    model2 = nn.Linear(4, 1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    with lrwatch.watch(model2, opt2, logdir=run_dir, control_every=1, log_every=1) as resumed:
        resumed.load_state_dict(checkpoint)
        for _ in range(2):
            model2(torch.ones(2, 4)).sum().backward()
            opt2.step()
    acks = [s for s in read_run(run_dir) if s.tag == schema.CONTROL_ACK]
    assert [(int(s.value), s.step) for s in acks] == [(cut.id, 2)]
    assert opt2.param_groups[0]["lr"] == 0.1  # the scheduler's own value, between steps
    run = WatchedRun(run_dir, analyzer_factory=LossAbove, mode="apply")
    run_once(run, rails=RAILS)
    run.close()
    again = WatchedRun(run_dir, analyzer_factory=LossAbove, mode="apply")
    run_once(again, rails=RAILS)
    again.close()
    ack_lines = [r["action_id"] for r in read_audit(run_dir) if r["event"] == "acknowledged"]
    assert ack_lines == [cut.id]


def test_temporary_files_left_by_killed_writers_are_removed(tmp_path: Path) -> None:
    """A SIGKILL between a temporary file and its rename leaves the temporary behind."""
    from lrwatch.hook.controller import Controller

    leftovers = [
        tmp_path / f".{schema.CONTROL_FILENAME}.abc123.tmp",
        tmp_path / f".{schema.APPLIED_FILENAME}.abc123.tmp",
        tmp_path / schema.DAEMON_SUBRUN / ".state.json.abc123",
    ]
    leftovers[-1].parent.mkdir()
    for path in leftovers:
        path.write_text("{")
    write(tmp_path, losses((1, 0.5)))
    WatchedRun(tmp_path, analyzer_factory=LossAbove, mode="apply").close()
    Controller(tmp_path)
    append_action(tmp_path, action=ActionKind.STOP)
    assert [p for p in leftovers if p.exists()] == []
