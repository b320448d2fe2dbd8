"""``lrwatch report``: one picture of a run, with every finding and decision on the step axis.

Four panels share the step axis: the loss (train and validation), the effective LR, the global
gradient norm (with the pre-clip norm and the clip threshold when lrwatch clipped) and the
update/weight ratio against its healthy band (1e-4..1e-2, line at 1e-3). Findings are triangles
coloured by severity, decisions dashed lines across all panels; both are numbered (F1, D1) and
the numbers are explained below the plot. :func:`report_data` computes everything that is drawn,
so tests check the data without looking at pixels. Decisions come from the daemon's audit log
when it ran (what it really did), else from replaying the analyzer (what it would advise).

matplotlib is an optional extra (``pip install 'lrwatch[report]'``), imported only to draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from lrwatch import schema
from lrwatch.errors import ConfigError
from lrwatch.views.status import Snapshot, describe, load_snapshot

MAX_POINTS = 4000  # per series: beyond this, min/max per bucket (spikes survive thinning)
BAND = (1e-4, 1e-3, 1e-2)  # update/weight ratio: low edge, healthy centre, high edge
SEVERITY_COLOR = {"info": "tab:blue", "warning": "tab:orange", "critical": "tab:red"}
PANELS = ("loss", "lr", "grad_norm", "update_ratio")


@dataclass(frozen=True)
class Marker:
    """One finding or decision as drawn: ``label`` on the plot, ``reason`` in the key below it."""

    step: int
    kind: Literal["finding", "decision"]
    label: str  # "F3" or "D1"
    what: str  # "explosion (critical) on loss" or "lr_cut /5"
    reason: str  # short, one line
    detail: str  # the full message or reason (HTML table)
    severity: str  # finding severity; "decision" for decisions
    applied: bool | None = None  # decisions from the audit log: written to the control file
    applied_step: int | None = None  # the step the hook acknowledged applying it, when it did


@dataclass(frozen=True)
class ReportData:
    """Everything the report draws: series by name, the tag each came from, the markers."""

    run: str
    series: dict[str, tuple[list[int], list[float]]]
    tags: dict[str, str]
    markers: list[Marker]
    source: Literal["audit", "analysis"]


def report_data(run_dir: Path, *, config: Any = None) -> ReportData:
    """Read the run once and compute the plotted series and markers."""
    snap = load_snapshot(Path(run_dir), config=config)
    tags = _tags(snap)
    series = {name: snap.series[tag] for name, tag in tags.items()}
    markers = _finding_markers(snap) + _decision_markers(snap, _ack_steps(snap))
    return ReportData(
        run=str(run_dir),
        series=series,
        tags=tags,
        markers=sorted(markers, key=lambda m: (m.step, m.kind != "finding")),
        source="audit" if snap.from_audit else "analysis",
    )


def _tags(snap: Snapshot) -> dict[str, str]:
    """Series name -> tag: lrwatch's own tags, else the aliases other loggers use."""
    wanted = {
        "loss": snap.roles.get("loss"),
        "val_loss": snap.roles.get("metric"),
        "lr": snap.roles.get("lr"),
        "grad_norm": snap.roles.get("grad_norm"),
        "grad_norm_preclip": schema.GRAD_NORM_PRECLIP,
        "clip_max_norm": schema.CLIP_MAX_NORM,
        "update_ratio": snap.roles.get("update_ratio"),
    }
    if wanted["val_loss"] == wanted["loss"]:
        wanted["val_loss"] = None
    return {name: tag for name, tag in wanted.items() if tag is not None and tag in snap.series}


def _short(text: str, limit: int = 90) -> str:
    text = text.replace(schema.PREFIX + "/", "").split(" (")[0].strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _finding_markers(snap: Snapshot) -> list[Marker]:
    out = []
    for i, f in enumerate(sorted(snap.findings, key=lambda f: f.step), start=1):
        tag = f.tag.replace(schema.PREFIX + "/", "")
        out.append(
            Marker(
                step=f.step,
                kind="finding",
                label=f"F{i}",
                what=f"{f.kind.value} ({f.severity.value}) on {tag}",
                reason=_short(f.message.removeprefix(f"{f.tag}: ") or f.kind.value),
                detail=f.message,
                severity=f.severity.value,
            )
        )
    return out


def _ack_steps(snap: Snapshot) -> dict[int, int]:
    """Action id -> the first step whose events carry the hook's acknowledgement of it."""
    out: dict[int, int] = {}
    for step, value in zip(*snap.series.get(schema.CONTROL_ACK, ([], [])), strict=True):
        if math.isfinite(value):
            out.setdefault(int(value), step)
    return out


def _decision_markers(snap: Snapshot, acks: dict[int, int]) -> list[Marker]:
    out = []
    for i, doc in enumerate(sorted(snap.decisions, key=lambda d: int(d["step"])), start=1):
        seen: dict[str, None] = {}
        for f in doc.get("findings", []):
            seen[f"{f['kind']} on {str(f['tag']).replace(schema.PREFIX + '/', '')}"] = None
        reason = ", ".join(seen) if seen else _short(str(doc.get("reason", "")))
        applied = bool(doc["applied"]) if "applied" in doc else None
        out.append(
            Marker(
                step=int(doc["step"]),
                kind="decision",
                label=f"D{i}",
                what=describe(doc),
                reason=reason,
                detail=str(doc.get("reason", "")),
                severity="decision",
                applied=applied,
                applied_step=acks.get(int(doc["action_id"])) if doc.get("action_id") else None,
            )
        )
    return out


