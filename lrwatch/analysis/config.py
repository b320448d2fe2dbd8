"""The analyzer's settings: a TOML file mapped onto the detectors' and the policy's constructors.

One table per detector or policy, each key a constructor argument; the defaults live on those
classes and nowhere else, so a key left out means "the documented default"::

    metric = "val/loss"          # the monitored metric (default: validation loss if logged)

    [explosion]
    z_warning = 8.0

    [plateau]                    # the best-so-far rule on the monitored metric
    patience = 10

    [policy]
    cooldown_steps = 200

An unknown table or key is a :class:`~lrwatch.errors.ConfigError` that lists the valid ones, and
every object is built once here, so a bad value fails before any run is read. Command-line
options are merged on top of the file (see :func:`load_config`): there is no other layer.
"""

from __future__ import annotations

import inspect
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lrwatch.analysis.detectors.amp import AmpDetector
from lrwatch.analysis.detectors.divergence import DivergenceDetector
from lrwatch.analysis.detectors.explosion import ExplosionDetector
from lrwatch.analysis.detectors.nonfinite import NonfiniteDetector
from lrwatch.analysis.detectors.oscillation import OscillationDetector
from lrwatch.analysis.detectors.overfit import OverfitDetector
from lrwatch.analysis.detectors.plateau import PlateauTracker, PlateauTrend
from lrwatch.analysis.detectors.ratio import RatioDetector
from lrwatch.analysis.detectors.schedule import ScheduleDetector
from lrwatch.analysis.detectors.slow_progress import SlowProgressDetector
from lrwatch.errors import ConfigError
from lrwatch.policy.policy import Policy

# Table name -> the class its keys are constructor arguments of.
TABLES: Mapping[str, Callable[..., Any]] = MappingProxyType(
    {
        "nonfinite": NonfiniteDetector,
        "explosion": ExplosionDetector,
        "divergence": DivergenceDetector,
        "plateau": PlateauTracker,
        "plateau_trend": PlateauTrend,
        "oscillation": OscillationDetector,
        "ratio": RatioDetector,
        "slow_progress": SlowProgressDetector,
        "overfit": OverfitDetector,
        "amp": AmpDetector,
        "schedule": ScheduleDetector,
        "policy": Policy,
    }
)
# Constructor arguments that are state or wiring, not settings.
_NOT_SETTINGS = frozenset({"self", "lr"})


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class AnalyzerConfig:
    """Everything a :class:`~lrwatch.analysis.analyzer.RunAnalyzer` needs, validated.

    Stateless detectors are built here; the stateful plateau tracker and policy are kept as
    checked keyword arguments, because every run gets fresh ones.
    """

    metric: str | None = None
    nonfinite: NonfiniteDetector = field(default_factory=NonfiniteDetector)
    explosion: ExplosionDetector = field(default_factory=ExplosionDetector)
    divergence: DivergenceDetector = field(default_factory=DivergenceDetector)
    plateau_trend: PlateauTrend = field(default_factory=PlateauTrend)
    oscillation: OscillationDetector = field(default_factory=OscillationDetector)
    ratio: RatioDetector = field(default_factory=RatioDetector)
    slow_progress: SlowProgressDetector = field(default_factory=SlowProgressDetector)
    overfit: OverfitDetector = field(default_factory=OverfitDetector)
    amp: AmpDetector = field(default_factory=AmpDetector)
    schedule: ScheduleDetector = field(default_factory=ScheduleDetector)
    plateau: Mapping[str, Any] = field(default_factory=_empty)
    policy: Mapping[str, Any] = field(default_factory=_empty)

    def new_plateau(self) -> PlateauTracker:
        return PlateauTracker(**self.plateau)

    def new_policy(self) -> Policy:
        return Policy(**self.policy)


def settings_of(table: str) -> list[str]:
    """The keys a table accepts: its class's keyword parameters."""
    params = inspect.signature(TABLES[table]).parameters.values()
    return [
        p.name
        for p in params
        if p.name not in _NOT_SETTINGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _build(table: str, values: Mapping[str, Any]) -> Any:
    """Construct ``table``'s class from ``values``; any complaint becomes a ConfigError."""
    valid = settings_of(table)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"[{table}] has no setting {', '.join(map(repr, unknown))}; valid keys: "
            f"{', '.join(valid)}"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return TABLES[table](**kwargs)
    except ConfigError as err:
        raise ConfigError(f"[{table}] {err}") from None
    except (TypeError, ValueError) as err:  # a wrong type reaching a constructor
        raise ConfigError(f"[{table}] {err}") from None


def build_config(doc: Mapping[str, Any]) -> AnalyzerConfig:
    """An :class:`AnalyzerConfig` from a parsed document (TOML tables plus ``metric``)."""
    tables: dict[str, Any] = {}
    metric = doc.get("metric")
    if metric is not None and not (isinstance(metric, str) and metric):
        raise ConfigError(f"metric must be a tag name such as 'val/loss', got {metric!r}")
    for name, values in doc.items():
        if name == "metric":
            continue
        if name not in TABLES:
            raise ConfigError(
                f"unknown setting {name!r}; valid: metric, " + ", ".join(f"[{t}]" for t in TABLES)
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"{name!r} must be a table ([{name}]), got {values!r}")
        built = _build(name, values)
        tables[name] = dict(values) if name in ("plateau", "policy") else built
    for name in ("plateau", "policy"):
        if name in tables:
            tables[name] = MappingProxyType(tables[name])
    return AnalyzerConfig(metric=metric, **tables)


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top, one table level deep (CLI options over the file)."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def load_config(
    path: Path | None = None, *, overrides: Mapping[str, Any] | None = None
) -> AnalyzerConfig:
    """Read ``path`` (TOML; None for all defaults) and apply ``overrides`` on top."""
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return build_config(merge(doc, overrides or {}))
