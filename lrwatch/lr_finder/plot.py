"""Picture of an LR range test: loss vs LR with every rule's suggestion marked.

matplotlib is an optional extra (``pip install lrwatch[report]``); it is imported only here, and
only when a plot is asked for, so ``import lrwatch`` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from lrwatch.errors import ConfigError
from lrwatch.lr_finder import suggest

COLORS = {"valley": "tab:green", "steepest": "tab:red", "min_div_10": "tab:purple"}
COLORS["blowup_fraction"] = "tab:orange"


class Curve(Protocol):
    """What a plot reads of a range test (an ``LRFinderResult``), so this module needs no import
    of the finder, which imports it lazily."""

    @property
    def lrs(self) -> Sequence[float]: ...
    @property
    def losses(self) -> Sequence[float]: ...
    @property
    def smoothed(self) -> Sequence[float]: ...
    @property
    def stop_reason(self) -> str: ...
    def suggest(self, rule: str = ...) -> suggest.Suggestion: ...


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window from a training script
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError(
            "result.plot() needs matplotlib: pip install matplotlib (or lrwatch[report])"
        ) from err
    return plt


def plot_result(result: Curve, path: Path) -> Path:
    """Write the plot to ``path`` (format from its suffix) and return the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        ax.plot(result.lrs, result.losses, color="0.75", lw=0.8, label="raw loss")
        ax.plot(result.lrs, result.smoothed, color="tab:blue", lw=1.6, label="smoothed")
        for rule in suggest.RULES:
            s = result.suggest(rule)
            if s.lr is None:
                continue
            chosen = rule == suggest.DEFAULT_RULE
            label = f"{rule}{' (suggestion)' if chosen else ''}: {s.lr:.2e}"
            ax.axvline(s.lr, color=COLORS[rule], ls="-" if chosen else "--", lw=1.2, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.set_title(f"LR range test ({result.stop_reason} after {len(result.lrs)} steps)")
        finite = [v for v in result.smoothed if v == v]
        if finite:  # keep the blow-up from squashing the interesting part of the curve
            ax.set_ylim(min(finite) * 0.95, min(max(finite), 3 * finite[0]) * 1.05)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