def thin(
    steps: Sequence[int], values: Sequence[float], limit: int = MAX_POINTS
) -> tuple[list[int], list[float]]:
    """At most about ``limit`` points: per bucket the min and the max, so spikes stay visible."""
    n = len(steps)
    if n <= limit:
        return list(steps), list(values)
    size = math.ceil(n / (limit // 2))
    keep: list[int] = []
    for start in range(0, n, size):
        idx = range(start, min(start + size, n))
        finite = [i for i in idx if math.isfinite(values[i])] or list(idx)
        lo = min(finite, key=values.__getitem__)
        hi = max(finite, key=values.__getitem__)
        keep.extend(sorted({lo, hi}))
    return [steps[i] for i in keep], [values[i] for i in keep]


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a ConfigError naming the fix."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError(
            "lrwatch report needs matplotlib: pip install 'lrwatch[report]' (or matplotlib)"
        ) from err
    return plt


_WHITE = {"facecolor": "white", "edgecolor": "none", "pad": 0.4}  # labels over the lines
MAX_KEY = 40  # lines of the key under the plot; the HTML table lists everything


def key_lines(markers: Sequence[Marker]) -> list[str]:
    """The explanation of each numbered marker, one line each (capped at ``MAX_KEY``)."""
    lines = []
    for m in markers:
        status = ""
        if m.applied_step is not None:
            status = f" [applied at step {m.applied_step}]"
        elif m.applied is not None:
            status = " [applied]" if m.applied else " [recommended]"
        lines.append(f"{m.label:>4} step {m.step:>7}  {m.what}{status}: {m.reason}")
    if len(lines) > MAX_KEY:
        lines = [
            *lines[: MAX_KEY - 1],
            f"     … {len(lines) - MAX_KEY + 1} more (see the HTML report)",
        ]
    return lines


def _groups(markers: Sequence[Marker], span: float) -> list[tuple[float, str]]:
    """Labels of nearby markers of one kind merged ("F3-F6"), so they do not overprint."""
    out: list[tuple[float, str]] = []
    run: list[Marker] = []
    for m in [*markers, None]:
        if run and (m is None or m.step - run[0].step > 0.02 * span):
            name = run[0].label if len(run) == 1 else f"{run[0].label}-{run[-1].label[1:]}"
            out.append(((run[0].step + run[-1].step) / 2, name))
            run = []
        if m is not None:
            run.append(m)
    return out


def _log_if_wide(ax: Any, values: Sequence[float]) -> None:
    """Log scale for a series spanning decades; a blow-up leaves the chart past 1e4x its median,
    so the healthy part of the run stays readable."""
    finite = sorted(v for v in values if math.isfinite(v))
    if finite and finite[0] > 0 and finite[-1] / finite[0] > 30:
        ax.set_yscale("log")
        median = finite[len(finite) // 2]
        if finite[-1] > 1e4 * median:
            ax.set_ylim(finite[0] / 2, 1e4 * median)


def _line(
    ax: Any,
    data: ReportData,
    name: str,
    *,
    hold_to: int | None = None,
    zero_is_gap: bool = False,
    **style: Any,
) -> None:
    """Plot one series; ``hold_to`` extends a value logged only when it changes (the clip
    threshold) to that step, since it stays in force until the next change; with
    ``zero_is_gap`` a 0 breaks the line (nothing in force) instead of drawing it at 0."""
    if name in data.series:
        steps, values = thin(*data.series[name])
        if zero_is_gap:
            values = [math.nan if v == 0 else v for v in values]
        if hold_to is not None and steps and steps[-1] < hold_to:
            steps, values = [*steps, hold_to], [*values, values[-1]]
        ax.plot(steps, values, label=f"{style.pop('label', name)} ({data.tags[name]})", **style)


def _panels(axes: Sequence[Any], data: ReportData) -> None:
    loss, lr, grad, ratio = axes
    end = max((steps[-1] for steps, _ in data.series.values() if steps), default=0)
    _line(loss, data, "loss", color="tab:blue", lw=0.8, label="train loss")
    _line(loss, data, "val_loss", color="tab:green", lw=1.4, marker="o", ms=3, label="validation")
    bad = [
        s for s, v in zip(*data.series.get("loss", ([], [])), strict=True) if not math.isfinite(v)
    ]
    if bad:
        loss.plot(  # at the top edge: a non-finite value has no place on the axis
            bad,
            [0.97] * len(bad),
            "x",
            color="tab:red",
            transform=loss.get_xaxis_transform(),
            label="non-finite loss",
        )
    _log_if_wide(loss, data.series.get("loss", ([], []))[1])
    _line(lr, data, "lr", color="tab:purple", lw=1.2, drawstyle="steps-post", label="effective LR")
    _line(grad, data, "grad_norm_preclip", color="0.6", lw=0.8, ls="--", label="before clipping")
    _line(grad, data, "grad_norm", color="tab:blue", lw=0.8, label="grad norm")
    _line(
        grad,
        data,
        "clip_max_norm",
        zero_is_gap=True,  # 0 means "no clip in force", not a threshold at 0
        hold_to=end,
        color="tab:red",
        lw=1.2,
        drawstyle="steps-post",
        label="clip threshold",
    )
    ratio.axhspan(BAND[0], BAND[2], color="tab:green", alpha=0.12, label="healthy band 1e-4..1e-2")
    ratio.axhline(BAND[1], color="tab:green", ls="--", lw=1.0, label="1e-3")
    _line(ratio, data, "update_ratio", color="tab:blue", lw=0.8, label="update/weight ratio")
    scaled = ((lr, ("lr",)), (grad, ("grad_norm", "grad_norm_preclip")), (ratio, ("update_ratio",)))
    for ax, names in scaled:  # a pre-clip spike of 1e6 must not flatten the clipped norms
        _log_if_wide(ax, [v for n in names for v in data.series.get(n, ([], []))[1]])
    ratio.set_yscale("log")  # the band spans two decades
    for ax, title in zip(
        axes, ("loss", "learning rate", "gradient norm", "update / weight"), strict=True
    ):
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=7, framealpha=0.8)
        else:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", color="0.5")
    ratio.set_xlabel("step")


def _timeline(strip: Any, axes: Sequence[Any], data: ReportData, span: float) -> None:
    """Findings (triangles) and decisions (dashed lines) on every panel, labelled in the strip."""
    strip.set_ylim(0, 1)
    strip.set_yticks([])
    strip.set_ylabel("events", rotation=0, ha="right", va="center")
    findings = [m for m in data.markers if m.kind == "finding"]
    decisions = [m for m in data.markers if m.kind == "decision"]
    for m in findings:
        color = SEVERITY_COLOR.get(m.severity, "0.4")
        strip.plot([m.step], [0.12], "v", color=color, ms=7)
        for ax in axes:
            ax.axvline(m.step, color=color, lw=0.6, alpha=0.35)
    for m in decisions:
        for ax in (strip, *axes):
            ax.axvline(m.step, color="black", lw=1.1, ls=(0, (4, 2)), alpha=0.8)
        if m.applied_step is not None and m.applied_step != m.step:  # where the trainer acted
            for ax in (strip, *axes):
                ax.axvline(m.applied_step, color="tab:green", lw=1.0, alpha=0.8)
    for x, text in _groups(findings, span):
        strip.text(x, 0.3, text, ha="center", va="bottom", fontsize=7, color="0.25", bbox=_WHITE)
    for x, text in _groups(decisions, span):
        strip.text(x, 0.62, text, ha="center", va="bottom", fontsize=8, weight="bold", bbox=_WHITE)
    strip.text(  # the legend of the strip's own line styles
        1.0, 1.02, "dashed: decided   green: applied by the trainer", transform=strip.transAxes,
        ha="right", va="bottom", fontsize=7, color="0.3",
    )  # fmt: skip


def draw(
    data: ReportData, out: Path | IO[bytes], *, fmt: str | None = None, dpi: int = 110
) -> None:
    """Draw the report into ``out``: a path (format from its suffix) or a binary file."""
    plt = pyplot()
    key = key_lines(data.markers) or ["no findings, no decisions"]
    fig = plt.figure(figsize=(13, 10 + 0.17 * len(key)))
    grid = fig.add_gridspec(
        6, 1, height_ratios=[0.8, 3, 2, 2, 2, 0.4 + 0.2 * len(key)], hspace=0.15
    )
    strip = fig.add_subplot(grid[0])
    axes = [fig.add_subplot(grid[i], sharex=strip) for i in range(1, 5)]
    try:
        _panels(axes, data)
        steps = [s for st, _ in data.series.values() for s in (st[:1] + st[-1:])]
        steps += [m.step for m in data.markers]
        lo, hi = (min(steps), max(steps)) if steps else (0, 1)
        strip.set_xlim(lo, hi + max(1, (hi - lo) * 0.01))
        _timeline(strip, axes, data, span=max(hi - lo, 1))
        for ax in (strip, *axes[:-1]):
            ax.tick_params(labelbottom=False)
        keyax = fig.add_subplot(grid[5])
        keyax.axis("off")
        keyax.annotate(
            "\n".join(key),
            (0, 1),
            xycoords="axes fraction",
            xytext=(0, -22),  # below the x-axis label of the last panel
            textcoords="offset points",
            va="top",
            ha="left",
            family="monospace",
            fontsize=7.5,
        )
        n_f = sum(m.kind == "finding" for m in data.markers)
        n_d = len(data.markers) - n_f
        source = "daemon audit log" if data.source == "audit" else "analyzer replay"
        strip.set_title(
            f"lrwatch report: {data.run}\n{n_f} findings, {n_d} decisions (from the {source})",
            fontsize=10,
        )
        fig.savefig(out, format=fmt, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
