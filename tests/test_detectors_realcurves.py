"""Detectors against real curves: BigScience chronicle windows and small real trainings.

The chronicles print only the log lines around an event, so each window gets a short healthy
history in front of it (seeded noise at the level of the window's first lines: 2% for the LM
loss of a 2048-sequence batch, 20% for grad norms). Without a history no robust rule can call
anything a spike; with it, the test asks what the chronicle's authors saw.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from lrwatch import schema
from lrwatch.analysis.detectors.amp import AmpDetector
from lrwatch.analysis.detectors.explosion import ExplosionDetector
from lrwatch.analysis.detectors.oscillation import OscillationDetector

SHARED = Path(__file__).resolve().parents[2] / "shared"
CSV = SHARED / "realcurves" / "bigscience" / "chronicles_log_excerpts.csv"
NOISE = {"lm_loss": 0.02, "grad_norm": 0.2}


@cache
def _rows() -> tuple[dict[str, str], ...]:
    if not CSV.exists():
        pytest.skip(f"real curves not available at {CSV}")
    with CSV.open(newline="") as fh:
        return tuple(csv.DictReader(fh))


def _excerpt(source: str, column: str, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    pts = [
        (int(r["iteration"]), float(r[column]))
        for r in _rows()
        if r["source_file"].endswith(source)
        and r["kind"] == "train"
        and r[column]
        and first <= int(r["iteration"]) <= last
    ]
    return np.array([p[0] for p in pts], np.int64), np.array([p[1] for p in pts])


def _with_history(
    s: np.ndarray, v: np.ndarray, column: str, n: int = 40
) -> tuple[np.ndarray, np.ndarray]:
    level = math.exp(float(np.mean(np.log(v[:2]))))
    noise = np.random.default_rng(0).standard_normal(n)
    hist = level * np.exp(NOISE[column] * noise)
    return np.r_[np.arange(s[0] - n, s[0]), s].astype(np.int64), np.r_[hist, v]


def _replay(source: str, column: str, first: int, last: int) -> dict[int, str | None]:
    """Severity of the explosion finding at every excerpt step, as the analyzer would see it."""
    s, v = _excerpt(source, column, first, last)
    hs, hv = _with_history(s, v, column)
    det, out = ExplosionDetector(), {}
    for i in range(hs.size - s.size, hs.size):
        f = det.check(hs[: i + 1], hv[: i + 1], tag=column)
        out[int(hs[i])] = None if f is None else f.severity.value
    return out


def test_bloom_31214_grad_norm_explosion_is_flagged_before_the_loss_peaks() -> None:
    """BLOOM 176B, 2022-04-12: grad norm 0.24 -> 960 in five steps, loss 2.20 -> 5.10 at 31219,
    recovered by itself ~30 iterations later."""
    sev = _replay("tr11-176B-ml/chronicles.md", "grad_norm", 31214, 31251)
    assert sev[31214] is None
    assert sev[31216] in ("warning", "critical")
    assert "critical" in (sev[31217], sev[31218])  # before the loss peak at 31219
    assert sev[31250] is None and sev[31251] is None  # recovered: nothing left to say


def test_bloom_31214_loss_spike_is_flagged_at_its_peak() -> None:
    sev = _replay("tr11-176B-ml/chronicles.md", "lm_loss", 31214, 31251)
    assert sev[31219] is not None
    assert sev[31250] is None


def test_tr8_104b_experiment_12_divergence_is_flagged() -> None:
    """tr8-104B exp 12: grad norm 232k -> 1.49M -> 3.27M, loss 3.3 -> 7.3, then divergence."""
    sev = _replay("tr8-104B-wide/chronicles.md", "grad_norm", 8738, 8743)
    assert sev[8738] is None
    assert sev[8740] == "warning"
    assert sev[8742] == "critical"
    loss = _replay("tr8-104B-wide/chronicles.md", "lm_loss", 8738, 8743)
    assert loss[8741] is not None


def test_tr1_13b_huge_loss_spike_is_flagged() -> None:
    sev = _replay("tr1-13B-base/chronicles.md", "lm_loss", 29020, 29090)
    assert sev[29040] is None and sev[29050] is not None
    assert sev[29070] == "critical"  # three elevated points at ~2.8x with 2% noise


def test_emb_norm_experiment_7_loss_scale_collapse_is_flagged() -> None:
    """tr8b-104B emb-norm exp 7: fp16 scale 1048576 -> 32768 in six steps, then NaN loss."""
    s, scale = _excerpt("tr8b-104B/chronicles.md", "loss_scale", 17060, 17068)
    det = AmpDetector()
    found = {int(s[i]): det.check(scale=(s[: i + 1], scale[: i + 1])) for i in range(s.size)}
    assert found[17064] is None  # two back-offs: still GradScaler doing its job
    f = found[17067]
    assert f is not None and f.evidence["amp"] == "repeated_backoff"


# ------------------------------------------------------------------ small real trainings
@cache
def _dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's diabetes or digits data, read from its files (importing sklearn is slow)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-learn is not installed")
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    if name == "digits":
        raw = np.loadtxt(data / "digits.csv.gz", delimiter=",")
        return raw[:, :-1] / 16.0, raw[:, -1]
    x = np.loadtxt(data / "diabetes_data_raw.csv.gz")
    y = np.loadtxt(data / "diabetes_target.csv.gz")
    return (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()


def _train(
    lr: float, *, data: str = "diabetes", momentum: float = 0.9, ramp: float = 1.0, steps: int = 600
) -> dict[str, np.ndarray]:
    """A tiny MLP trained with SGD; its losses, grad norms and global update ratios."""
    import torch

    x_np, y_np = _dataset(data)
    x = torch.tensor(x_np, dtype=torch.float32)
    digits = data == "digits"
    y = torch.tensor(y_np, dtype=torch.long if digits else torch.float32)
    act = torch.nn.ReLU() if digits else torch.nn.Tanh()
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 64), act, torch.nn.Linear(64, 10 if digits else 1)
    )
    optim = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    g = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {"loss": [], "grad_norm": [], "ratio": []}
    for t in range(steps):
        optim.param_groups[0]["lr"] = lr * ramp**t
        idx = torch.randint(0, len(x), (32,), generator=g)
        pred = model(x[idx])
        loss = (
            torch.nn.functional.cross_entropy(pred, y[idx])
            if digits
            else torch.nn.functional.mse_loss(pred.squeeze(1), y[idx])
        )
        optim.zero_grad()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        before = [p.detach().clone() for p in model.parameters()]
        optim.step()
        with torch.no_grad():
            delta = torch.stack(
                [(p - b).norm() for p, b in zip(model.parameters(), before, strict=True)]
            )
            norm = torch.stack([b.norm() for b in before])
        out["loss"].append(loss.item())
        out["grad_norm"].append(gn.item())
        out["ratio"].append((delta.norm() / norm.norm()).item())
    return {k: np.array(v) for k, v in out.items()}


def _oscillation_hits(run: dict[str, np.ndarray], *, start: int, every: int = 20) -> list[bool]:
    det, s = OscillationDetector(), np.arange(run["loss"].size, dtype=np.int64)
    hits = []
    for i in range(start, s.size + 1, every):
        lo = max(0, i - det.window)
        f = det.check(s[lo:i], run["loss"][lo:i], tag=schema.LOSS, ratio=(s, run["ratio"]))
        hits.append(f is not None)
    return hits


def _first_flag(values: np.ndarray, until: int) -> int | None:
    det, s = ExplosionDetector(), np.arange(values.size, dtype=np.int64)
    for i in range(min(until, values.size)):
        lo = max(0, i + 1 - det.window - det.confirm)
        if det.check(s[lo : i + 1], values[lo : i + 1], tag="x") is not None:
            return i
    return None


@pytest.mark.parametrize(
    ("lr", "ramp", "lead", "steps"),
    [(0.3, 1.0, 5, 40), (1e-3, 1.01, 10, 700)],
    ids=["lr_too_high_from_the_start", "lr_ramped_until_divergence"],
)
def test_explosion_flags_real_divergence_before_the_first_nan(
    lr: float, ramp: float, lead: int, steps: int
) -> None:
    run = _train(lr, ramp=ramp, steps=steps)
    bad = ~np.isfinite(run["loss"]) | ~np.isfinite(run["grad_norm"])
    assert bad.any(), "the run was meant to diverge"
    first_nan = int(np.argmax(bad))
    flagged = [_first_flag(run[k], first_nan) for k in ("loss", "grad_norm")]
    earliest = min(f for f in flagged if f is not None)
    assert first_nan - earliest >= lead, (first_nan, flagged)


@pytest.mark.parametrize(
    ("data", "lr", "momentum"),
    [("diabetes", 1e-2, 0.9), ("digits", 0.05, 0.0)],
    ids=["diabetes_sgd_momentum", "digits_sgd"],
)
def test_healthy_real_training_raises_no_warning(data: str, lr: float, momentum: float) -> None:
    run = _train(lr, data=data, momentum=momentum, steps=500)
    s = np.arange(run["loss"].size, dtype=np.int64)
    exp = ExplosionDetector()
    for i in range(1, s.size + 1, 3):
        for key in ("loss", "grad_norm"):
            assert exp.check(s[:i][-103:], run[key][:i][-103:], tag=key) is None, (key, i)
    assert not any(_oscillation_hits(run, start=100))


def test_oscillation_flags_a_real_run_stuck_by_too_high_a_learning_rate() -> None:
    """Digits with plain SGD at lr 2: the loss is stuck near chance (ln 10) and jitters."""
    run = _train(2.0, data="digits", momentum=0.0, steps=500)
    assert float(np.median(run["loss"][-100:])) > 2.0  # stuck, by construction
    hits = _oscillation_hits(run, start=300)
    assert sum(hits) >= len(hits) // 2
