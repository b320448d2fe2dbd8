"""Issue 9, defect 6: a full disk, then space again: what was refused is retried, nothing twice.

The disk is a real tmpfs of a few hundred kB (mounted here when the machine allows it, else the
tests are skipped with the reason), filled with a real file until the kernel says ENOSPC.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_serve import RAILS, LossAbove, losses, write

from lrwatch.control import append_action, read_control
from lrwatch.daemon.outputs import read_audit
from lrwatch.daemon.watched_run import WatchedRun, run_once
from lrwatch.hook.applied import Applied
from lrwatch.hook.controller import Controller
from lrwatch.schema import APPLIED_FILENAME, CONTROL_FILENAME, ActionKind

PAGE = 4096
DISK_BYTES = 512 * 1024


class Disk:
    """A small tmpfs and a filler file that takes all but ``free`` pages of it."""

    def __init__(self, mountpoint: Path) -> None:
        self.root = mountpoint
        self.filler = mountpoint / "filler"

    def fill(self, free_pages: int = 0) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * PAGE) == PAGE:
                pass
        except OSError as err:
            assert err.errno == errno.ENOSPC
        finally:
            os.close(fd)
        size = self.filler.stat().st_size
        os.truncate(self.filler, max(0, size - size % PAGE - free_pages * PAGE))

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mountpoint)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    except OSError as err:
        pytest.skip(f"cannot run mount: {err}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield Disk(mountpoint)
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def new_run(disk: Disk) -> Path:
    run_dir = disk.root / uuid.uuid4().hex[:8]
    run_dir.mkdir()
    write(run_dir, losses((1, 2.0), (2, 0.5), (3, 4.0)))  # two cuts by 2, at steps 1 and 3
    return run_dir


def decision_lines(run_dir: Path) -> list[tuple[int, int | None]]:
    return [(r["step"], r["action_id"]) for r in read_audit(run_dir) if r["event"] == "decision"]


def control_ids(run_dir: Path) -> list[int]:
    path = run_dir / CONTROL_FILENAME
    return [a.id for a in read_control(path).actions] if path.exists() else []


def test_a_daemon_on_a_full_disk_retries_once_space_returns(disk: Disk) -> None:
    run_dir = new_run(disk)
    run = WatchedRun(run_dir, analyzer_factory=LossAbove, mode="apply")
    disk.fill()
    assert [d.step for d in run_once(run, rails=RAILS)] == [1, 3]  # decided, nothing written
    assert run_once(run, rails=RAILS) == []  # still full: still waiting, no exception
    disk.free()
    run_once(run, rails=RAILS)
    run.close()
    assert control_ids(run_dir) == [1, 2]
    assert decision_lines(run_dir) == [(1, 1), (3, 2)]


@pytest.mark.parametrize("mode", ["apply", "recommend"])
def test_every_amount_of_free_space_ends_with_each_output_once(disk: Disk, mode: str) -> None:
    """From 0 to 8 free pages, every write (control file, audit, state, markers) meets ENOSPC
    somewhere; after space returns each decision has one line and, in apply mode, one action."""
    for free_pages in range(9):
        run_dir = new_run(disk)
        run = WatchedRun(run_dir, analyzer_factory=LossAbove, mode=mode)  # type: ignore[arg-type]
        disk.fill(free_pages)
        run_once(run, rails=RAILS)
        disk.free()
        run_once(run, rails=RAILS)
        run.close()
        again = WatchedRun(run_dir, analyzer_factory=LossAbove, mode=mode)  # type: ignore[arg-type]
        run_once(again, rails=RAILS)  # a restart repeats nothing either
        again.close()
        expected = [(1, 1), (3, 2)] if mode == "apply" else [(1, None), (3, None)]
        assert decision_lines(run_dir) == expected, f"{free_pages} free pages"
        assert control_ids(run_dir) == ([1, 2] if mode == "apply" else [])
        assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_the_hook_saves_its_applied_state_once_space_returns(disk: Disk) -> None:
    run_dir = disk.root / "run"
    run_dir.mkdir()
    append_action(run_dir, action=ActionKind.LR_CUT, factor=10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.4)
    ctl = Controller(run_dir, check_every=1)
    disk.fill()
    ctl.before_step(opt, 0)
    ctl.after_step(opt)
    assert ctl.lr_factor == 10.0
    assert not (run_dir / APPLIED_FILENAME).exists()
    disk.free()
    ctl.before_step(opt, 1)
    ctl.after_step(opt)
    saved = Applied.load(run_dir / APPLIED_FILENAME)
    assert saved is not None and saved.cuts == {1: 10}


def test_apply_on_a_full_disk_prints_one_line_and_exits_nonzero(disk: Disk) -> None:
    run_dir = disk.root / "run"
    run_dir.mkdir()
    (run_dir / "events.out.tfevents.0.test").write_bytes(b"")  # `apply` needs a run's directory
    append_action(run_dir, action=ActionKind.LR_CUT, factor=2)
    before = (run_dir / CONTROL_FILENAME).read_bytes()
    disk.fill()
    done = subprocess.run(
        [sys.executable, "-m", "lrwatch", "apply", str(run_dir), "--stop"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "No space left" in done.stderr
    assert (run_dir / CONTROL_FILENAME).read_bytes() == before
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []
    disk.free()
    done = subprocess.run(
        [sys.executable, "-m", "lrwatch", "apply", str(run_dir), "--stop"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert json.loads(done.stdout)["id"] == 2


def test_hook_runs_on_a_full_disk_end_once_each_and_are_not_rerun(
    disk: Disk, tmp_path: Path
) -> None:
    """A refused ``hooked`` line waits and is retried, so a restart does not run the hook again;
    a refused decision line owes no hook run until it is written."""
    from test_hook_jobs import hook_runs, passes_until, script

    from lrwatch.daemon.notify import HookRunner

    hook = script(tmp_path, "count", "")  # writes outside the small disk
    with HookRunner([hook]) as runner:
        for free_pages in range(9):
            run_dir = new_run(disk)
            run = WatchedRun(run_dir, analyzer_factory=LossAbove, mode="apply")
            disk.fill(free_pages)
            run_once(run, rails=RAILS, hooks=runner)  # decided; some writes refused
            ended = lambda r=run: not any(j.running for j in r.hook_jobs.jobs.values())  # noqa: E731
            passes_until(run, runner, ended)
            disk.free()
            passes_until(run, runner, lambda r=run: r.hook_jobs.idle and not r.outbox)
            run.close()
            again = WatchedRun(run_dir, analyzer_factory=LossAbove, mode="apply")
            run_once(again, rails=RAILS, hooks=runner)  # a restart: is anything owed?
            passes_until(again, runner, lambda r=again: r.hook_jobs.idle)
            again.close()
            audit = read_audit(run_dir)
            ids = [r["decision_id"] for r in audit if r["event"] == "decision"]
            ok = [r["decision_id"] for r in audit if r["event"] == "hooked" and r["ok"]]
            assert len(ids) == 2 and sorted(ok) == sorted(ids), f"{free_pages} free pages"
            runs = [i for i, _ in hook_runs(tmp_path) if i in ids]
            assert sorted(runs) == sorted(ids), f"{free_pages} free pages"


def fill_last_page(path: Path) -> None:
    """Fill the file's last page with a line no reader acts on: the next line needs a new page
    (tmpfs allocates whole pages, so a line could otherwise still fit on a full disk)."""
    slack = -path.stat().st_size % PAGE
    slack += PAGE if slack < 64 else 0  # too little room for the padding line itself
    pad = {"event": "padding", "pad": ""}
    pad["pad"] = "x" * (slack - len(json.dumps(pad)) - 1 - 8)
    with open(path, "a") as f:
        f.write(json.dumps(pad) + "\n")


def test_a_hooked_line_refused_by_a_full_disk_is_written_later_and_the_hook_not_rerun(
    disk: Disk, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from test_hook_jobs import hook_runs, passes_until, script

    from lrwatch.daemon.notify import HookRunner

    release = tmp_path / "release"
    hook = script(tmp_path, "slow", f"while not os.path.exists({str(release)!r}): time.sleep(0.01)")
    run_dir = new_run(disk)
    with HookRunner([hook], timeout=60) as runner:
        run = WatchedRun(run_dir, analyzer_factory=LossAbove, mode="apply")
        run_once(run, rails=RAILS, hooks=runner)  # two decision lines; both hooks start
        fill_last_page(run_dir / "lrwatch_audit.jsonl")
        disk.fill()
        release.touch()  # the hooks end on a full disk: their hooked lines are refused
        passes_until(
            run, runner, lambda: "hooked line waits" in caplog.text and run.hook_jobs.idle is False
        )
        passes_until(run, runner, lambda: not any(j.running for j in run.hook_jobs.jobs.values()))
        assert [r for r in read_audit(run_dir) if r["event"] == "hooked"] == []
        assert "hooked line waits" in caplog.text
        disk.free()
        passes_until(run, runner, lambda: run.hook_jobs.idle)
        run.close()
        again = WatchedRun(run_dir, analyzer_factory=LossAbove, mode="apply")
        run_once(again, rails=RAILS, hooks=runner)
        assert again.hook_jobs.idle  # nothing owed after a restart: no second run
        again.close()
    ids = sorted(r["decision_id"] for r in read_audit(run_dir) if r["event"] == "decision")
    ok = sorted(r["decision_id"] for r in read_audit(run_dir) if r["event"] == "hooked")
    assert len(ids) == 2 and ok == ids and sorted(i for i, _ in hook_runs(tmp_path)) == ids
