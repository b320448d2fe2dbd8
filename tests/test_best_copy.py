"""A stop that ends the run on the weights of its best validation loss (restore_best_weights).

The oracle is the test's own record: a deep copy of the model at every validation, taken outside
lrwatch, and the running minimum of the validation losses it computed itself. The hook must mark
exactly the steps where that minimum fell (read back with TensorBoard's own loader), and a stop
naming one of them must leave the model equal to the record of that step. On the daemon side, a
stop decision names the newest mark at or before its step, and only for a validation loss.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import lrwatch
from lrwatch import schema
from lrwatch.analysis.analyzer import analyze_run
from lrwatch.analysis.config import AnalyzerConfig
from lrwatch.analysis.kept_best import KeptBest
from lrwatch.control import append_action, decode_control
from lrwatch.errors import ControlFileError
from lrwatch.schema import ActionKind, Decision, Scalar

VAL_EVERY = 5


def overfitting_run(
    tmp_path: Path,
    steps: int,
    *,
    stop_at: int | None = None,
    to_step: int | None = None,
    **watch: object,
) -> tuple[nn.Module, dict[int, dict], list[tuple[int, float]], lrwatch.Monitor]:
    """A wide MLP on 24 noisy points of a linear map: validation falls, then turns up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 1))
    w = torch.randn(4, 1)
    x = torch.randn(24, 4)
    y = x @ w + 0.7 * torch.randn(24, 1)
    vx = torch.randn(64, 4)
    vy = vx @ w + 0.7 * torch.randn(64, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    crit = nn.MSELoss()
    record: dict[int, dict] = {}
    vals: list[tuple[int, float]] = []
    with lrwatch.watch(
        model, opt, logdir=tmp_path, criterion=crit, control_every=1, **watch
    ) as mon:
        for step in range(1, steps + 1):
            if step == stop_at:
                append_action(tmp_path, action=ActionKind.STOP, to_step=to_step)
            crit(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if mon.should_stop:
                break
            if step % VAL_EVERY == 0:
                with torch.no_grad():
                    val = crit(model(vx), vy)
                record[step] = copy.deepcopy(model.state_dict())
                vals.append((step, float(val)))
                mon.log(**{"val/loss": val})  # a tensor: the hook reads it once
    return model, record, vals, mon


def running_minima(vals: list[tuple[int, float]]) -> list[int]:
    out, best = [], math.inf
    for step, v in vals:
        if v < best:
            out.append(step)
            best = v
    return out


def marks(run_dir: Path) -> list[int]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if schema.KEPT_BEST not in acc.Tags()["scalars"]:
        return []
    return [e.step for e in acc.Scalars(schema.KEPT_BEST)]


def assert_state(model: nn.Module, want: dict) -> None:
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0)


def test_the_hook_marks_every_new_best_validation_loss(tmp_path: Path) -> None:
    _, _, vals, _ = overfitting_run(tmp_path, 120)
    minima = running_minima(vals)
    assert len(minima) >= 3 and minima[-1] < vals[-1][0]  # it improved, then turned up
    assert marks(tmp_path) == minima


def test_a_stop_naming_the_best_step_ends_on_those_weights(tmp_path: Path) -> None:
    _, _, vals, _ = overfitting_run(tmp_path / "ref", 100)
    best = running_minima(vals)[-1]
    model, record, _, mon = overfitting_run(tmp_path / "run", 200, stop_at=101, to_step=best)
    assert mon.should_stop and mon.step == 101
    assert_state(model, record[best])  # and step 101's update was not applied on top


def test_a_stop_naming_a_copy_no_longer_held_stops_on_the_current_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, vals, _ = overfitting_run(tmp_path / "ref", 100)
    first, best = running_minima(vals)[0], running_minima(vals)[-1]
    assert first != best
    with caplog.at_level(logging.WARNING, logger="lrwatch"):
        model, record, _, mon = overfitting_run(tmp_path / "run", 200, stop_at=101, to_step=first)
    assert mon.should_stop
    assert any("no longer holds them" in r.getMessage() for r in caplog.records)
    with pytest.raises(AssertionError):
        assert_state(model, record[first])
    with pytest.raises(AssertionError):  # step 101 did its update: not the step-100 record
        assert_state(model, record[100])


def test_without_copies_nothing_is_marked(tmp_path: Path) -> None:
    overfitting_run(tmp_path, 60, rollback=False)
    assert marks(tmp_path) == []


def test_a_stop_may_name_a_step_and_other_kinds_still_may_not() -> None:
    def doc(**entry: object) -> bytes:
        import json

        return json.dumps({"version": 1, "actions": [{"id": 1, **entry}]}).encode()

    assert decode_control(doc(action="stop", to_step=40)).actions[0].to_step == 40
    assert decode_control(doc(action="stop")).actions[0].to_step is None
    for bad in (-1, 1.5, "40", True):
        with pytest.raises(ControlFileError, match="to_step"):
            decode_control(doc(action="stop", to_step=bad))
    with pytest.raises(ControlFileError, match="to_step does not belong"):
        decode_control(doc(action="lr_cut", factor=2, to_step=40))


def stop_at(step: int) -> Decision:
    return Decision(step, ActionKind.STOP, "Overfitting.")


def test_a_stop_names_the_newest_mark_at_or_before_it() -> None:
    kept = KeptBest()
    kept.note([Scalar(schema.KEPT_BEST, s, 0.0, v) for s, v in [(40, 0.5), (10, 0.9), (80, 0.4)]])
    kept.note([Scalar("val/loss", 90, 0.0, 0.3)])  # not a mark
    assert kept.on_stop(stop_at(79), "val/loss").to_step == 40
    named = kept.on_stop(stop_at(200), "val/loss")
    assert named.to_step == 80 and "step 80 (val/loss 0.4," in named.reason
    assert kept.on_stop(stop_at(5), "val/loss").to_step is None  # no mark that old
    assert kept.on_stop(stop_at(200), "val/acc").to_step is None  # the copy is not by that
    assert kept.on_stop(stop_at(200), None).to_step is None
    cut = Decision(200, ActionKind.LR_CUT, "x", factor=2)
    assert kept.on_stop(cut, "val/loss") is cut
    again = KeptBest()
    again.load_state(kept.state())
    assert again.on_stop(stop_at(79), "val/loss").to_step == 40
    old = KeptBest()
    old.load_state(None)  # an analyzer state saved before best copies existed
    assert old.on_stop(stop_at(200), "val/loss").to_step is None


def test_the_analyzer_names_the_hooks_best_copy_in_an_overfitting_stop(tmp_path: Path) -> None:
    """The real hook's event file, read back by the analyzer: the overfitting stop it decides
    names the last step at which the test's own running minimum fell before that stop."""
    _, _, vals, _ = overfitting_run(tmp_path, 400)
    result = analyze_run(tmp_path, AnalyzerConfig())
    stops = [d for d in result.decisions if d.action is ActionKind.STOP]
    assert stops, [d.reason for d in result.decisions]
    want = [s for s in running_minima(vals) if s <= stops[0].step][-1]
    assert stops[0].to_step == want


def test_apply_stop_best_names_the_newest_marked_step(tmp_path: Path) -> None:
    """``lrwatch apply --stop --best``: the human's way to the same stop."""
    from click.testing import CliRunner

    from lrwatch.cli import main
    from lrwatch.control import read_control

    _, _, vals, _ = overfitting_run(tmp_path / "marked", 120)
    res = CliRunner().invoke(main, ["apply", str(tmp_path / "marked"), "--stop", "--best"])
    assert res.exit_code == 0, res.output
    (action,) = read_control(tmp_path / "marked" / schema.CONTROL_FILENAME).actions
    assert action.action is ActionKind.STOP and action.to_step == running_minima(vals)[-1]

    overfitting_run(tmp_path / "unmarked", 20, rollback=False)
    res = CliRunner().invoke(main, ["apply", str(tmp_path / "unmarked"), "--stop", "--best"])
    assert res.exit_code == 2 and "marks no best-weights copy" in res.output
    res = CliRunner().invoke(main, ["apply", str(tmp_path / "marked"), "--lr-cut", "2", "--best"])
    assert res.exit_code == 2 and "--best goes with --stop" in res.output
