"""The whole loop with real processes: trainer -> event files -> `lrwatch serve --apply` -> control
file -> trainer.

The trainer is ``examples/mistuned.py`` (an MLP on scikit-learn's digits, SGD at an LR
about 10x too high), the daemon is ``python -m lrwatch serve``. Every check reads back what the
processes left on disk with references independent of lrwatch's own bookkeeping: TensorBoard's
``EventAccumulator`` for the hook's acknowledgements and effective LR, torch's ``LambdaLR`` for
the LR sequence the scheduler alone would give.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrwatch import schema
from lrwatch.control import append_action, read_control
from lrwatch.daemon.outputs import read_audit
from lrwatch.hook.applied import Applied

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TRAINER = ROOT / "examples" / "mistuned.py"
WARMUP = 20  # steps of linear warm-up to the peak LR (examples/mistuned.py's default)
MISTUNED_LR = 0.6  # ~10x too high: the loss bounces; a cut by 2 or 4 trains well
BROKEN_LR = 5.0  # far too high: explodes at once, then decisions keep coming (for restarts)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TIMEOUT = 120.0  # seconds, per wait: generous, the machine may be shared


# ------------------------------------------------------------------------------ processes
def start_daemon(logdir: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lrwatch", "serve", str(logdir), "--apply"],
            stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT,
        )  # fmt: skip


def start_trainer(
    run_dir: Path, *extra: str, steps: int, lr: float, delay: str = "0"
) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(TRAINER), "--logdir", str(run_dir), "--steps", str(steps),
            "--lr", str(lr), "--warmup", str(WARMUP), "--seed", "0",
            "--step-delay", delay, *extra]  # fmt: skip
    with open(run_dir.parent / f"{run_dir.name}.trainer.log", "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every process a test starts; whatever is still running at the end is killed."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def wait_until(cond: Callable[[], Any], what: str, *, timeout: float = TIMEOUT) -> Any:
    """Poll ``cond`` until it is truthy (returned) or ``timeout`` passes (fail naming ``what``)."""
    tick = threading.Event()  # never set: wait() is a bounded pause between two checks
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        tick.wait(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def finish(proc: subprocess.Popen[bytes], what: str) -> None:
    assert proc.wait(timeout=TIMEOUT) == 0, f"{what} exited with {proc.returncode}"


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, "lrwatch serve did not shut down cleanly on SIGTERM"


# ------------------------------------------------------------------------------ reading back
def control_actions(run_dir: Path) -> list[schema.Action]:
    path = run_dir / schema.CONTROL_FILENAME
    return list(read_control(path).actions) if path.exists() else []


def event_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if "tfevents" in p.name)


def scalar_events(path: Path, tag: str) -> list[Any]:
    """TensorBoard's ``ScalarEvent``s of ``tag`` in one event file, every record kept."""
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return list(acc.Scalars(tag)) if tag in acc.Tags()["scalars"] else []


