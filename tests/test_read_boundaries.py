"""Issue 9, defect 1: the daemon's decisions do not depend on where its reads stop.

A real hooked training run (``tests/chaos_trainer.py``: ``val/loss`` through ``mon.log`` reaches
the event file before the step's batched rows) is replayed through the daemon in prefixes cut at
record boundaries, restarting the daemon from its saved state at every cut, and the decision
lines are compared with those of one pass over the whole file.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lrwatch.analysis.analyzer import RunAnalyzer
from lrwatch.daemon.outputs import read_audit
from lrwatch.daemon.rails import Rails
from lrwatch.daemon.watched_run import WatchedRun, run_once
from lrwatch.schema import DAEMON_SUBRUN

TRAINER = Path(__file__).with_name("chaos_trainer.py")
RAILS = Rails(cooldown=20, budget=10, window=1000)
STRIDE = 16  # records between two cuts in CI


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("real") / "run"
    subprocess.run(
        [sys.executable, str(TRAINER), str(run_dir), "400", "--lr", "0.5", "--val-every", "10"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return run_dir


def event_file(run_dir: Path) -> Path:
    [path] = run_dir.glob("events.out.tfevents.*")
    return path


def record_ends(data: bytes) -> list[int]:
    """Offsets just past each TFRecord (8-byte length, 4-byte crc, data, 4-byte crc)."""
    ends, at = [], 0
    while at + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        at += 12 + length + 4
        ends.append(at)
    return ends


def decisions(run_dir: Path) -> list[tuple[int, str, object, str]]:
    return [
        (r["step"], r["action"], r.get("factor", r.get("max_norm")), r["reason"])
        for r in read_audit(run_dir)
        if r["event"] == "decision"
    ]


def replay(source: Path, target: Path, cuts: list[int], mode: str = "apply") -> None:
    """Grow a copy of ``source``'s event file to each cut; one daemon process per cut."""
    target.mkdir()
    data = event_file(source).read_bytes()
    copy = target / event_file(source).name
    copy.write_bytes(b"")
    for cut in cuts:
        with open(copy, "ab") as f:
            f.write(data[copy.stat().st_size : cut])
        run = WatchedRun(target, analyzer_factory=RunAnalyzer, mode=mode)  # type: ignore[arg-type]
        run_once(run, rails=RAILS)
        run.close()


def test_the_real_run_mixes_logged_values_ahead_of_their_rows(real_run: Path) -> None:
    """The premise: some val/loss record precedes a lower step's loss row in the file."""
    from lrwatch.events.reader import read_run

    order = [(s.tag, s.step) for s in read_run(real_run)]
    first_val = next(i for i, (tag, _) in enumerate(order) if tag == "val/loss")
    val_step = order[first_val][1]
    assert any(tag == "lrwatch/loss" and step < val_step for tag, step in order[first_val:])


@pytest.mark.slow
def test_every_prefix_cut_gives_the_decisions_of_one_pass(real_run: Path, tmp_path: Path) -> None:
    data = event_file(real_run).read_bytes()
    ends = record_ends(data)
    replay(real_run, tmp_path / "whole", [len(data)])
    expected = decisions(tmp_path / "whole")
    assert expected, "the real run should lead to at least one decision"
    # Cuts every STRIDE records, from two offsets: most end inside a batch of rows, many
    # between a logged val/loss and the rows of its step. bench/chaos.py --boundaries runs
    # every record boundary.
    for offset in (0, STRIDE // 2):
        replay(real_run, tmp_path / f"cut{offset}", ends[offset::STRIDE] + [len(data)])
        assert decisions(tmp_path / f"cut{offset}") == expected, f"offset {offset}"


@pytest.mark.slow
def test_a_rolled_back_state_adopts_the_action_it_already_issued(
    real_run: Path, tmp_path: Path
) -> None:
    """The deterministic replay of defect 1: state saved early, a later read issues a cut and
    is lost (SIGKILL before the audit line), the daemon restarts from the early state."""
    data = event_file(real_run).read_bytes()
    ends = record_ends(data)
    replay(real_run, tmp_path / "whole", [len(data)])
    [first, *_] = decisions(tmp_path / "whole")
    run_dir = tmp_path / "run"
    # Find the first cut at which the decision has been issued.
    early = ends[len(ends) // 4]
    replay(real_run, run_dir, [early])
    saved = (run_dir / DAEMON_SUBRUN / "state.json").read_bytes()
    later = next(c for c in ends[::STRIDE] if c > early and _issues(real_run, run_dir, c))
    (run_dir / DAEMON_SUBRUN / "state.json").write_bytes(saved)
    audit = run_dir / "lrwatch_audit.jsonl"
    audit.write_bytes(b"")  # killed before its decision line
    assert later > early
    copy = run_dir / event_file(real_run).name
    with open(copy, "ab") as f:
        f.write(data[copy.stat().st_size :])
    run = WatchedRun(run_dir, analyzer_factory=RunAnalyzer, mode="apply")
    run_once(run, rails=RAILS)
    run.close()
    got = decisions(run_dir)
    # The adopted action's line is written first, before the restarted analysis reaches any
    # earlier advice (a raise-LR advice at step 150 here): the same decisions, none twice.
    assert sorted(got) == sorted(decisions(tmp_path / "whole"))
    assert first in got


def _issues(source: Path, run_dir: Path, cut: int) -> bool:
    """Grow the copy to ``cut`` and run the daemon once; True once an action was issued."""
    data = event_file(source).read_bytes()
    copy = run_dir / event_file(source).name
    with open(copy, "ab") as f:
        f.write(data[copy.stat().st_size : cut])
    run = WatchedRun(run_dir, analyzer_factory=RunAnalyzer, mode="apply")
    run_once(run, rails=RAILS)
    run.close()
    return (run_dir / "lrwatch_control.json").exists()


def test_replay_helpers_cut_at_record_boundaries(real_run: Path, tmp_path: Path) -> None:
    data = event_file(real_run).read_bytes()
    assert record_ends(data)[-1] == len(data)
    shutil.copytree(real_run, tmp_path / "copy")
