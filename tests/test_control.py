"""The control file (strict reader, atomic locked writer) and its application by the hook."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from lrwatch import control as control_mod
from lrwatch.cli import main
from lrwatch.control import MAX_CONTROL_BYTES, append_action, read_control
from lrwatch.errors import ConfigError, ControlFileError, RunGone
from lrwatch.hook import controller as controller_mod
from lrwatch.hook.controller import Controller, lr_charts_logger
from lrwatch.schema import APPLIED_FILENAME, CONTROL_FILENAME, ActionKind

CUT, CLIP, STOP, UNDO = ActionKind.LR_CUT, ActionKind.CLIP, ActionKind.STOP, ActionKind.UNDO
GRAD = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
REPO = Path(__file__).resolve().parents[1]


def sgd(lr: float = 0.1) -> torch.optim.SGD:
    """SGD without momentum: the step is exactly -lr * grad, so the LR used can be read back."""
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))], lr=lr)


def train(
    opt: torch.optim.Optimizer,
    ctl: Controller | None,
    steps: int,
    *,
    before: Callable[[int], None] = lambda step: None,
    after: Callable[[int], None] = lambda step: None,
) -> list[float]:
    """Run ``steps`` steps; return the LR each optimizer step really used (from the update)."""
    p = opt.param_groups[0]["params"][0]
    used = []
    for step in range(steps):
        before(step)
        p.grad = GRAD.clone()
        theta = p.detach().clone()
        if ctl is not None:
            ctl.before_step(opt, step)
        opt.step()
        if ctl is not None:
            ctl.after_step(opt)
        used.append(float(((theta - p.detach()) / GRAD).mean()))
        after(step)
    return used


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name != lr_charts_logger.name  # not a failure
    ]


# ---------------------------------------------------------------------------- reader / writer
def test_append_action_assigns_increasing_ids_the_reader_accepts(tmp_path: Path) -> None:
    a = append_action(tmp_path, action=CUT, factor=2, reason="plateau", source="daemon")
    b = append_action(tmp_path, action=CLIP, max_norm=1.5)
    c = append_action(tmp_path, action=UNDO, target=a.id)
    d = append_action(tmp_path, action=STOP)
    assert [x.id for x in (a, b, c, d)] == [1, 2, 3, 4]
    assert read_control(tmp_path / CONTROL_FILENAME).actions == (a, b, c, d)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_append_action_replaces_the_file_instead_of_writing_in_place(tmp_path: Path) -> None:
    append_action(tmp_path, action=CUT, factor=2)
    inode = (tmp_path / CONTROL_FILENAME).stat().st_ino
    append_action(tmp_path, action=CUT, factor=5)
    assert (tmp_path / CONTROL_FILENAME).stat().st_ino != inode


def test_append_action_leaves_the_old_file_when_the_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    append_action(tmp_path, action=CUT, factor=2)
    before = (tmp_path / CONTROL_FILENAME).read_bytes()

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(control_mod.os, "replace", broken_replace)
    with pytest.raises(OSError):
        append_action(tmp_path, action=STOP)
    assert (tmp_path / CONTROL_FILENAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": CUT, "factor": 3}, "factor"),
        ({"action": CUT}, "factor"),
        ({"action": CLIP, "max_norm": float("nan")}, "max_norm"),
        ({"action": CLIP, "max_norm": -1.0}, "max_norm"),
        ({"action": UNDO, "target": 99}, "target"),
        ({"action": STOP, "factor": 2}, "does not belong"),
        ({"action": ActionKind.RAISE_LR_ADVICE}, "unknown action"),
        ({"action": ActionKind.ROLLBACK}, "to_step"),
        ({"action": ActionKind.ROLLBACK, "to_step": -1}, "to_step"),
        ({"action": CUT, "factor": 2, "to_step": 5}, "does not belong"),
    ],
    ids=["factor-3", "no-factor", "nan-norm", "negative-norm", "unknown-target", "stray-field",
         "advice-only", "rollback-nowhere", "rollback-negative", "cut-with-to-step"],
)  # fmt: skip
def test_append_action_refuses_an_invalid_action(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        append_action(tmp_path, **kwargs)
    assert not (tmp_path / CONTROL_FILENAME).exists()


def test_append_action_refuses_undoing_twice(tmp_path: Path) -> None:
    cut = append_action(tmp_path, action=CUT, factor=2)
    append_action(tmp_path, action=UNDO, target=cut.id)
    with pytest.raises(ConfigError, match="already undone"):
        append_action(tmp_path, action=UNDO, target=cut.id)


def test_append_action_refuses_a_missing_run_dir_and_a_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(RunGone):
        append_action(tmp_path / "nope", action=STOP)
    (tmp_path / CONTROL_FILENAME).write_text("{oops")
    with pytest.raises(ControlFileError, match="not valid JSON"):
        append_action(tmp_path, action=STOP)
    assert (tmp_path / CONTROL_FILENAME).read_text() == "{oops"


APPENDER = """
import sys
from pathlib import Path
from lrwatch.control import append_action
from lrwatch.schema import ActionKind
print("ready", flush=True)
sys.stdin.readline()  # the parent's go: both writers start together
for i in range(int(sys.argv[3])):
    append_action(Path(sys.argv[1]), action=ActionKind.STOP, reason=f"{sys.argv[2]}-{i}")