def scalars(path: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``tag`` in one event file."""
    return [(e.step, e.value) for e in scalar_events(path, tag)]


def acks(run_dir: Path) -> list[tuple[int, int]]:
    """``(action id, step)`` of every application, from the acks across the run's event files.

    A resumed trainer acknowledges again, at its first step, every action applied before (its
    first ack may not have reached the disk, issue 9); those re-acks are not applications.
    """
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for f in event_files(run_dir):
        pairs = [(int(v), s) for s, v in scalars(f, schema.CONTROL_ACK)]
        first = min((s for _, s in pairs), default=None)
        out += [(i, s) for i, s in pairs if not (i in seen and s == first)]
        seen |= {i for i, _ in pairs}
    return out


def acked_ids(run_dir: Path) -> set[int]:
    return {i for i, _ in acks(run_dir)} if run_dir.exists() else set()


def scheduler_lrs(steps: int, peak: float) -> list[float]:
    """The LR the optimizer steps with at steps 1..steps under the trainer's scheduler alone."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def decision_step(action: schema.Action) -> int:
    """The step of the daemon decision an action came from (the daemon writes it in the reason)."""
    match = re.search(r"lrwatch decision at step (\d+)", action.reason)
    assert match, f"action {action.id} does not name its decision step: {action.reason!r}"
    return int(match.group(1))


def last_check_time(run_dir: Path) -> float:
    """A moment by which the hook's last look at the control file surely happened.

    The hook looks every 10 steps (``control_every``), before the step's row is stamped; the row
    stamped 20 steps before the last one is therefore later than a look the hook then took.
    """
    rows = [e for f in event_files(run_dir) for e in scalar_events(f, schema.LOSS)]
    last = max(e.step for e in rows)
    return max(e.wall_time for e in rows if e.step <= last - 20)


def audited_acks(run_dir: Path) -> Counter[int]:
    return Counter(r["action_id"] for r in read_audit(run_dir) if r["event"] == "acknowledged")


def daemon_caught_up(run_dir: Path) -> bool:
    """The daemon has read back (and audited) every ack in the event files."""
    return set(audited_acks(run_dir)) == acked_ids(run_dir)


def assert_exactly_once(run_dir: Path) -> list[schema.Action]:
    """Control ids, acks and audit log agree: each action issued once and applied once.

    Every action issued before the hook's last look at the control file is acknowledged (an
    action issued after the run ended has nobody to apply it, and is not "lost").
    """
    actions = control_actions(run_dir)
    ids = [a.id for a in actions]
    assert ids == list(range(1, len(ids) + 1)), f"control ids not 1..n: {ids}"
    decided = Counter((decision_step(a), a.action) for a in actions if a.source == "daemon")
    assert all(n == 1 for n in decided.values()), f"a decision issued twice: {decided}"
    ack_count = Counter(i for i, _ in acks(run_dir))
    assert all(n == 1 for n in ack_count.values()), f"an action applied twice: {ack_count}"
    assert set(ack_count) <= set(ids), f"acks {ack_count} of actions never issued {ids}"
    due = {a.id for a in actions if a.issued_at < last_check_time(run_dir)}
    assert due <= set(ack_count), f"actions {sorted(due - set(ack_count))} lost: never applied"
    audit = read_audit(run_dir)
    applied = Counter(r["action_id"] for r in audit if r["event"] == "decision" and r["applied"])
    daemon_ids = Counter(a.id for a in actions if a.source == "daemon")
    assert applied == daemon_ids, f"audit decisions {dict(applied)} != daemon actions"
    assert audited_acks(run_dir) == ack_count, f"audit acks != event acks {dict(ack_count)}"
    return actions


def factor_at(actions: list[schema.Action], ack_step: dict[int, int], step: int) -> float:
    """Cumulative LR divisor in force at ``step``: the cuts acknowledged at or before it."""
    factor = 1.0
    for a in actions:
        if a.action is schema.ActionKind.LR_CUT and a.factor and a.id in ack_step:
            factor *= a.factor if ack_step[a.id] <= step else 1
    return factor


def apply_stop(run_dir: Path) -> None:
    """End a run the way a human would: what `lrwatch apply RUN --stop` does, in this process.

    (A CLI subprocess would only add seconds of imports; the CLI itself has its own tests.)
    """
    append_action(run_dir, action=schema.ActionKind.STOP, reason="test over", source="human")


# ------------------------------------------------------------------------------ the tests
def test_e2e_mistuned_run_is_cut_acknowledged_and_ends_better(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    steps = 400
    logdir, run_dir = tmp_path / "runs", tmp_path / "runs" / "mistuned"
    logdir.mkdir()
    (base_dir := tmp_path / "baseline").mkdir()
    procs.append(daemon := start_daemon(logdir, tmp_path / "serve.log"))
    procs.append(
        baseline := start_trainer(
            base_dir / "run",
            "--no-lrwatch",
            "--result",
            str(tmp_path / "base.json"),
            steps=steps,
            lr=MISTUNED_LR,
        )
    )
    procs.append(trainer := start_trainer(
        run_dir, "--wait-for-daemon", "60", "--result", str(tmp_path / "live.json"),
        steps=steps, lr=MISTUNED_LR, delay="0.015"))  # fmt: skip
    finish(trainer, "the watched trainer")
    finish(baseline, "the baseline trainer")
    wait_until(lambda: daemon_caught_up(run_dir), "the daemon to audit every ack")
    stop_daemon(daemon)

    actions = assert_exactly_once(run_dir)
    assert all(a.source == "daemon" for a in actions), actions
    ack_step = dict(acks(run_dir))
    assert any(a.action is schema.ActionKind.LR_CUT and a.id in ack_step for a in actions)
    live = json.loads((tmp_path / "live.json").read_text())
    base = json.loads((tmp_path / "base.json").read_text())
    # The effective LR the hook recorded is the scheduler's own LR over the cuts in force.
    sched = scheduler_lrs(steps, MISTUNED_LR)
    (events,) = event_files(run_dir)
    lrs = scalars(events, schema.LR)
    assert {s for s, _ in lrs} == set(range(1, live["step"] + 1)), "LR not recorded every step"
    for step, lr in lrs:
        expected = sched[step - 1] / factor_at(actions, ack_step, step)
        assert lr == pytest.approx(expected, rel=1e-5), f"step {step}"
    # Better by a clear margin (the run may also have been stopped early by the daemon).
    assert live["val_loss"] < 0.8 * base["val_loss"], (live, base)


def test_e2e_daemon_killed_and_restarted_loses_and_repeats_nothing(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    logdir, run_dir = tmp_path / "runs", tmp_path / "runs" / "mistuned"
    logdir.mkdir()
    procs.append(first := start_daemon(logdir, tmp_path / "serve.log"))
    procs.append(trainer := start_trainer(run_dir, "--wait-for-daemon", "60", steps=5000,
                                            lr=BROKEN_LR, delay="0.01"))  # fmt: skip
    wait_until(lambda: control_actions(run_dir), "the daemon's first action")
    first.kill()  # SIGKILL: no chance to save anything on the way out
    first.wait(timeout=30)
    before = max(a.id for a in control_actions(run_dir))
    procs.append(second := start_daemon(logdir, tmp_path / "serve.log"))
    wait_until(
        lambda: max(acked_ids(run_dir), default=0) > before,
        "an action of the restarted daemon applied",
    )
    assert trainer.poll() is None, "the trainer must still be running"
    apply_stop(run_dir)
    finish(trainer, "the trainer")
    wait_until(lambda: daemon_caught_up(run_dir), "the daemon to audit every ack")
    stop_daemon(second)
    actions = assert_exactly_once(run_dir)
    assert any(a.action is schema.ActionKind.STOP for a in actions)


def test_e2e_trainer_killed_and_resumed_neither_reapplies_nor_loses(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    logdir, run_dir = tmp_path / "runs", tmp_path / "runs" / "mistuned"
    logdir.mkdir()
    procs.append(daemon := start_daemon(logdir, tmp_path / "serve.log"))
    extra = ("--ckpt-every", "25")
    procs.append(first := start_trainer(run_dir, "--wait-for-daemon", "60", *extra,
                                          steps=5000, lr=BROKEN_LR, delay="0.01"))  # fmt: skip
    # Kill once the first action is applied (and a checkpoint exists).
    wait_until(lambda: acked_ids(run_dir) and (run_dir / "checkpoint.pt").exists(),
               "the first action applied and a checkpoint")  # fmt: skip
    first.kill()
    first.wait(timeout=30)
    applied_before = Applied.load(run_dir / schema.APPLIED_FILENAME)
    assert applied_before is not None and applied_before.ids
    before_ids = set(applied_before.ids)
    ckpt_step = torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"]
    files_before = set(event_files(run_dir))
    procs.append(
        resumed := start_trainer(
            run_dir, "--resume", *extra, steps=5000, lr=BROKEN_LR, delay="0.01"
        )
    )
    wait_until(lambda: acked_ids(run_dir) - before_ids, "an action applied after the resume")
    apply_stop(run_dir)
    finish(resumed, "the resumed trainer")
    wait_until(lambda: daemon_caught_up(run_dir), "the daemon to audit every ack")
    stop_daemon(daemon)

    actions = assert_exactly_once(run_dir)
    (new_file,) = set(event_files(run_dir)) - files_before
    new_acks = [(s, int(v)) for s, v in scalars(new_file, schema.CONTROL_ACK)]
    reacked = {i for s, i in new_acks if s == ckpt_step + 1}  # acknowledged again (issue 9)
    assert before_ids <= reacked
    again = {i for s, i in new_acks if s > ckpt_step + 1} & before_ids
    assert not again, "an action applied before the kill was applied again"
    # In the resumed process the cuts applied before the kill are in force from its first step,
    # later ones from their ack: LR = scheduler LR / cumulative factor, nothing applied twice.
    ack_step = {i: (0 if i in before_ids else s) for i, s in acks(run_dir)}
    lrs = scalars(new_file, schema.LR)
    sched = scheduler_lrs(max(s for s, _ in lrs), BROKEN_LR)
    assert min(s for s, _ in lrs) == ckpt_step + 1, (ckpt_step, lrs[:3])
    for step, lr in lrs:
        expected = sched[step - 1] / factor_at(actions, ack_step, step)
        assert lr == pytest.approx(expected, rel=1e-5), f"step {step} after resume"
