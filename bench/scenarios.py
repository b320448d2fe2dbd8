"""Labelled scenario suite: does lrwatch find what a practitioner would, and nothing else?

Every scenario is a real small training (``bench/scenario_runs.py``) recorded with the real hook
and replayed through ``lrwatch.analysis.analyzer.RunAnalyzer`` at its defaults. Printed:

1. per scenario: the kinds expected, the findings (severity, first step), the decisions;
2. per detector: precision, recall and detection delay in steps (onsets below);
3. for diverging runs: how many steps before the first NaN an explosion was flagged, next to the
   anchors' spike rules on the same per-step loss (Lightning SpikeDetection, llm-foundry, OLMo);
4. realism checks on the real training-chronicle windows in ``/work/shared/realcurves``.

Onsets used for delays: nonfinite and explosion - the first NaN (explosion delay is negative
when flagged before it); overfit - the step of the best validation loss; plateau - the first step
after which the monitored metric never improves by 1% on its best so far; ratio_low and
oscillation - step 0 (their cause is there from the start).

Usage::

    PYTHONPATH=. python bench/scenarios.py --quick      # < 2 min; runs cached in bench/out/
    PYTHONPATH=. python bench/scenarios.py              # every scenario
    PYTHONPATH=. python bench/scenarios.py --regen      # retrain instead of using the cache
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenario_runs import (  # noqa: E402
    Recipe,
    Scenario,
    cosine,
    read_facts,
    step_decay,
    train,
    warmup_to,
    write_facts,
)

from lrwatch import schema  # noqa: E402
from lrwatch.analysis.analyzer import RunAnalyzer  # noqa: E402
from lrwatch.analysis.config import AnalyzerConfig, load_config  # noqa: E402
from lrwatch.events.reader import read_run  # noqa: E402
from lrwatch.schema import ActionKind, Scalar, Severity  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "scenarios"
REALCURVES = Path("/work/shared/realcurves")
LOG_EVERY = (
    5  # the hook's norm cadence in these runs ("auto" would log almost never on tiny models)
)
CACHE_VERSION = 2

F = frozenset
DIVERGE_ALLOW = F({"oscillation", "ratio_high", "overfit", "plateau"})
SCENARIOS = [
    Scenario("diverge_digits_warmup", Recipe("digits", (128,), "momentum", 0.05, 800,
             schedule=warmup_to(60, 400)), F({"explosion", "nonfinite"}), DIVERGE_ALLOW,
             note="warm-up to a 60x too high peak LR, SGD+momentum"),
    Scenario("diverge_diabetes_warmup", Recipe("diabetes", (64,), "sgd", 0.01, 800,
             schedule=warmup_to(100, 400)), F({"explosion", "nonfinite"}), DIVERGE_ALLOW,
             note="regression, LR ramps to 1.0"),
    Scenario("diverge_digits_const", Recipe("digits", (128,), "momentum", 0.3, 600),
             F({"explosion"}), DIVERGE_ALLOW, quick=False,
             note="constant LR 0.3 with momentum: loss grows 1e14x without reaching NaN"),
    Scenario("diverge_diabetes_warmup_s1", Recipe("diabetes", (64, 64), "sgd", 0.01, 800,
             schedule=warmup_to(150, 300), seed=1), F({"explosion", "nonfinite"}),
             DIVERGE_ALLOW, quick=False, note="deeper MLP, other seed, faster ramp"),
    Scenario("oscillate_digits_adam", Recipe("digits", (128,), "adam", 0.03, 800),
             F({"oscillation"}), F({"ratio_high", "plateau", "explosion", "overfit"}),
             note="Adam at 30x its usual LR: the loss jitters, never settles"),
    Scenario("oscillate_diabetes_sgd", Recipe("diabetes", (64,), "sgd", 0.15, 800),
             F({"oscillation"}), F({"ratio_high", "plateau", "explosion", "overfit"}),
             quick=False),
    Scenario("plateau_diabetes_linear", Recipe("diabetes", (), "sgd", 0.02, 1500),
             F({"plateau"}), F({"oscillation"}),
             note="linear regression reaches its optimum in ~150 steps, then flat"),
    Scenario("lowlr_digits_sgd", Recipe("digits", (128,), "sgd", 1e-4, 800),
             F({"ratio_low"}), F({"plateau"}), note="SGD at 1e-4: updates ~1e-6 of weights"),
    Scenario("overfit_diabetes_80", Recipe("diabetes", (256, 256), "adam", 1e-3, 1200,
             batch=16, train_subset=80, val_every=10), F({"overfit"}),
             F({"plateau", "ratio_low", "oscillation"}), note="80 training rows, 70k params"),
    Scenario("overfit_digits_100", Recipe("digits", (256, 256), "momentum", 0.02, 1500,
             train_subset=100, val_every=20), F({"overfit"}),
             F({"plateau", "ratio_low", "oscillation"}), quick=False),
    Scenario("healthy_constant_adam", Recipe("digits", (128,), "adam", 1e-3, 600)),
    Scenario("healthy_step_sgd", Recipe("digits", (128,), "momentum", 0.05, 600,
             schedule=step_decay(200, 0.3))),
    Scenario("healthy_cosine_adamw", Recipe("digits", (128,), "adamw", 3e-3, 600,
             schedule=cosine(600)), quick=False),
    Scenario("healthy_warmup_cosine", Recipe("digits", (128,), "momentum", 0.1, 600,
             schedule=cosine(600, 100))),
    Scenario("overfit_diabetes_full", Recipe("diabetes", (64,), "adam", 3e-3, 600),
             F({"overfit"}), F({"plateau", "ratio_low"}), quick=False,
             note="meant as healthy, but validation loss is best at step 150 and then rises"),
]  # fmt: skip


# ------------------------------------------------------------------------------ runs
def generate(sc: Scenario, *, regen: bool) -> tuple[Path, dict[str, Any]]:
    """Train ``sc`` into the cache unless it is already there; returns the run dir and facts."""
    run_dir = OUT / sc.name
    facts = None if regen else read_facts(run_dir)
    if facts is not None and facts.get("cache_version") == CACHE_VERSION:
        return run_dir, facts
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    facts = dict(train(sc.recipe, run_dir, log_every=LOG_EVERY))
    facts.update(cache_version=CACHE_VERSION, train_seconds=time.perf_counter() - t0)
    write_facts(run_dir, facts)
    return run_dir, facts


def series(scalars: list[Scalar], tag: str) -> list[tuple[int, float]]:
    return sorted((s.step, s.value) for s in scalars if s.tag == tag)


def onsets(scalars: list[Scalar]) -> dict[str, int | None]:
    """Ground truth taken from the recorded run itself (see the module docstring)."""
    loss = series(scalars, schema.LOSS)
    flag = series(scalars, schema.NONFINITE)
    bad = [s for s, v in loss if not math.isfinite(v)] + [s for s, v in flag if v > 0.5]
    val = [(s, v) for s, v in series(scalars, "val/loss") if math.isfinite(v)]
    metric = val or loss
    best_val = min(val, key=lambda p: p[1])[0] if val else None
    return {
        "nonfinite": min(bad) if bad else None,
        "explosion": min(bad) if bad else None,
        "overfit": best_val,
        "plateau": plateau_onset(metric),
        "ratio_low": 0,
        "oscillation": 0,
        "ratio_high": 0,
    }


def plateau_onset(points: list[tuple[int, float]], rel: float = 0.01) -> int | None:
    """First step after which the metric never beats its best so far by ``rel``."""
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if len(finite) < 4:
        return None
    future_best = [0.0] * len(finite)
    m = math.inf
    for i in range(len(finite) - 1, -1, -1):
        future_best[i] = m
        m = min(m, finite[i][1])
    best = math.inf
    for i, (s, v) in enumerate(finite):
        best = min(best, v)
        if future_best[i] >= best - rel * abs(best):
            return s
    return None


def analyze(run_dir: Path, config: AnalyzerConfig) -> tuple[RunAnalyzer, list[Scalar], float]:
    scalars = read_run(run_dir)
    t0 = time.perf_counter()
    analyzer = RunAnalyzer(config)
    analyzer.feed(scalars)
    return analyzer, scalars, time.perf_counter() - t0


# ------------------------------------------------------------------------------ anchor rules
def lightning_spike(loss: list[tuple[int, float]]) -> list[int]:
    """Lightning SpikeDetection at its defaults: loss above 3x (rtol 2) its 10-step mean."""
    hits, window = [], []
    for s, v in loss:
        if len(window) == 10 and math.isfinite(v) and v > 3.0 * statistics.fmean(window):
            hits.append(s)
        if math.isfinite(v):
            window = (window + [v])[-10:]
    return hits


def foundry_spike(loss: list[tuple[int, float]]) -> list[int]:
    """llm-foundry: loss above 2x its 100-step mean, five times running."""
    hits, window, run = [], [], 0
    for s, v in loss:
        if len(window) == 100 and math.isfinite(v):
            run = run + 1 if v > 2.0 * statistics.fmean(window) else 0
            if run >= 5:
                hits.append(s)
        if math.isfinite(v):
            window = (window + [v])[-100:]
    return hits


def olmo_spike(loss: list[tuple[int, float]]) -> list[int]:
    """OLMo: loss above mean + 6 sigma of the previous 128 steps."""
    hits, window = [], []
    for s, v in loss:
        if len(window) == 128 and math.isfinite(v):
            mu, sd = statistics.fmean(window), statistics.pstdev(window)
            if v > mu + 6.0 * sd:
                hits.append(s)
        if math.isfinite(v):
            window = (window + [v])[-128:]
    return hits


ANCHORS = {"lightning": lightning_spike, "llm-foundry": foundry_spike, "olmo": olmo_spike}


# ------------------------------------------------------------------------------ scoring
def first_by_kind(analyzer: RunAnalyzer, *, min_severity: Severity) -> dict[str, int]:
    rank = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}
    out: dict[str, int] = {}
    for f in analyzer.findings:
        if rank[f.severity] >= rank[min_severity]:
            out.setdefault(f.kind.value, f.step)
    return out


def score(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind: true/false positives over scenarios, recall, precision, delays."""
    kinds = [k.value for k in schema.Kind]
    table: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        tp = fp = fn = 0
        delays: list[int] = []
        for r in results:
            found = kind in r["first"]
            if kind in r["expect"]:
                tp, fn = tp + found, fn + (not found)
                onset = r["onsets"].get(kind)
                if found and onset is not None:
                    delays.append(r["first"][kind] - onset)
            elif found and kind not in r["allow"]:
                fp += 1
        table[kind] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "delays": delays,
        }
    return table


def pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:4.0f}%"


# ------------------------------------------------------------------------------ realcurves
def chronicle_windows() -> dict[str, list[Scalar]]:
    """BigScience log excerpts as scalars, one window per chronicle section, under the tag
    names a Megatron/HF run would use (so the analyzer reads them as a non-lrwatch run)."""
    path = REALCURVES / "bigscience" / "chronicles_log_excerpts.csv"
    windows: dict[str, list[Scalar]] = defaultdict(list)
    with path.open() as f:
        for row in csv.DictReader(f):
            out, step = windows[row["section"]], int(row["iteration"])

            def add(tag: str, raw: str, *, out: list[Scalar] = out, step: int = step) -> None:
                if raw:
                    out.append(Scalar(tag, step, 0.0, float(raw)))

            if row["kind"] == "valid":
                add("val/loss", row["lm_loss"])
                continue
            add("train/loss", row["lm_loss"])
            add("train/learning_rate", row["lr"])
            if row["grad_norm"] and float(row["grad_norm"]) > 0:  # 0.000 = not logged
                add("train/grad_norm", row["grad_norm"])
    return windows


def realism(config: AnalyzerConfig) -> list[str]:
    events = json.loads((REALCURVES / "bigscience" / "events.json").read_text())["events"]
    windows = chronicle_windows()
    lines = []
    for ev in events:
        heading = (ev.get("source") or {}).get("heading") or ""
        section = next((s for s in windows if s in heading or heading in s), None)
        if section is None:
            continue
        analyzer = RunAnalyzer(config)
        analyzer.feed(windows[section])
        kinds = sorted({f"{f.kind.value}/{f.severity.value}" for f in analyzer.findings})
        acts = [d.action.value + (f"/{d.factor}" if d.factor else "") for d in analyzer.decisions]
        stopped = any(d.action is ActionKind.STOP for d in analyzer.decisions)
        recovered = ev.get("recovered") is True
        verdict = "ok" if not (recovered and stopped) else "BAD: stop on a self-recovering spike"
        lines.append(
            f"  {ev['run']:<22} {ev['type']:<42} recovered={str(ev.get('recovered')):<7} "
            f"points={len(windows[section]):>3}  findings={kinds or '-'}  decisions={acts or '-'}"
            f"  -> {verdict}"
        )
    lines.append("  glm130b/, opt175b/: events only (no numeric series), nothing to replay")
    return lines