"""


@pytest.mark.slow
def test_append_action_gives_unique_increasing_ids_to_concurrent_writers(tmp_path: Path) -> None:
    n = 40
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(tmp_path), who, str(n)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for who in ("daemon", "human")
    ]
    for p in procs:  # readline blocks until the child is ready (or exits, giving "")
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.close()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for p in procs:
        assert p.stdout is not None
        p.stdout.close()
    actions = read_control(tmp_path / CONTROL_FILENAME).actions
    assert [a.id for a in actions] == list(range(1, 2 * n + 1))
    reasons = {a.reason for a in actions}
    assert reasons == {f"{who}-{i}" for who in ("daemon", "human") for i in range(n)}


# ---------------------------------------------------------------------------- hostile input
def _doc(*actions: dict[str, Any], version: Any = 1) -> str:
    return json.dumps({"version": version, "run": "r", "actions": list(actions)})


HOSTILE: dict[str, str | bytes] = {
    "half-written": '{"version": 1, "actions": [{"id": 1, "action": "lr_cut", "fac',
    "not-utf8": b"\xff\xfe\x00garbage",
    "top-level-list": "[]",
    "no-actions": '{"version": 1}',
    "unknown-action": _doc({"id": 1, "action": "delete_checkpoints"}),
    "action-not-a-word": _doc({"id": 1, "action": ["lr_cut"]}),
    "advice-is-not-an-action": _doc({"id": 1, "action": "raise_lr_advice"}),
    "factor-3": _doc({"id": 1, "action": "lr_cut", "factor": 3}),
    "factor-string": _doc({"id": 1, "action": "lr_cut", "factor": "2"}),
    "factor-float": _doc({"id": 1, "action": "lr_cut", "factor": 2.0}),
    "factor-bool": _doc({"id": 1, "action": "lr_cut", "factor": True}),
    "nan-norm": '{"version": 1, "actions": [{"id": 1, "action": "clip", "max_norm": NaN}]}',
    "inf-norm": '{"version": 1, "actions": [{"id": 1, "action": "clip", "max_norm": Infinity}]}',
    "negative-norm": _doc({"id": 1, "action": "clip", "max_norm": -1.0}),
    "zero-norm": _doc({"id": 1, "action": "clip", "max_norm": 0}),
    "negative-id": _doc({"id": -1, "action": "stop"}),
    "string-id": _doc({"id": "1", "action": "stop"}),
    "duplicate-ids": _doc({"id": 1, "action": "stop"}, {"id": 1, "action": "stop"}),
    "decreasing-ids": _doc({"id": 2, "action": "stop"}, {"id": 1, "action": "stop"}),
    "newer-version": _doc({"id": 1, "action": "stop"}, version=2),
    "no-version": '{"actions": []}',
    "undo-unknown": _doc({"id": 1, "action": "undo", "target": 7}),
    "undo-a-stop": _doc({"id": 1, "action": "stop"}, {"id": 2, "action": "undo", "target": 1}),
    "stray-field": _doc({"id": 1, "action": "stop", "factor": 2}),
    "rollback-bool": _doc({"id": 1, "action": "rollback", "to_step": True}),
    "rollback-float": _doc({"id": 1, "action": "rollback", "to_step": 5.0}),
    "rollback-huge": _doc({"id": 1, "action": "rollback", "to_step": 10**400}),
    "negative-time": _doc({"id": 1, "action": "stop", "issued_at": -5}),
    "reason-not-text": _doc({"id": 1, "action": "stop", "reason": ["x"]}),
    "deep-nesting": "[" * 200_000,
    "huge": _doc({"id": 1, "action": "stop", "reason": "x" * MAX_CONTROL_BYTES}),
}


@pytest.mark.parametrize("content", HOSTILE.values(), ids=HOSTILE.keys())
def test_controller_refuses_a_hostile_file_once_and_training_continues(
    tmp_path: Path, content: str | bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / CONTROL_FILENAME
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ControlFileError):
        read_control(path)
    ctl = Controller(tmp_path, check_every=1)
    used = train(sgd(0.1), ctl, 5)
    assert used == pytest.approx([0.1] * 5, rel=1e-12)
    assert (ctl.lr_factor, ctl.max_norm, ctl.should_stop, ctl.applied_ids) == (1.0, None, False, [])
    assert len(warnings_of(caplog)) == 1
    assert "refused" in warnings_of(caplog)[0]


def test_controller_refuses_a_symlink_and_a_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    real = tmp_path / "elsewhere.json"
    real.write_text(_doc({"id": 1, "action": "lr_cut", "factor": 10}))
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    run_a.mkdir()
    (run_b / CONTROL_FILENAME).mkdir(parents=True)
    (run_a / CONTROL_FILENAME).symlink_to(real)
    for run, why in ((run_a, "symlink"), (run_b, "regular file")):
        caplog.clear()
        ctl = Controller(run, check_every=1)
        assert train(sgd(0.1), ctl, 3) == pytest.approx([0.1] * 3, rel=1e-12)
        assert ctl.applied_ids == []
        assert len(warnings_of(caplog)) == 1 and why in warnings_of(caplog)[0]


def test_controller_applies_a_file_once_its_writer_finishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / CONTROL_FILENAME
    full = _doc({"id": 1, "action": "lr_cut", "factor": 2, "future_key": {"x": 1}}) + " "
    path.write_text(full[:20])  # an editor saving in place, caught half-way
    ctl = Controller(tmp_path, check_every=1)
    used = train(sgd(0.1), ctl, 6, before=lambda s: path.write_text(full) if s == 3 else None)
    assert used == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05], rel=1e-12)
    assert len(warnings_of(caplog)) == 1


def test_read_control_ignores_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / CONTROL_FILENAME
    doc = {"version": 1, "new_top": [1], "actions": [{"id": 3, "action": "stop", "why": "x"}]}
    path.write_text(json.dumps(doc))
    (action,) = read_control(path).actions
    assert (action.id, action.action) == (3, STOP)


def test_controller_never_raises_into_the_training_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    append_action(tmp_path, action=CUT, factor=2)
    opt = sgd(0.1)
    opt.param_groups[0]["lr"] = "not a number"
    ctl = Controller(tmp_path, check_every=1)
    for step in range(3):
        ctl.before_step(opt, step)
        ctl.after_step(opt)
    assert len(warnings_of(caplog)) == 1
    assert opt.param_groups[0]["lr"] == "not a number"


# ---------------------------------------------------------------------------- cost
def test_a_check_that_finds_nothing_new_is_one_stat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / CONTROL_FILENAME)
    calls: dict[str, int] = {"lstat": 0, "stat": 0, "open": 0}

    def counting(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(p: Any, *args: Any, **kwargs: Any) -> Any:
            calls[name] += os.fspath(p) == path if isinstance(p, str | os.PathLike) else 0
            return real(p, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(os, "lstat", counting("lstat", os.lstat))
    monkeypatch.setattr(os, "stat", counting("stat", os.stat))
    monkeypatch.setattr(os, "open", counting("open", os.open))
    monkeypatch.setattr(controller_mod, "LOOK_SECS", math.inf)  # step-count looks only
    ctl = Controller(tmp_path, check_every=10)
    train(sgd(), ctl, 30)  # no file yet: checks at steps 0, 10, 20
    assert calls == {"lstat": 3, "stat": 0, "open": 0}
    append_action(tmp_path, action=STOP)
    calls.update(lstat=0, stat=0, open=0)
    train(sgd(), ctl, 30)  # first check parses (lstat + open, then fstat), then one lstat each
    assert calls == {"lstat": 3, "stat": 0, "open": 1}


# ---------------------------------------------------------------------------- schedulers
def _plateau(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)


def _warmup_cosine(opt: torch.optim.Optimizer) -> Any:
    sched = torch.optim.lr_scheduler
    warm = sched.LinearLR(opt, start_factor=0.1, total_iters=5)
    return sched.SequentialLR(opt, [warm, sched.CosineAnnealingLR(opt, T_max=8)], milestones=[5])


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "none": lambda opt: None,
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=30),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)),
    "ReduceLROnPlateau": _plateau,
    "LinearLR+SequentialLR": _warmup_cosine,
}
# Cut by 2 at step 4, by 5 at step 9 (compounds to 10), undo the first at 14 (back to 5).
EXPECTED_FACTOR = [1.0] * 4 + [2.0] * 5 + [10.0] * 5 + [5.0] * 6


@pytest.mark.parametrize("make", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_lr_cut_divides_the_schedulers_own_lr_from_then_on(
    tmp_path: Path, make: Callable[[torch.optim.Optimizer], Any]
) -> None:
    def run(ctl: Controller | None) -> list[float]:
        opt = sgd(0.1)
        sched = make(opt)

        def issue(step: int) -> None:
            if ctl is None:
                return
            if step == 4:
                append_action(tmp_path, action=CUT, factor=2)
            elif step == 9:
                append_action(tmp_path, action=CUT, factor=5)
            elif step == 14:
                append_action(tmp_path, action=UNDO, target=1)

        def step_scheduler(step: int) -> None:
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(1.0)  # a flat metric: the plateau rule fires on its own schedule
            elif sched is not None:
                sched.step()

        return train(opt, ctl, len(EXPECTED_FACTOR), before=issue, after=step_scheduler)

    reference = run(None)
    assert len(set(reference)) > 1 or make is SCHEDULERS["none"]
    with_cuts = run(Controller(tmp_path, check_every=1))
    expected = [lr / f for lr, f in zip(reference, EXPECTED_FACTOR, strict=True)]
    assert with_cuts == pytest.approx(expected, rel=1e-9)


def test_a_step_that_raised_does_not_divide_the_lr_twice(tmp_path: Path) -> None:
    append_action(tmp_path, action=CUT, factor=2)
    opt = sgd(0.1)
    ctl = Controller(tmp_path, check_every=1)
    ctl.before_step(opt, 0)  # optimizer.step raises here: no after_step
    ctl.before_step(opt, 1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    ctl.after_step(opt)
    assert opt.param_groups[0]["lr"] == 0.1


def test_lr_cut_stops_at_min_lr_and_never_raises_an_lr(tmp_path: Path) -> None:
    append_action(tmp_path, action=CUT, factor=10)
    opt = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.1},
            {"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.001},
        ]
    )
    ctl = Controller(tmp_path, check_every=1, min_lr=0.02)
    ctl.before_step(opt, 0)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.001]
    ctl.after_step(opt)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.001]


def test_lr_cut_keeps_a_tensor_lr_a_tensor(tmp_path: Path) -> None:
    append_action(tmp_path, action=CUT, factor=5)
    lr = torch.tensor(0.1)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], lr=lr)
    ctl = Controller(tmp_path, check_every=1)
    ctl.before_step(opt, 0)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.02)
    ctl.after_step(opt)
    assert opt.param_groups[0]["lr"] is lr


# ---------------------------------------------------------------------------- clip and stop
def test_clip_matches_clip_grad_norm_and_undo_clears_it(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # a frozen parameter has no grad
    model(torch.randn(16, 4)).pow(2).sum().backward()
    reference = [
        torch.nn.Parameter(p.detach().clone()) for p in model.parameters() if p.grad is not None
    ]
    for ref, p in zip(
        reference, [p for p in model.parameters() if p.grad is not None], strict=True
    ):
        ref.grad = p.grad.clone()
    total = torch.nn.utils.clip_grad_norm_(reference, 0.5)  # clips the copies' grads in place
    assert total > 0.5
    clip = append_action(tmp_path, action=CLIP, max_norm=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = Controller(tmp_path, check_every=1)
    ctl.before_step(opt, 0)
    assert ctl.max_norm == 0.5 and ctl.preclip_norm is not None
    torch.testing.assert_close(ctl.preclip_norm, total)
    for got, want in zip(
        [p.grad for p in model.parameters() if p.grad is not None], reference, strict=True
    ):
        torch.testing.assert_close(got, want.grad)
    ctl.after_step(opt)
    append_action(tmp_path, action=UNDO, target=clip.id)
    ctl.before_step(opt, 1)
    assert (ctl.max_norm, ctl.preclip_norm) == (None, None)


def test_stop_sets_should_stop_and_is_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller_mod, "LOOK_SECS", math.inf)  # step-count looks only
    ctl = Controller(tmp_path, check_every=2)
    opt = sgd()
    assert ctl.before_step(opt, 0) == []
    stop = append_action(tmp_path, action=STOP, reason="diverged")
    assert ctl.before_step(opt, 1) == []  # not a check step
    assert ctl.before_step(opt, 2) == [stop]
    assert ctl.should_stop
    assert ctl.before_step(opt, 4) == []


# ---------------------------------------------------------------------------- exactly once
def test_a_new_run_in_an_old_directory_inherits_nothing_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 9: a fresh watch() (no state loaded) is a new run, not the old one restarted."""
    first = Controller(tmp_path, check_every=1)
    append_action(tmp_path, action=CUT, factor=5)
    append_action(tmp_path, action=CLIP, max_norm=3.0)
    assert len(first.before_step(sgd(), 0)) == 2
    second = Controller(tmp_path, check_every=1)  # a new training run in the same directory
    opt = sgd(0.1)
    assert second.before_step(opt, 0) == []
    assert opt.param_groups[0]["lr"] == 0.1  # the old run's cut by 5 is not inherited
    assert (second.lr_factor, second.max_norm) == (1.0, None)
    second.after_step(opt)
    assert any("belong to run" in m for m in warnings_of(caplog))
    cut = append_action(tmp_path, action=CUT, factor=2)  # written for the new run
    assert second.before_step(opt, 1) == [cut]
    assert second.lr_factor == 2.0
    saved = json.loads((tmp_path / APPLIED_FILENAME).read_text())
    assert saved["applied_ids"] == [3] and saved["base"] == 2


