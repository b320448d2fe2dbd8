"""The daemon: run_once on real event files, restarts, the watch loop, and `lrwatch serve`.

The unit tests use a small stand-in analyzer with the API of
:class:`lrwatch.analysis.analyzer.RunAnalyzer`, whose decisions are obvious (cut whenever the
loss exceeds a bound), so each test can say exactly which actions must exist; the subprocess
tests run the real analyzer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from waiting import wait_for
from watchdog.events import (
    DirCreatedEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
)

from lrwatch import schema
from lrwatch.control import read_control
from lrwatch.daemon.notify import HookRunner
from lrwatch.daemon.outputs import read_audit
from lrwatch.daemon.rails import Rails
from lrwatch.daemon.runs import Daemon
from lrwatch.daemon.serve import Shutdown, Waker, watch
from lrwatch.daemon.watched_run import WatchedRun, run_once
from lrwatch.events.writer import EventWriter
from lrwatch.schema import ActionKind, Decision, Finding, Kind, Scalar, Severity

HOOKS = Path(__file__).resolve().parent.parent / "hooks"


class LossAbove:
    """Stand-in analyzer: one lr_cut by 2 at every step whose loss exceeds ``bound``."""

    advice_only = False

    def __init__(self, bound: float = 1.0) -> None:
        self.bound = bound
        self.findings: list[Finding] = []
        self.fed = 0

    def feed(self, scalars: Iterable[Scalar], **how: bool) -> list[Decision]:
        out = []
        for s in sorted(scalars, key=lambda s: s.step):
            self.fed += 1
            if s.tag == schema.LOSS and s.value > self.bound:
                f = Finding(Kind.EXPLOSION, s.step, s.tag, Severity.WARNING, {"loss": s.value})
                self.findings.append(f)
                out.append(Decision(s.step, ActionKind.LR_CUT, f"loss {s.value:g}", 2, None, (f,)))
            elif s.tag == schema.GRAD_NORM and s.value > 100:  # a finding with no decision
                self.findings.append(Finding(Kind.RATIO_HIGH, s.step, s.tag, Severity.INFO, {}))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"fed": self.fed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fed = int(state["fed"])


def write(run_dir: Path, rows: dict[int, dict[str, float]]) -> None:
    """Append ``{step: {tag: value}}`` as real event files (a new file per call, like a resume)."""
    with EventWriter(run_dir) as w:
        for step, values in rows.items():
            w.add_scalars(step, list(values), list(values.values()))


def losses(*pairs: tuple[int, float]) -> dict[int, dict[str, float]]:
    return {step: {schema.LOSS: loss, schema.LR: 0.1} for step, loss in pairs}


def watched(run_dir: Path, mode: str = "apply") -> WatchedRun:
    return WatchedRun(run_dir, analyzer_factory=LossAbove, mode=mode)  # type: ignore[arg-type]


def control_ids(run_dir: Path) -> list[tuple[int, str, int | None]]:
    path = run_dir / schema.CONTROL_FILENAME
    if not path.exists():
        return []
    return [(a.id, a.action.value, a.factor) for a in read_control(path).actions]


RAILS = Rails(cooldown=0, budget=10, window=1000)


def test_run_once_in_recommend_mode_should_record_decisions_and_touch_no_control_file(
    tmp_path: Path,
) -> None:
    write(tmp_path, losses((1, 0.5), (2, 3.0), (3, 0.4)))
    run = watched(tmp_path, "recommend")
    [decision] = run_once(run, rails=RAILS)
    run.close()
    assert (decision.step, decision.action, decision.factor) == (2, ActionKind.LR_CUT, 2)
    [record] = read_audit(tmp_path)
    assert (record["mode"], record["applied"], record["action_id"]) == ("recommend", False, None)
    assert record["held_back"] is None
    assert control_ids(tmp_path) == []


def test_run_once_in_apply_mode_should_issue_actions_and_record_their_ids(tmp_path: Path) -> None:
    write(tmp_path, losses((1, 2.0), (2, 0.5), (3, 5.0)))
    run = watched(tmp_path)
    assert [d.step for d in run_once(run, rails=RAILS)] == [1, 3]
    run.close()
    assert control_ids(tmp_path) == [(1, "lr_cut", 2), (2, "lr_cut", 2)]
    actions = read_control(tmp_path / schema.CONTROL_FILENAME).actions
    assert [a.source for a in actions] == ["daemon", "daemon"]
    assert actions[1].reason == "loss 5 (lrwatch decision at step 3)"
    assert [(r["action_id"], r["applied"]) for r in read_audit(tmp_path)] == [(1, True), (2, True)]


def test_run_once_should_read_only_what_is_new(tmp_path: Path) -> None:
    write(tmp_path, losses((1, 2.0)))
    run = watched(tmp_path)
    assert len(run_once(run, rails=RAILS)) == 1
    assert run_once(run, rails=RAILS) == []  # nothing new: nothing decided, nothing rewritten
    write(tmp_path, losses((2, 3.0)))
    assert [d.step for d in run_once(run, rails=RAILS)] == [2]
    run.close()
    assert run.analyzer.fed == 4  # type: ignore[attr-defined]  # 2 steps x (loss, lr), once each


def test_rails_past_the_budget_should_only_recommend_and_say_why(tmp_path: Path) -> None:
    write(tmp_path, losses((10, 2.0), (20, 2.0), (30, 2.0)))
    run = watched(tmp_path)
    run_once(run, rails=Rails(cooldown=0, budget=2, window=1000))
    run.close()
    assert control_ids(tmp_path) == [(1, "lr_cut", 2), (2, "lr_cut", 2)]
    last = read_audit(tmp_path)[-1]
    assert (last["applied"], last["held_back"]) == (
        False,
        "budget: 2 automatic decisions in the last 1000 steps",
    )


def test_acknowledgements_should_be_read_back_into_the_audit_log(tmp_path: Path) -> None:
    write(tmp_path, losses((1, 2.0)))
    run = watched(tmp_path)
    run_once(run, rails=RAILS)
    # The hook applies action 1 at step 2 and logs the ack with the new effective LR.
    write(tmp_path, {2: {schema.CONTROL_ACK: 1.0, schema.LR: 0.05, schema.LOSS: 0.5}})
    run_once(run, rails=RAILS)
    run.close()
    ack = read_audit(tmp_path)[-1]
    f32 = pytest.approx(0.05, rel=1e-6)  # event files hold float32
    assert (ack["event"], ack["action_id"], ack["step"], ack["lr"]) == ("acknowledged", 1, 2, f32)
    assert run.ledger.acked == {1} and run.ledger.lr == f32


def test_a_restarted_daemon_should_neither_forget_nor_repeat(tmp_path: Path) -> None:
    write(tmp_path, losses((1, 2.0), (2, 0.5)))
    first = watched(tmp_path)
    run_once(first, rails=RAILS)
    first.close()
    second = watched(tmp_path)  # a new process: state comes from lrwatch_daemon/state.json
    assert run_once(second, rails=RAILS) == []
    assert second.ledger == first.ledger
    write(tmp_path, losses((3, 4.0)))
    assert [d.step for d in run_once(second, rails=RAILS)] == [3]
    second.close()
    assert control_ids(tmp_path) == [(1, "lr_cut", 2), (2, "lr_cut", 2)]


def test_a_daemon_killed_before_saving_its_state_should_not_reissue(tmp_path: Path) -> None:
    write(tmp_path, losses((1, 2.0)))
    run = watched(tmp_path)
    run_once(run, rails=RAILS)
    run.close()
    # As if SIGKILLed between writing the control file and saving state.json:
    (tmp_path / schema.DAEMON_SUBRUN / "state.json").unlink()
    again = watched(tmp_path)
    assert len(run_once(again, rails=RAILS)) == 1  # the same decision, re-derived
    again.close()
    assert control_ids(tmp_path) == [(1, "lr_cut", 2)]  # ... found in the control file
    assert [r["action_id"] for r in read_audit(tmp_path)] == [1]  # ... and in the audit log


def test_a_corrupt_state_file_should_mean_starting_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, losses((1, 2.0)))
    state = tmp_path / schema.DAEMON_SUBRUN / "state.json"
    state.parent.mkdir()
    state.write_text("{not json")
    run = watched(tmp_path)
    assert len(run_once(run, rails=RAILS)) == 1
    run.close()
    assert "ignoring daemon state" in caplog.text
    assert json.loads(state.read_text())["version"] == 1


def test_run_once_should_pass_each_decision_to_the_hooks(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = tmp_path / "hooked.jsonl"
    write(run_dir, losses((1, 2.0)))
    run = watched(run_dir)
    hook = HOOKS / "append-to-file"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRWATCH_HOOK_FILE", str(out))
        with HookRunner([hook]) as hooks:
            run_once(run, rails=RAILS, hooks=hooks)
    run.close()
    [line] = out.read_text().splitlines()
    assert json.loads(line) == read_audit(run_dir)[0]


def test_findings_without_a_decision_should_still_be_marked(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write(tmp_path, {5: {schema.GRAD_NORM: 500.0}})
    run = watched(tmp_path)
    assert run_once(run, rails=RAILS) == []
    run.close()
    acc = EventAccumulator(str(tmp_path / schema.DAEMON_SUBRUN))
    acc.Reload()
    tag = schema.FINDING_TAG_FMT.format("ratio_high")
    assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(5, 1.0)]


def test_daemon_should_find_new_runs_and_drop_vanished_ones(tmp_path: Path) -> None:
    daemon = Daemon([tmp_path], mode="apply", analyzer_factory=LossAbove, rails=RAILS)
    write(tmp_path / "a", losses((1, 2.0)))
    assert list(daemon.process()) == [tmp_path / "a"]
    write(tmp_path / "b" / "nested", losses((1, 0.1), (2, 9.0)))
    taken = daemon.process()
    assert {run: [d.step for d in ds] for run, ds in taken.items()} == {
        tmp_path / "b" / "nested": [2]
    }
    shutil.rmtree(tmp_path / "a")
    daemon.process()
    daemon.close()
    # ... and its own lrwatch_daemon sub-runs, which hold event files now, are not runs
    assert sorted(daemon.runs) == [tmp_path / "b" / "nested"]


def test_a_pass_over_named_directories_should_read_only_those_runs(tmp_path: Path) -> None:
    daemon = Daemon([tmp_path], mode="apply", analyzer_factory=LossAbove, rails=RAILS)
    write(tmp_path / "a", losses((1, 0.1)))
    write(tmp_path / "b", losses((1, 0.1)))
    daemon.process()
    write(tmp_path / "a", losses((2, 5.0)))
    write(tmp_path / "b", losses((2, 6.0)))
    write(tmp_path / "new" / "c", losses((1, 7.0)))  # under a new directory an event named
    taken = daemon.process([str(tmp_path / "a"), str(tmp_path / "new")])
    assert {run.name: [d.step for d in ds] for run, ds in taken.items()} == {"a": [2], "c": [1]}
    assert control_ids(tmp_path / "b") == []  # b was not named: not read yet
    taken = daemon.process()  # the full pass catches it
    daemon.close()
    assert {run.name: [d.step for d in ds] for run, ds in taken.items()} == {"b": [2]}


def test_waker_should_collect_the_written_and_the_new_directories() -> None:
    waker = Waker()
    waker.dispatch(FileModifiedEvent("/r/run1/events.out.tfevents.1.host"))
    waker.dispatch(FileModifiedEvent("/r/run1/events.out.tfevents.2.host"))
    waker.dispatch(FileMovedEvent("/r/run2/x.tmp", "/r/run2/events.out.tfevents.1"))
    waker.dispatch(DirCreatedEvent("/r/run3"))
    waker.dispatch(FileModifiedEvent("/r/run4/lrwatch_audit.jsonl"))
    assert waker.take() == ({"/r/run1", "/r/run2"}, {"/r/run3"})
    assert waker.take() == (set(), set())


def test_daemon_should_give_each_new_run_one_tensorboard_layout(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lrwatch.daemon import tb_layout

    daemon = Daemon([tmp_path], mode="recommend", analyzer_factory=LossAbove, rails=RAILS)
    write(tmp_path / "a", losses((1, 2.0)))
    daemon.process()
    daemon.process()
    daemon.close()
    subrun = tmp_path / "a" / schema.DAEMON_SUBRUN
    layouts = list(subrun.glob(f"*{tb_layout.FILE_SUFFIX}"))
    assert len(layouts) == 1
    acc = EventAccumulator(str(layouts[0]))
    acc.Reload()
    assert tb_layout.LAYOUT_TAG in acc.Tags()["tensors"]


@pytest.mark.parametrize(
    ("event", "wakes"),
    [
        (FileModifiedEvent("/r/run1/events.out.tfevents.1.host.2.0"), True),
        (FileClosedEvent("/r/run1/events.out.tfevents.1.host.2.0"), True),
        (FileMovedEvent("/r/run1/x.tmp", "/r/run1/events.out.tfevents.1"), True),
        (DirCreatedEvent("/r/run2"), True),
        (FileOpenedEvent("/r/run1/events.out.tfevents.1.host.2.0"), False),  # our own reads
        (FileClosedNoWriteEvent("/r/run1/events.out.tfevents.1.host.2.0"), False),
        (FileModifiedEvent("/r/run1/lrwatch_daemon/events.out.tfevents.1.lrwatch_daemon"), False),
        (DirCreatedEvent("/r/run1/lrwatch_daemon"), False),
        (FileModifiedEvent("/r/run1/lrwatch_audit.jsonl"), False),
        (FileMovedEvent("/r/run1/.lrwatch_control.json.x.tmp", "/r/run1/lrwatch_control.json"),
         False),
    ],
    ids=["write", "close-write", "renamed-in", "new-dir", "open", "close-read", "own-markers",
         "own-subrun", "audit", "control-file"],
)  # fmt: skip
def test_waker_should_wake_only_for_writes_to_event_files_and_new_directories(
    event: Any, wakes: bool
) -> None:
    waker = Waker()
    waker.dispatch(event)
    assert waker.woken.is_set() is wakes


@pytest.mark.parametrize("poll", [None, 0.1], ids=["inotify", "poll"])
def test_watch_should_pick_up_a_run_created_after_it_started(
    tmp_path: Path, poll: float | None
) -> None:
    daemon = Daemon([tmp_path], mode="apply", analyzer_factory=LossAbove, rails=RAILS)
    waker = Waker()
    ended: list[BaseException] = []

    def loop() -> None:
        try:
            watch(daemon, waker=waker, poll=poll)
        except BaseException as err:  # the test inspects how the loop ended
            ended.append(err)

    thread = threading.Thread(target=loop, name="lrwatch-test-watch")
    thread.start()
    try:
        write(tmp_path / "late", losses((1, 0.5), (2, 7.0)))
        wait_for(lambda: control_ids(tmp_path / "late") == [(1, "lr_cut", 2)])
        write(tmp_path / "later", losses((1, 0.5), (2, 8.0)))  # and the next one too
        wait_for(lambda: control_ids(tmp_path / "later") == [(1, "lr_cut", 2)])
    finally:
        waker.stop()
        thread.join(timeout=30)
        daemon.close()
    assert not thread.is_alive()
    assert [type(e) for e in ended] == [Shutdown]


# ------------------------------------------------------------------ the real `lrwatch serve`
def diverging(run_dir: Path, *, first: int = 1, last: int = 80) -> None:
    """A run whose loss falls, then turns non-finite from step 60 on (the real analyzer acts)."""
    rows = {}
    for step in range(first, last + 1):
        loss = 2.0 / step + 0.3 if step < 60 else float("nan")
        rows[step] = {
            schema.LOSS: loss,
            schema.NONFINITE: float(step >= 60),
            schema.GRAD_NORM: 1.0 + 0.01 * (step % 5) if step < 60 else float("nan"),
            schema.LR: 0.1,
        }
    write(run_dir, rows)


def lrwatch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lrwatch", *args]


def cli_env(tmp_path: Path) -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": root, "LRWATCH_HOOK_FILE": str(tmp_path / "hooked.jsonl")}


@pytest.mark.slow
def test_serve_once_should_process_every_run_and_exit(tmp_path: Path) -> None:
    logdir = tmp_path / "runs"
    diverging(logdir / "exp1")
    write(logdir / "healthy", losses(*((s, 1.0 / s) for s in range(1, 30))))
    result = subprocess.run(
        lrwatch_cmd("serve", "--once", "--apply", "--hook", str(HOOKS / "append-to-file"),
                    str(logdir)),
        env=cli_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    audit = read_audit(logdir / "exp1")
    records = [r for r in audit if r["event"] == "decision"]
    assert records and all(r["step"] >= 60 for r in records)
    # After each hook run, its line: the decision's hook ran and ended well.
    hook_lines = [(r["decision_id"], r["ok"]) for r in audit if r["event"] == "hooked"]
    assert sorted(hook_lines) == sorted((r["decision_id"], True) for r in records)
    assert result.stdout.strip() == f"2 runs, {len(records)} decisions"
    assert "applied as action #1" in result.stderr  # the console line, shown without -v
    assert records[0]["action_id"] == 1 and control_ids(logdir / "exp1")[0][0] == 1
    assert read_audit(logdir / "healthy") == []
    hooked = [json.loads(line) for line in (tmp_path / "hooked.jsonl").read_text().splitlines()]
    # Hooks run on a small pool, so two decisions of one step may reach the file in either order.
    by_id = lambda rs: sorted(rs, key=lambda r: r["action_id"])  # noqa: E731
    assert by_id(hooked) == by_id(records)


def test_serve_should_refuse_a_hook_that_cannot_run(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lrwatch.cli import main

    plain = tmp_path / "plain"
    plain.write_text("echo not executable")
    for hook, why in [(tmp_path / "missing", "does not exist"), (plain, "not executable")]:
        result = CliRunner().invoke(main, ["serve", "--once", "--hook", str(hook), str(tmp_path)])
        assert result.exit_code == 2
        assert why in result.output


@pytest.mark.slow
def test_serve_should_watch_a_run_created_later_and_stop_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    logdir = tmp_path / "runs"
    write(logdir / "early", losses((1, 0.5)))
    proc = subprocess.Popen(
        lrwatch_cmd("-v", "serve", "--apply", str(logdir)),
        env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # The daemon saved the early run's state: it is up and watching.
        wait_for(lambda: (logdir / "early" / schema.DAEMON_SUBRUN / "state.json").exists())
        diverging(logdir / "late")
        wait_for(lambda: bool(control_ids(logdir / "late")))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "shutting down" in err
    assert read_audit(logdir / "late")[0]["applied"]


@pytest.mark.slow
def test_a_mis_tuned_trainer_should_be_cut_and_the_ack_read_back(tmp_path: Path) -> None:
    logdir = tmp_path / "runs"
    logdir.mkdir()
    run_dir = logdir / "hot"
    daemon = subprocess.Popen(
        lrwatch_cmd("serve", "--apply", str(logdir)),
        env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        trainer = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("serve_trainer.py")), str(run_dir),
             "30", "600"],
            env=cli_env(tmp_path), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert trainer.returncode == 0, trainer.stderr
        assert "applied_at None" not in trainer.stdout
        wait_for(lambda: any(r["event"] == "acknowledged" for r in read_audit(run_dir)))
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == 0, err
    records = read_audit(run_dir)
    [first] = [r for r in records if r["action_id"] == 1 and r["event"] == "decision"]
    acks = {r["action_id"]: r for r in records if r["event"] == "acknowledged"}
    assert acks[1]["step"] > first["step"]
    if first["action"] == "lr_cut":  # the policy's choice; a cut must show in the acked LR
        # ...with every cut the hook read in the same look (an urgent second cut can follow
        # within steps): the LR acked is the one the step ran with after all of them
        same = [i for i, r in acks.items() if r["step"] == acks[1]["step"]]
        cuts = [r for r in records if r["event"] == "decision" and r["action"] == "lr_cut"]
        factor = math.prod(r["factor"] for r in cuts if r.get("action_id") in same)
        assert acks[1]["lr"] == pytest.approx(30 / factor, rel=1e-6)


@pytest.mark.slow
def test_a_sigkilled_daemon_restarted_should_not_repeat_actions(tmp_path: Path) -> None:
    logdir = tmp_path / "runs"
    diverging(logdir / "exp1")
    proc = subprocess.Popen(
        lrwatch_cmd("serve", "--apply", str(logdir)), env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: (logdir / "exp1" / schema.DAEMON_SUBRUN / "state.json").exists())
    finally:
        proc.kill()  # SIGKILL: no clean shutdown
        proc.wait(timeout=60)
    issued = control_ids(logdir / "exp1")
    assert issued
    diverging(logdir / "exp1", first=81, last=90)  # the run went on while the daemon was down
    again = subprocess.run(
        lrwatch_cmd("serve", "--once", "--apply", "--cooldown", "0", str(logdir)),
        env=cli_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    after = control_ids(logdir / "exp1")
    assert after[: len(issued)] == issued  # nothing lost, nothing issued twice
    steps = [r["step"] for r in read_audit(logdir / "exp1") if r["applied"]]
    assert len(steps) == len(after) and all(s >= 81 for s in steps[len(issued) :])


@pytest.mark.slow
def test_serve_should_print_a_warning_that_led_to_no_decision_once_with_why(
    tmp_path: Path,
) -> None:
    """Two loss spikes 50 steps apart: the first gets a (recommended) cut, the second no
    decision, as that cut was never applied; serve prints one line for it, saying so."""
    rng = np.random.default_rng(0)
    rows = {}
    for step in range(1, 201):
        loss = 1.0 + 0.02 * float(rng.standard_normal())
        rows[step] = {schema.LOSS: loss * (50.0 if step in (100, 150) else 1.0), schema.LR: 0.1}
    write(tmp_path / "runs" / "exp", rows)
    result = subprocess.run(
        lrwatch_cmd("serve", "--once", str(tmp_path / "runs")),
        env=cli_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    quiet = [line for line in result.stderr.splitlines() if "no decision" in line]
    assert len(quiet) == 1, result.stderr
    assert "step 150: warning explosion" in quiet[0] and "never applied" in quiet[0]
    assert "step 100" in result.stderr and "lr_cut /5" in result.stderr
