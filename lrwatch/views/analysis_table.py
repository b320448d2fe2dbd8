"""The human view of an :class:`~lrwatch.schema.Analysis`: the table ``lrwatch analyze`` prints.

Presentation only: it reads a finished analysis and knows nothing of detectors or the policy.
"""

from __future__ import annotations

from lrwatch.schema import Analysis, Decision, Finding


def format_table(analysis: Analysis) -> str:
    """One line per finding and decision, in step order (findings first within a step)."""
    rows: list[tuple[int, int, int, str]] = []  # step, findings first, original order, line
    rows += [(f.step, 0, i, _finding_line(f)) for i, f in enumerate(analysis.findings)]
    rows += [(d.step, 1, i, _decision_line(d)) for i, d in enumerate(analysis.decisions)]
    head = [f"run {analysis.run}  (metric: {analysis.metric or 'none'})"]
    if analysis.extra.get("advice_only"):
        head.append("not written by lrwatch's hook: decisions are advice only")
    if not rows:
        return "\n".join([*head, "no findings: nothing to act on"])
    head.append(f"{'step':>8}  {'what':<9} {'kind / action':<24} detail")
    tail = f"{len(analysis.findings)} finding(s), {len(analysis.decisions)} decision(s)"
    return "\n".join([*head, *(r[3] for r in sorted(rows)), tail])


def _finding_line(f: Finding) -> str:
    what = f"{f.kind.value} ({f.severity.value})"
    text = f.message if f.tag in f.message else f"{f.tag}: {f.message}"
    return f"{f.step:>8}  finding   {what:<24} {text}"


def _decision_line(d: Decision) -> str:
    how = d.action.value
    if d.factor is not None:
        how += f" /{d.factor}"
    if d.max_norm is not None:
        how += f" max_norm={d.max_norm:.3g}"
    return f"{d.step:>8}  decision  {how:<24} {d.reason}"