def test_a_resumed_run_keeps_what_it_applied_and_acknowledges_it_again(tmp_path: Path) -> None:
    first = Controller(tmp_path, check_every=1)
    append_action(tmp_path, action=CUT, factor=2)
    append_action(tmp_path, action=CLIP, max_norm=3.0)
    first.before_step(sgd(), 0)
    checkpoint = json.loads(json.dumps(first.state_dict()))
    resumed = Controller(tmp_path, check_every=1)
    resumed.load_state_dict(checkpoint)
    opt = sgd(0.1)
    assert resumed.before_step(opt, 0) == []
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert resumed.take_reacks() == [1, 2]  # the ack may not have reached the disk
    assert resumed.take_reacks() == []


def test_state_dict_round_trips_and_resumes_without_reapplying(tmp_path: Path) -> None:
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    run_a.mkdir()
    run_b.mkdir()
    cut = append_action(run_a, action=CUT, factor=2)
    append_action(run_a, action=STOP)
    append_action(run_a, action=UNDO, target=cut.id)
    append_action(run_a, action=CLIP, max_norm=0.25)
    ctl = Controller(run_a, check_every=1)
    ctl.before_step(sgd(), 0)
    state = json.loads(json.dumps(ctl.state_dict()))  # survives a JSON/torch.save checkpoint
    (run_b / CONTROL_FILENAME).write_bytes((run_a / CONTROL_FILENAME).read_bytes())
    resumed = Controller(run_b, check_every=1)  # no applied file: only the checkpoint knows
    resumed.load_state_dict(state)
    assert resumed.state_dict() == ctl.state_dict()
    assert resumed.before_step(sgd(), 0) == []
    assert (resumed.lr_factor, resumed.max_norm, resumed.should_stop) == (1.0, 0.25, True)


