"""`lrwatch analyze`: the table, the JSON document, options, and clear failures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from torch.utils.tensorboard import SummaryWriter

from lrwatch import schema
from lrwatch.cli import main

ROOT = Path(__file__).resolve().parent.parent


def write_diverging_run(run_dir: Path) -> Path:
    """A plain SummaryWriter run (no lrwatch tags): a steady loss, then growth to NaN."""
    with SummaryWriter(str(run_dir)) as w:
        for step in range(1, 301):
            loss = 1.0 + 0.05 * math.sin(step * 1.7)
            gn = 1.0 + 0.05 * math.cos(step * 2.3)
            if step > 200:
                k = step - 200
                loss, gn = (loss * 1.5**k, gn * 2.0**k) if k < 80 else (math.nan, math.nan)
            w.add_scalar("train/loss", loss, step)
            w.add_scalar("train/grad_norm", gn, step)
            w.add_scalar("train/learning_rate", 0.1, step)
    return run_dir


@pytest.fixture(scope="module")
def diverging(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_diverging_run(tmp_path_factory.mktemp("runs") / "diverging")


def test_cli_analyze_prints_a_table_of_findings_and_decisions(diverging: Path) -> None:
    result = CliRunner().invoke(main, ["analyze", str(diverging)])
    assert result.exit_code == 0, result.output
    assert "explosion (" in result.output and "nonfinite (critical)" in result.output
    assert "decision" in result.output and "lr_cut /" in result.output
    assert "advice only" in result.output
    steps = [
        int(line.split()[0]) for line in result.output.splitlines() if line[:8].strip().isdigit()
    ]
    assert steps == sorted(steps)  # step by step


def test_cli_analyze_json_is_the_stable_document(diverging: Path) -> None:
    result = CliRunner().invoke(main, ["analyze", str(diverging), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["run"] == str(diverging) and doc["metric"] == "train/loss"
    assert doc["version"] == schema.ANALYSIS_VERSION
    kinds = {k.value for k in schema.Kind}
    actions = {a.value for a in schema.ActionKind} - {"undo"}
    assert doc["findings"] and doc["decisions"]
    for f in doc["findings"]:
        assert {"kind", "step", "tag", "severity", "evidence"} <= f.keys() and f["kind"] in kinds
    for d in doc["decisions"]:
        assert {"step", "action", "reason"} <= d.keys() and d["action"] in actions
        assert ("factor" in d) == (d["action"] == "lr_cut")
        assert ("max_norm" in d) == (d["action"] == "clip")
    nan_step = 280
    assert min(f["step"] for f in doc["findings"] if f["kind"] == "nonfinite") == nan_step
    assert min(f["step"] for f in doc["findings"] if f["kind"] == "explosion") < nan_step


def test_cli_analyze_options_and_config_file_change_the_outcome(
    diverging: Path, tmp_path: Path
) -> None:
    def explosions(*args: str) -> int:
        result = CliRunner().invoke(main, ["analyze", str(diverging), "--json", *args])
        assert result.exit_code == 0, result.output
        return min(
            f["step"] for f in json.loads(result.output)["findings"] if f["kind"] == "explosion"
        )

    config = tmp_path / "lrwatch.toml"
    config.write_text(
        "[explosion]\nmin_ratio = 50.0\ncritical_ratio = 100.0\ngrowth_factor = 1e6\n"
    )
    default = explosions()
    assert explosions("--config", str(config)) > default
    assert explosions("--set", "explosion.min_ratio=50.0", "--set", "explosion.critical_ratio=100",
                      "--set", "explosion.growth_factor=1e6") > default  # fmt: skip
    # the command line beats the file
    assert explosions("--config", str(config), "--set", "explosion.min_ratio=2.0",
                      "--set", "explosion.growth_factor=100.0") == default  # fmt: skip


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--set", "explosion.windw=3"], 2, ["windw", "window"]),
        (["--set", "nonsense"], 2, ["TABLE.KEY=VALUE"]),
        (["--patience", "0"], 2, ["--patience"]),
    ],
    ids=["unknown-key", "malformed-set", "bad-patience"],
)
def test_cli_analyze_rejects_bad_options(
    diverging: Path, args: list[str], code: int, words: list[str]
) -> None:
    result = CliRunner().invoke(main, ["analyze", str(diverging), *args])
    assert result.exit_code == code
    for word in words:
        assert word in result.output


def test_cli_analyze_missing_empty_and_unusable_runs_fail_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with SummaryWriter(str(tmp_path / "odd")) as w:
        w.add_scalar("accuracy", 0.5, 1)
    for run, words, code in [
        ("missing", "does not exist", 2),  # not a run: usage
        ("empty", "holds no event files", 2),
        ("odd", "no tag lrwatch can analyse", 1),  # a run lrwatch cannot analyse
    ]:
        result = CliRunner().invoke(main, ["analyze", str(tmp_path / run)])
        assert result.exit_code == code
        assert words in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_cli_analyze_metric_option_must_name_a_tag_of_the_run(diverging: Path) -> None:
    result = CliRunner().invoke(main, ["analyze", str(diverging), "--json", "--metric", "x/y"])
    assert result.exit_code == 1 and "no tag 'x/y'" in result.output
    result = CliRunner().invoke(
        main, ["analyze", str(diverging), "--json", "--metric", "train/grad_norm"]
    )
    assert result.exit_code == 0 and json.loads(result.output)["metric"] == "train/grad_norm"


def test_cli_analyze_runs_as_a_real_subprocess(diverging: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(  # one real process: the console entry point, stdout, exit code
        [sys.executable, "-m", "lrwatch", "analyze", str(diverging), "--json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert {f["kind"] for f in json.loads(proc.stdout)["findings"]} >= {"explosion", "nonfinite"}
