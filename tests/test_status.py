"""``lrwatch status`` on real runs written by ``lrwatch.watch``, with real control files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import train

from lrwatch import schema
from lrwatch.cli import main
from lrwatch.control import append_action
from lrwatch.schema import ActionKind
from lrwatch.views.status import RunStatus, collect_status, format_status, run_status

JSON_KEYS = set(RunStatus.__dataclass_fields__)


def _last_scalar(run_dir: Path, tag: str) -> tuple[int, float, float]:
    """(step, value, wall_time) of the last ``tag`` point, read by TensorBoard itself."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    last = max(acc.Scalars(tag), key=lambda e: e.step)
    return last.step, last.value, last.wall_time


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four runs: healthy, cut by 2 (acknowledged), stopped, diverging."""
    root = tmp_path_factory.mktemp("status")
    train(root / "healthy")
    (root / "cut").mkdir()
    append_action(root / "cut", action=ActionKind.LR_CUT, factor=2, reason="test cut")
    train(root / "cut")
    (root / "stop").mkdir()
    append_action(root / "stop", action=ActionKind.STOP, reason="test stop")
    train(root / "stop")
    train(root / "blow", blow_at=40)
    return root


def _now(run_dir: Path) -> float:
    return _last_scalar(run_dir, schema.LOSS)[2] + 1.0


def test_status_of_a_healthy_run_should_be_ok_with_the_logged_lr(logdir: Path) -> None:
    run = logdir / "healthy"
    s = run_status(run, now=_now(run))
    step, lr, _ = _last_scalar(run, schema.LR)
    assert s.health == "ok"
    assert s.lr == pytest.approx(lr) and s.lr == pytest.approx(0.05)
    assert s.last_step == step == 60
    assert s.acknowledged is None and s.pending_actions == ()


def test_status_should_show_an_acknowledged_cut_and_the_cumulative_factor(logdir: Path) -> None:
    run = logdir / "cut"
    s = run_status(run, now=_now(run))
    assert s.health == "ok"
    assert s.lr_factor == pytest.approx(_last_scalar(run, schema.LR_FACTOR)[1]) == 2.0
    assert s.lr == pytest.approx(0.025)
    assert s.last_decision == "lr_cut /2 #1 (human)" and s.acknowledged is True


def test_status_should_be_acting_while_an_issued_action_is_not_acknowledged(
    logdir: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "healthy"
    shutil.copytree(logdir / "healthy", run)
    append_action(run, action=ActionKind.CLIP, max_norm=1.5, reason="pending")
    s = run_status(run, now=_now(run))
    assert s.health == "acting"
    assert s.pending_actions == (1,)
    assert s.last_decision == "clip max_norm=1.5 #1 (human)" and s.acknowledged is False


def test_status_should_be_stopped_after_an_applied_stop(logdir: Path) -> None:
    run = logdir / "stop"
    s = run_status(run, now=_now(run))
    assert s.health == "stopped"
    assert s.last_step is not None and s.last_step < 60  # the loop broke off early


def test_status_should_warn_on_a_diverging_run(logdir: Path) -> None:
    run = logdir / "blow"
    s = run_status(run, now=_now(run))
    assert s.health == "warning"
    assert s.last_finding is not None and s.last_finding_step is not None
    assert s.last_finding_step >= 40
    assert s.last_decision is not None and s.last_decision.endswith("(advice)")
    assert s.lr == pytest.approx(3.0)


def test_status_should_say_ended_for_a_cleanly_closed_run_however_old(logdir: Path) -> None:
    run = logdir / "healthy"  # the trainer's `with lrwatch.watch(...)` closed the monitor
    assert run_status(run, now=_now(run) + 1e6, stale_after=50).health == "ended"


def test_status_should_be_stale_when_no_event_arrived_for_too_long_and_no_close(
    tmp_path: Path,
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "hung"  # events but no clean close of lrwatch's monitor: hung or killed
    with SummaryWriter(str(run)) as w:
        for step in range(30):
            w.add_scalar("train/loss", 1.0 / (step + 1), step)
    last = _last_scalar(run, "train/loss")[2]
    assert run_status(run, now=last + 100, stale_after=50).health == "stale"
    assert run_status(run, now=last + 10, stale_after=50).health == "ok"


def test_status_table_should_have_one_aligned_line_per_run(logdir: Path) -> None:
    statuses = collect_status(logdir, now=_now(logdir / "blow"))
    assert [Path(s.run).name for s in statuses] == ["blow", "cut", "healthy", "stop"]
    lines = format_status(statuses, logdir=logdir).splitlines()
    assert len(lines) == 5
    column = lines[0].index("HEALTH")
    assert [line[column:].split()[0] for line in lines[1:]] == [s.health for s in statuses]


def test_status_cli_json_should_be_a_stable_list_of_objects(logdir: Path) -> None:
    result = CliRunner().invoke(main, ["status", str(logdir), "--json", "--stale-after", "1e9"])
    assert result.exit_code == 0, result.output
    docs = json.loads(result.output)
    assert [Path(d["run"]).name for d in docs] == ["blow", "cut", "healthy", "stop"]
    assert all(set(d) == JSON_KEYS for d in docs)
    assert [d["health"] for d in docs] == ["warning", "ok", "ok", "stopped"]


def test_status_cli_should_fail_cleanly_on_a_missing_logdir(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output