def test_load_state_dict_keeps_newer_knowledge_from_the_run_dir(tmp_path: Path) -> None:
    ctl = Controller(tmp_path, check_every=1)
    append_action(tmp_path, action=CUT, factor=2)
    ctl.before_step(sgd(), 0)
    old_checkpoint = ctl.state_dict()
    append_action(tmp_path, action=CUT, factor=5)
    ctl.before_step(sgd(), 1)
    resumed = Controller(tmp_path, check_every=1)  # reloads the run dir's record: both cuts
    resumed.load_state_dict(old_checkpoint)
    assert resumed.before_step(sgd(), 0) == []
    assert resumed.lr_factor == 10.0


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"version": 1, "applied_ids": [2, 1], "cuts": [], "clips": [], "stop": False},
        {"version": 1, "applied_ids": [1], "cuts": [[1, 3]], "clips": [], "stop": False},
        {"version": 1, "applied_ids": [1], "cuts": [], "clips": [[1, float("nan")]], "stop": False},
    ],
    ids=["empty", "unsorted-ids", "factor-3", "nan-clip"],
)
def test_load_state_dict_refuses_a_malformed_state(state: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Controller(None).load_state_dict(state)


def test_controller_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match="check_every"):
        Controller(None, check_every=0)
    with pytest.raises(ConfigError, match="min_lr"):
        Controller(None, min_lr=float("nan"))


