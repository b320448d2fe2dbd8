"""config.py: TOML tables map onto constructor kwargs; unknown keys and bad values fail early."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lrwatch.analysis.config import TABLES, AnalyzerConfig, build_config, load_config, settings_of
from lrwatch.analysis.detectors.explosion import ExplosionDetector
from lrwatch.analysis.detectors.plateau import PlateauTracker
from lrwatch.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lrwatch.toml"
    path.write_text(text)
    return path


def test_config_without_file_is_every_class_default() -> None:
    config = load_config()
    assert config == AnalyzerConfig()
    assert config.explosion == ExplosionDetector()
    assert config.metric is None
    plateau, fresh = config.new_plateau(), PlateauTracker()
    assert (plateau.patience, plateau.threshold) == (fresh.patience, fresh.threshold)


def test_config_file_tables_become_constructor_kwargs(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'metric = "eval/loss"\n[explosion]\nz_warning = 8.0\nwindow = 50\n'
        '[plateau]\npatience = 3\nmode = "min"\n',
    )
    config = load_config(path)
    assert config.metric == "eval/loss"
    assert config.explosion == ExplosionDetector(z_warning=8.0, window=50)
    assert config.new_plateau().patience == 3
    assert config.new_plateau() is not config.new_plateau()  # every run gets a fresh tracker


def test_config_overrides_beat_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[explosion]\nz_warning = 8.0\nwindow = 50\n")
    config = load_config(path, overrides={"explosion": {"z_warning": 9.0}, "metric": "val_loss"})
    assert config.explosion == ExplosionDetector(z_warning=9.0, window=50)
    assert config.metric == "val_loss"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[explosions]\nwindow = 3\n", ["explosions", "[explosion]", "[policy]"]),
        ("[explosion]\nwindw = 3\n", ["windw", "window", "z_warning"]),
        ("[plateau]\nlr = 0.1\n", ["'lr'", "patience"]),
        ("threshold = 3\n", ["threshold", "metric"]),
        ("[explosion]\nmin_history = 500\n", ["min_history"]),
        ('[explosion]\nwindow = "big"\n', ["[explosion]"]),
        ('[plateau]\nmode = "sideways"\n', ["sideways", "min"]),
        ("metric = 3\n", ["metric", "val/loss"]),
        ("explosion = 3\n", ["[explosion]"]),
        ("[explosion\n", ["not valid TOML"]),
    ],
    ids=[
        "unknown-table",
        "unknown-key",
        "state-is-not-a-setting",
        "top-level-key",
        "bad-value",
        "wrong-type",
        "bad-choice",
        "metric-not-a-string",
        "table-as-value",
        "broken-toml",
    ],
)
def test_config_errors_name_the_fix(tmp_path: Path, text: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    for name in names:
        assert name in str(err.value)


def test_config_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("table", sorted(TABLES))
def test_config_accepts_every_constructor_setting_at_its_default(table: str) -> None:
    cls = TABLES[table]
    default = cls()
    values = {name: getattr(default, name) for name in settings_of(table)}
    config = build_config({table: values})
    if dataclasses.is_dataclass(default):
        assert getattr(config, table) == default
    else:
        assert dict(getattr(config, table)) == values


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config().metric = "x"  # type: ignore[misc]
