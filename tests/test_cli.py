"""The CLI catches the path mistakes people make, with one exit-code scheme for every command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_run
from click.testing import CliRunner

from lrwatch import schema
from lrwatch.cli import main


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log directory holding two real runs (one with validation loss)."""
    root = tmp_path_factory.mktemp("cli") / "runs_a"
    tiny_run.train(root / "exp1", steps=40)
    tiny_run.train(root / "exp2", steps=40)
    return root


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


RUN_COMMANDS = [
    ("analyze",),
    ("apply", "--lr-cut", "2"),
    ("report", "-o", "x.png"),
]


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=lambda c: c[0])
def test_a_command_needing_a_run_refuses_a_log_directory_and_names_its_runs(
    logdir: Path, command: tuple[str, ...], tmp_path: Path
) -> None:
    code, out = run(command[0], str(logdir), *command[1:])
    assert code == 2
    assert "log directory holding 2 run(s)" in out and "exp1" in out and "exp2" in out
    assert not (logdir / schema.CONTROL_FILENAME).exists()  # apply wrote nothing nobody reads


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=lambda c: c[0])
def test_a_command_needing_a_run_refuses_a_directory_without_one(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    code, out = run(command[0], str(tmp_path), *command[1:])
    assert code == 2 and "holds no event files" in out
    assert len(out.strip().splitlines()) == 1  # one line, no usage dump
    assert not (tmp_path / schema.CONTROL_FILENAME).exists()


@pytest.mark.parametrize(
    "command", [*RUN_COMMANDS, ("status",), ("serve", "--once")], ids=lambda c: c[0]
)
def test_every_command_gives_a_missing_directory_exit_code_2(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    missing = tmp_path / "nope"
    code, out = run(command[0], str(missing), *command[1:])
    assert code == 2 and "does not exist" in out


def test_analyze_suggests_the_tag_meant_by_a_typo(logdir: Path) -> None:
    code, out = run("analyze", str(logdir / "exp1"), "--metric", "val_loss")
    assert code == 1
    assert "did you mean 'val/loss'" in out
    # run-level tags come before per-layer ones in the list of what the run has
    assert out.index("lrwatch/loss") < out.index("lrwatch.grad_norm/")


def test_analyze_and_apply_accept_a_run(logdir: Path) -> None:
    assert run("analyze", str(logdir / "exp1"))[0] == 0
    code, out = run("apply", str(logdir / "exp1"), "--lr-cut", "2", "--reason", "test")
    assert code == 0 and (logdir / "exp1" / schema.CONTROL_FILENAME).exists()


def test_help_documents_the_exit_codes() -> None:
    code, out = run("--help")
    assert code == 0 and "Exit codes: 0 done; 1" in out


@pytest.mark.slow
def test_serve_prints_a_start_up_banner_with_mode_directories_and_runs(logdir: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrwatch", "serve", str(logdir), "--poll", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert "recommend mode" in first and "--apply to act" in first
    assert f"{logdir} (2 runs)" in second and "polling every 0.5 s" in second