# ---------------------------------------------------------------------------- the CLI
def _a_run(run_dir: Path) -> Path:
    """``apply`` needs a run (a directory with an event file), as a started trainer leaves."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir)) as w:
        w.add_scalar("loss", 1.0, 0)
    return run_dir


def test_apply_writes_each_action_and_prints_it(tmp_path: Path) -> None:
    _a_run(tmp_path)
    runner = CliRunner()
    out = [runner.invoke(main, ["apply", str(tmp_path), *args]) for args in (
        ["--lr-cut", "5", "--reason", "plateau"], ["--clip", "1.0"], ["--undo", "1"],
        ["--rollback", "40"], ["--stop"],
    )]  # fmt: skip
    assert [r.exit_code for r in out] == [0, 0, 0, 0, 0], [r.output for r in out]
    printed = [json.loads(r.output) for r in out]
    assert [(d["id"], d["action"]) for d in printed] == [
        (1, "lr_cut"), (2, "clip"), (3, "undo"), (4, "rollback"), (5, "stop")
    ]  # fmt: skip
    assert printed[3]["to_step"] == 40
    assert printed[0]["factor"] == 5 and printed[0]["reason"] == "plateau"
    assert [a.to_json() for a in read_control(tmp_path / CONTROL_FILENAME).actions] == printed


@pytest.mark.parametrize(
    "args",
    [
        ["--lr-cut", "3"],
        ["--lr-cut", "two"],
        ["--clip", "nan"],
        ["--clip", "-1"],
        ["--clip", "inf"],
        ["--undo", "0"],
        ["--undo", "42"],
        [],
        ["--stop", "--lr-cut", "2"],
    ],
    ids=["factor-3", "factor-word", "nan", "negative", "inf", "undo-0", "undo-unknown", "none",
         "two-actions"],
)  # fmt: skip
def test_apply_refuses_bad_values_with_exit_code_2(tmp_path: Path, args: list[str]) -> None:
    _a_run(tmp_path)
    result = CliRunner().invoke(main, ["apply", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / CONTROL_FILENAME).exists()


def test_apply_on_a_missing_run_dir_fails_with_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["apply", str(tmp_path / "gone"), "--stop"])
    assert result.exit_code == 2  # a path that is not a run is a usage error (tests/test_cli.py)
    assert len(result.output.strip().splitlines()) == 1 and "does not exist" in result.output


# ---------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_every_ddp_rank_applies_the_same_action_at_the_same_step(tmp_path: Path) -> None:
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    out_dir.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    worker = str(REPO / "tests" / "ddp_control_worker.py")
    proc = subprocess.run(
        [*torchrun, worker, str(run_dir), str(out_dir)], env=env, capture_output=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:  # issued after step 7, picked up at the next check step (10) by both
        assert result["arrived"] == {"10": [1], "15": [2]}  # the rollback after 12, at 15
        used = result["used"]
        assert used[:15] + used[16:] == pytest.approx([0.1] * 10 + [0.05] * 9, rel=1e-12)
        assert result["factor"] == 2.0
        assert result["rolled_back"]  # each rank its own step-5 weights, the same step
    assert ranks[0]["looked"] and not ranks[1]["looked"]


def test_a_fast_trainer_looks_at_the_control_file_by_elapsed_time_too(tmp_path: Path) -> None:
    """check_every=1000 would leave a stop unread for 1000 steps; once LOOK_SECS have passed
    since the last look, the next step looks anyway (a real sleep, no clock is faked)."""
    ctl = Controller(tmp_path, check_every=1000)
    opt = sgd()
    assert ctl.before_step(opt, 0) == []  # the first step always looks
    stop = append_action(tmp_path, action=STOP)
    time.sleep(2 * controller_mod.LOOK_SECS)
    assert ctl.before_step(opt, 1) == [stop] and ctl.should_stop
