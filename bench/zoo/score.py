"""The zoo's scoreboard: labels from the sweep, then harm, false alarms, rescue, NaN prevented,
too-low-LR advice and delay, per task and overall, for lrwatch and the two baselines.

Definitions (README repeats them):

- labels, per task and seed, from the ``none`` runs: *good* = final validation loss within 5% of
  the best final of the sweep, *bad* = 25% or more worse (a non-finite final is bad);
- *measurably off*: the first validation check at which the run's loss is 25% or more above the
  same check of the best run of its task and seed (or non-finite), or its first non-finite
  training loss if that comes first; *delay* is the first decision's step minus that step;
- harm: good runs whose final is more than 2% worse than without intervention;
- false alarms: good runs with a warning or critical finding in the recommend-mode replay (for
  ReduceLROnPlateau: good runs it cut);
- rescue: bad runs at >= 10x whose final is >= 20% better (a finite final rescues a NaN one);
  in brackets, those of them no longer bad (final within 25% of the sweep's best): a run that
  ends at 1e10 instead of NaN is "20% better" and still useless;
- NaN prevented: runs that go non-finite without intervention and end finite with it;
- too-low LR: runs at <= 0.03x with ``raise_lr_advice`` within 300 steps of the replay.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from holdout import TASKS as HOLDOUT
from holdout2 import TASKS as HOLDOUT2

TUNING_TASKS = ("mlp_digits", "cnn_digits", "reg_diabetes", "gru_chars")
HELD_OUT_TASKS = ("mlp_cancer", "tfm_chars")
# Added after the detectors and policy were tuned, scored once: never looked at while tuning.
# (mlp_cancer and tfm_chars were held out too, but their failures were read to find causes.)
FRESH_TASKS = ("mlp_synth", "lstm_chars")
# Added at the very end, in the frameworks users train with (holdout.py): nobody tunes on them,
# nobody reads their findings; scored once, by ``run.py --split holdout``.
HOLDOUT_TASKS = tuple(HOLDOUT)
# Added once lrwatch's findings on every split above had been read while tuning: new shapes in
# plain PyTorch (holdout2.py), base LRs from runs without lrwatch; scored once, by the lead.
HOLDOUT2_TASKS = tuple(HOLDOUT2)
TUNING_SEEDS = (0, 1)
SPLITS = ("tune", "report", "fresh", "holdout", "holdout2")
SPLIT_TASKS = {
    "tune": TUNING_TASKS,
    "report": TUNING_TASKS + HELD_OUT_TASKS,
    "fresh": FRESH_TASKS,
    "holdout": HOLDOUT_TASKS,
    "holdout2": HOLDOUT2_TASKS,
}
METHODS = ("lrwatch", "constant", "plateau")
MODE_OF = {"lrwatch": "apply", "constant": "none", "plateau": "plateau"}


def split_of(task: str, seed: int) -> str:
    """``tune`` for the tuning tasks at seeds 0-1, ``fresh`` for the tasks added after tuning,
    ``holdout`` for the framework tasks added at the end, ``holdout2`` for the plain-PyTorch
    tasks added after that, everything else ``report``."""
    if task in FRESH_TASKS:
        return "fresh"
    if task in HOLDOUT_TASKS:
        return "holdout"
    if task in HOLDOUT2_TASKS:
        return "holdout2"
    return "tune" if task in TUNING_TASKS and seed in TUNING_SEEDS else "report"


def _final(r: dict[str, Any] | None) -> float:
    if r is None or r["final_val"] is None:
        return math.inf
    return float(r["final_val"])


def _went_nonfinite(r: dict[str, Any]) -> bool:
    return r["final_val"] is None or r["first_nan_step"] > 0


def label(results: list[dict[str, Any]]) -> dict[tuple[str, int, float], str]:
    """good / bad / middle for each (task, seed, mult), from the ``none`` runs."""
    best: dict[tuple[str, int], float] = defaultdict(lambda: math.inf)
    for r in results:
        if r["mode"] == "none":
            key = (r["task"], r["seed"])
            best[key] = min(best[key], _final(r))
    out = {}
    for r in results:
        if r["mode"] == "none":
            b, f = best[(r["task"], r["seed"])], _final(r)
            out[(r["task"], r["seed"], r["mult"])] = (
                "good" if f <= 1.05 * b else "bad" if f >= 1.25 * b else "middle"
            )
    return out


def off_step(run: dict[str, Any], best_run: dict[str, Any]) -> int | None:
    """The first step at which ``run`` is measurably off (module docstring), or None."""
    ref = dict(best_run["curve"])
    nan = run["first_nan_step"] if run["first_nan_step"] > 0 else None
    for step, val in run["curve"]:
        if nan is not None and nan <= step:
            return nan
        r = ref.get(step)
        if val is None or (r is not None and val >= 1.25 * r):
            return int(step)
    return nan


def _warns(r: dict[str, Any]) -> bool:
    return any(f["severity"] in ("warning", "critical") for f in r["replay"]["findings"])


def _acted(method: str, r: dict[str, Any]) -> bool:
    if method == "lrwatch":
        return bool(r.get("apply", {}).get("decisions"))
    return False


def scoreboard(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per split, per task and overall: the goals' counts for each method."""
    labels = label(results)
    by = {(r["task"], r["seed"], r["mult"], r["mode"]): r for r in results}
    best_mult: dict[tuple[str, int], float] = {}
    for (task, seed, mult), _ in sorted(labels.items()):
        cur = best_mult.get((task, seed))
        if cur is None or _final(by[(task, seed, mult, "none")]) < _final(
            by[(task, seed, cur, "none")]
        ):
            best_mult[(task, seed)] = mult
    board: dict[str, Any] = {}
    for split in SPLITS:
        groups: dict[str, list[tuple[str, int, float]]] = defaultdict(list)
        for key in labels:
            if split_of(key[0], key[1]) == split:
                groups[key[0]].append(key)
                groups["overall"].append(key)
        board[split] = {
            name: _score(keys, labels, by, best_mult)
            for name, keys in sorted(groups.items(), key=lambda kv: (kv[0] == "overall", kv[0]))
        }
    return board


