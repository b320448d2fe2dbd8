"""What a real ``lrwatch serve`` process prints: the periodic summary, ``--json`` and ``--quiet``.

The oracles are independent of the daemon: TensorBoard's EventAccumulator counts the points of the
run, and the run's audit log holds the decisions the JSON stream must repeat.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import train

from lrwatch.daemon.outputs import read_audit
from lrwatch.daemon.tally import Counts, summary_line

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def diverged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A logdir with one finished run whose LR jumps to 3.0 at step 20 (it diverges)."""
    root = tmp_path_factory.mktemp("tally")
    train(root / "run", steps=40, blow_at=20)
    return root


def _copy(src: Path, dst: Path) -> Path:
    """A fresh copy of the run (each serve writes its own audit log and daemon state)."""
    import shutil

    shutil.copytree(src, dst)
    return dst


class Serve:
    """``python -m lrwatch serve ARGS`` with its stdout and stderr collected line by line."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "lrwatch", "serve", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.pumps = [
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for pump in self.pumps:
            pump.start()

    @staticmethod
    def _pump(stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line.rstrip("\n"))

    def wait_for(self, lines: list[str], text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(lines) if text in line]
            if found:
                return found[0]
            time.sleep(0.05)  # polling a list filled by the pump threads, bounded by timeout
        raise AssertionError(f"no {text!r} in {lines[-20:]}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        for pump in self.pumps:  # they end at the pipes' end of file
            pump.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _points(run: Path) -> int:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])


def test_summary_line_reads_as_a_sentence() -> None:
    line = summary_line(2, Counts(1234567, 3, 2, 1, 1), Counts(10, 0, 0, 0, 0), 612.0)
    assert line == (
        "summary: 2 run(s) watched; 1,234,567 points read, 3 finding(s) at warning or above, "
        "2 decision(s) (1 applied, 1 acknowledged); last 10 min: +10 points, +0 findings, "
        "+0 decisions"
    )


def test_serve_prints_a_periodic_summary_with_the_points_it_read(
    diverged: Path, tmp_path: Path
) -> None:
    logdir = tmp_path / "logs"
    run = _copy(diverged / "run", logdir / "run")
    serve = Serve(str(logdir), "--poll", "0.2", "--summary-every", "1")
    try:
        line = serve.wait_for(serve.err, "summary:")
        second = serve.wait_for(serve.err, "+0 points, +0 findings")  # later: nothing new
    finally:
        serve.stop()
    decisions = [r for r in read_audit(run) if r["event"] == "decision"]
    points = _points(run)
    assert f"1 run(s) watched; {points:,} points read" in line and f"+{points:,} points" in line
    assert f"{len(decisions)} decision(s) (0 applied, 0 acknowledged)" in second
    assert "recommend mode" in serve.out[0]


def test_serve_json_streams_the_decisions_of_the_audit_log(diverged: Path, tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    run = _copy(diverged / "run", logdir / "run")
    serve = Serve(str(logdir), "--once", "--json")  # one whole pass, then it exits
    try:
        assert serve.proc.wait(timeout=120) == 0
    finally:
        serve.stop()
    docs = [json.loads(line) for line in serve.out]  # every stdout line is JSON
    assert docs[0]["event"] == "start" and docs[0]["mode"] == "recommend"
    audit = [r for r in read_audit(run) if r["event"] == "decision"]
    assert [d for d in docs if d["event"] == "decision"] == audit
    findings = [d for d in docs if d["event"] == "finding"]
    assert findings and {f["severity"] for f in findings} <= {"warning", "critical"}
    assert all(f["decided"] or f["why_no_decision"] for f in findings)
    [summary] = [d for d in docs if d["event"] == "summary"]  # on the way out
    assert summary["total"]["decisions"] == len(audit)
    assert summary["total"]["points"] == _points(run)


def test_serve_quiet_prints_decisions_only(diverged: Path, tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    run = _copy(diverged / "run", logdir / "run")
    serve = Serve(str(logdir), "--poll", "0.2", "--quiet", "--summary-every", "0.5")
    try:
        serve.wait_for(serve.err, "recommended")
        time.sleep(1.5)  # three summary periods, had they not been silenced
    finally:
        serve.stop()
    assert serve.out == []  # no banner
    assert not any("summary:" in line or "watching run" in line for line in serve.err)
    decisions = [r for r in read_audit(run) if r["event"] == "decision"]
    assert len([line for line in serve.err if "recommended" in line]) == len(decisions)