# ------------------------------------------------------------------------------ main
def run_scenario(sc: Scenario, config: AnalyzerConfig, *, regen: bool) -> dict[str, Any]:
    run_dir, facts = generate(sc, regen=regen)
    analyzer, scalars, seconds = analyze(run_dir, config)
    loss = series(scalars, schema.LOSS)
    return {
        "name": sc.name,
        "expect": sc.expect,
        "allow": sc.allow,
        "facts": facts,
        "first": first_by_kind(analyzer, min_severity=Severity.INFO),
        "warn": first_by_kind(analyzer, min_severity=Severity.WARNING),
        "onsets": onsets(scalars),
        "decisions": [(d.step, d.action.value, d.factor) for d in analyzer.decisions],
        "explosion_steps": [
            f.step
            for f in analyzer.findings
            if f.kind.value == "explosion" and f.severity is not Severity.INFO
        ],
        "anchors": {name: rule(loss) for name, rule in ANCHORS.items()},
        "scalars": len(scalars),
        "analyze_seconds": seconds,
    }


def print_scenarios(results: list[dict[str, Any]]) -> None:
    print("\n== scenarios (first finding step per kind; * = warning or critical)")
    for r in results:
        found = ", ".join(
            f"{k}@{s}{'*' if k in r['warn'] else ''}" for k, s in sorted(r["first"].items())
        )
        acts = ", ".join(f"{a}{'/' + str(f) if f else ''}@{s}" for s, a, f in r["decisions"][:6])
        more = f" (+{len(r['decisions']) - 6})" if len(r["decisions"]) > 6 else ""
        print(f"{r['name']:<26} expect={sorted(r['expect']) or '-'}")
        print(f"{'':<26} found: {found or '-'}")
        print(f"{'':<26} decisions: {acts or '-'}{more}")
        print(
            f"{'':<26} {r['scalars']} scalars analysed in {r['analyze_seconds'] * 1e3:.0f} ms"
            f" (train {r['facts'].get('train_seconds', 0):.1f} s)"
        )