def _score(
    keys: list[tuple[str, int, float]],
    labels: dict[tuple[str, int, float], str],
    by: dict[tuple[str, int, float, str], dict[str, Any]],
    best_mult: dict[tuple[str, int], float],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "runs": len(keys),
        "good": sum(labels[k] == "good" for k in keys),
        "bad": sum(labels[k] == "bad" for k in keys),
    }
    for method in METHODS:
        harm = alarms = rescued = healed = rescuable = saved = nans = low = lows = misled = 0
        for k in keys:
            base, mine = by[(*k, "none")], by.get((*k, MODE_OF[method]))
            if mine is None:
                continue
            if labels[k] == "good":
                harm += _final(mine) > 1.02 * _final(base)
                if method == "lrwatch":
                    alarms += _warns(base)
                    misled += any(
                        d["action"] == "raise_lr_advice" for d in base["replay"]["decisions"]
                    )
                elif method == "plateau":
                    alarms += _plateau_cut(mine)
            if labels[k] == "bad" and k[2] >= 10:
                rescuable += 1
                end = _final(mine)  # non-finite on both sides is no rescue (inf <= inf)
                ok = math.isfinite(end) and end <= 0.8 * _final(base)
                rescued += ok
                # ...and no longer bad by the sweep's own label: within 25% of its best final
                best = _final(by[(k[0], k[1], best_mult[(k[0], k[1])], "none")])
                healed += ok and end < 1.25 * best
            if _went_nonfinite(base):
                nans += 1
                saved += math.isfinite(_final(mine))
            if k[2] <= 0.03 and method == "lrwatch":
                lows += 1
                low += any(
                    d["action"] == "raise_lr_advice" and d["step"] <= 300
                    for d in base["replay"]["decisions"]
                )
        out[method] = {
            "harm": harm,
            "false_alarms": alarms,
            "rescued": rescued,
            "rescued_not_bad": healed,
            "rescuable": rescuable,
            "nan_prevented": saved,
            "nan_runs": nans,
            "too_low_advised": low,
            "too_low_runs": lows,
            "raise_advice_on_good": misled,
        }
    out["lrwatch"]["delay_median"] = _median_delay(keys, labels, by, best_mult)
    return out


def _plateau_cut(r: dict[str, Any]) -> bool:
    """Whether ReduceLROnPlateau cut: recorded by the trainer as the factor it ended with."""
    return bool(r.get("plateau_factor", 1.0) < 1.0)


def _median_delay(
    keys: list[tuple[str, int, float]],
    labels: dict[tuple[str, int, float], str],
    by: dict[tuple[str, int, float, str], dict[str, Any]],
    best_mult: dict[tuple[str, int], float],
) -> float | None:
    delays = []
    for k in keys:
        if labels[k] != "bad":
            continue
        base = by[(*k, "none")]
        off = off_step(base, by[(k[0], k[1], best_mult[(k[0], k[1])], "none")])
        first = min((d["step"] for d in base["replay"]["decisions"]), default=None)
        if off is not None and first is not None:
            delays.append(first - off)
    return statistics.median(delays) if delays else None


def markdown(board: dict[str, Any], split: str) -> str:
    """The README table for one split: a row per task and overall."""
    head = (
        "| task | runs (good/bad) | harm lrwatch / RLROP | false alarms lrwatch / RLROP cut "
        "| rescue (of which no longer bad) lrwatch / RLROP "
        "| NaN prevented lrwatch / RLROP | too-low advised (raise-LR advice on good runs) "
        "| median delay |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for name, s in board[split].items():
        lw, pl = s["lrwatch"], s["plateau"]
        rows.append(
            f"| {name} | {s['runs']} ({s['good']}/{s['bad']}) | {lw['harm']} / {pl['harm']} "
            f"| {lw['false_alarms']} / {pl['false_alarms']} "
            f"| {lw['rescued']}/{lw['rescuable']} ({lw['rescued_not_bad']}) "
            f"/ {pl['rescued']}/{pl['rescuable']} ({pl['rescued_not_bad']}) "
            f"| {lw['nan_prevented']}/{lw['nan_runs']} / {pl['nan_prevented']}/{pl['nan_runs']} "
            f"| {lw['too_low_advised']}/{lw['too_low_runs']} ({lw['raise_advice_on_good']}) "
            f"| {lw['delay_median']} |"
        )
    return "\n".join(rows)
