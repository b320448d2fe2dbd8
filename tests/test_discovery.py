"""RunFinder against find_runs (an independent os.walk), through creations and removals."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from lrwatch.daemon.discovery import RunFinder
from lrwatch.events.reader import find_runs
from lrwatch.schema import DAEMON_SUBRUN


def touch_events(run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / f"events.out.tfevents.{random.random()}.host").write_bytes(b"")


_dated = iter(range(10**6))


def age_tree(root: Path) -> None:
    """Date every directory back: the finder then trusts unchanged mtimes (no 'recent' relist).

    Each call uses a new date, as time moves on: a change always moves a directory's mtime.
    """
    when = 1e9 + next(_dated)
    for d, _, _ in os.walk(root):
        os.utime(d, (when, when))


@pytest.mark.parametrize("seed", range(5))
def test_run_finder_should_find_what_find_runs_finds_as_the_tree_changes(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    finder = RunFinder([tmp_path])
    dirs = [tmp_path / "a", tmp_path / "b" / "c", tmp_path / "b" / "d" / "e", tmp_path]
    for _ in range(12):
        target = rng.choice(dirs) / rng.choice(["", "x", "y/z"])
        action = rng.choice(["run", "run", "dir", "rm", "daemon"])
        if action == "run":
            touch_events(target)
        elif action == "dir":
            target.mkdir(parents=True, exist_ok=True)
        elif action == "daemon":  # the daemon's own sub-run is never a run
            touch_events(target / DAEMON_SUBRUN)
        elif target != tmp_path:
            shutil.rmtree(target, ignore_errors=True)
        if rng.random() < 0.5:
            age_tree(tmp_path)
        finder.check_all()
        assert sorted(map(Path, finder.runs)) == find_runs(tmp_path)


def test_run_finder_should_list_only_directories_that_changed(tmp_path: Path) -> None:
    for i in range(3):
        touch_events(tmp_path / f"run{i}")
    age_tree(tmp_path)
    finder = RunFinder([tmp_path])
    assert finder.check_all() == []
    assert sorted(finder.take_new_runs()) == [str(tmp_path / f"run{i}") for i in range(3)]
    assert not any(finder.check(str(tmp_path / f"run{i}")) for i in range(3))  # one stat each
    assert not finder.check(str(tmp_path))
    touch_events(tmp_path / "run1" / "sub")  # a run inside a run
    assert finder.check(str(tmp_path / "run1"))
    assert finder.take_new_runs() == [str(tmp_path / "run1" / "sub")]


def test_run_finder_should_report_a_missing_logdir_and_find_it_once_created(
    tmp_path: Path,
) -> None:
    finder = RunFinder([tmp_path / "later"])
    assert finder.check_all() == [str(tmp_path / "later")]
    touch_events(tmp_path / "later" / "r")
    assert finder.check_all() == []
    assert finder.take_new_runs() == [str(tmp_path / "later" / "r")]


def test_run_finder_forget_run_should_find_the_run_again(tmp_path: Path) -> None:
    touch_events(tmp_path / "r")
    age_tree(tmp_path)
    finder = RunFinder([tmp_path])
    finder.check_all()
    assert finder.take_new_runs() == [str(tmp_path / "r")]
    finder.forget_run(str(tmp_path / "r"))
    finder.check_all()
    assert finder.take_new_runs() == [str(tmp_path / "r")]