def print_scores(results: list[dict[str, Any]]) -> None:
    print("\n== per detector (scenario level; allowed side effects are not false positives)")
    print(
        f"{'kind':<13} {'TP':>3} {'FP':>3} {'FN':>3} {'precision':>9} {'recall':>7}  delay (steps)"
    )
    for kind, row in score(results).items():
        d = row["delays"]
        delay = f"median {statistics.median(d):.0f}, {d}" if d else "-"
        print(
            f"{kind:<13} {row['tp']:>3} {row['fp']:>3} {row['fn']:>3} {pct(row['precision']):>9} "
            f"{pct(row['recall']):>7}  {delay}"
        )
    healthy = [r for r in results if not r["expect"]]
    bad = [(r["name"], sorted(r["warn"])) for r in healthy if r["warn"]]
    print(f"healthy runs: {len(healthy)}, with a warning-level finding: {bad or 'none'}")


def print_anchors(results: list[dict[str, Any]]) -> None:
    print(
        "\n== spike rules vs lrwatch on diverging runs: steps before the first NaN of the first"
        " alarm (+ = earlier, miss = none)\n   [alarms before the NaN: steps for the rules,"
        " episodes for lrwatch]"
    )
    names = ["lrwatch", *ANCHORS]
    print(f"{'scenario':<26} {'first NaN':>9} " + " ".join(f"{n:>12}" for n in names))
    for r in results:
        nan = r["onsets"]["nonfinite"]
        alarms = {"lrwatch": r["explosion_steps"], **r["anchors"]}
        if "explosion" in r["expect"]:
            cells = []
            for hits in alarms.values():
                before = [h for h in hits if nan is None or h < nan]
                first = hits[0] if hits else None
                where = "miss" if first is None else (f"+{nan - first}" if nan else f"@{first}")
                cells.append(f"{where} [{len(before)}]")
            print(
                f"{r['name']:<26} {nan if nan is not None else '-':>9} "
                + " ".join(f"{c:>12}" for c in cells)
            )
    print("false alarms (runs with an alarm / runs) where no explosion is expected:")
    quiet = [r for r in results if "explosion" not in r["expect"]]
    for n in names:
        if n == "lrwatch":
            hits = [
                r["name"]
                for r in quiet
                if "explosion" in r["warn"] and "explosion" not in r["allow"]
            ]
        else:
            hits = [r["name"] for r in quiet if r["anchors"][n]]
        print(f"  {n:<12} {len(hits)}/{len(quiet)} {hits or ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick subset (< 2 min)")
    ap.add_argument("--regen", action="store_true", help="retrain instead of using bench/out/")
    ap.add_argument("--only", nargs="*", help="scenario names")
    ap.add_argument("--config", type=Path, help="analyzer TOML config (default: all defaults)")
    args = ap.parse_args()
    import scipy.stats  # noqa: F401  (imported up front: not part of any analysis time)
    import torch

    torch.set_num_threads(1)
    chosen = [s for s in SCENARIOS if (not args.quick or s.quick)]
    if args.only:
        chosen = [s for s in chosen if s.name in args.only]
    t0 = time.perf_counter()
    config = load_config(args.config)
    results = [run_scenario(sc, config, regen=args.regen) for sc in chosen]
    print_scenarios(results)
    print_scores(results)
    print_anchors(results)
    print("\n== realism: BigScience chronicle windows (a self-recovered spike must not stop)")
    print("\n".join(realism(config)))
    print(f"\n{len(results)} scenarios in {time.perf_counter() - t0:.0f} s (loaded 2-core machine)")


if __name__ == "__main__":
    main()
