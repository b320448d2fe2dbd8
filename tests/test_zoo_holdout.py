"""The zoo's held-out split (bench/zoo/holdout.py): plumbing only, never lrwatch's verdicts.

The split is scored once, at the end, so nothing here reads a finding or a decision of lrwatch on
these tasks. What is checked: the plateau baseline composes with a framework's schedule exactly
like trainer.py's ``_Plateau``, the facts are counted like trainer.py's loop, the held-out runs
have their own cache keys (adding them retrains nothing else), the default sweep leaves them out,
and each task runs end to end in ``apply`` mode (a real ``lrwatch serve --apply``) and in
``plateau`` mode at a tiny step count, writing nothing outside its run directory.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ZOO = Path(__file__).resolve().parent.parent / "bench" / "zoo"
sys.path.insert(0, str(ZOO))

import holdout  # noqa: E402
import holdout2  # noqa: E402
import worker  # noqa: E402
from framework_run import Facts, PlateauOnOptimizer  # noqa: E402
from trainer import NAN_PATIENCE  # noqa: E402

from lrwatch import schema  # noqa: E402


def test_plateau_on_optimizer_steps_with_the_cut_lr_and_leaves_the_schedule_alone() -> None:
    """After ReduceLROnPlateau's cut (factor 0.5), a step moves the weight by lr * 0.5 * grad
    (SGD arithmetic by hand), and StepLR, which multiplies the group's LR in place, still sees
    its own LR: the factor is never compounded into the schedule."""
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    plateau = PlateauOnOptimizer(opt)
    for val in [1.0] + [2.0] * 6:  # patience 5: the 6th bad check cuts
        plateau.val_loss(val)
    assert plateau.factor == 0.5
    for lr in (0.1, 0.05, 0.025):
        before = float(w.detach())
        w.grad = torch.tensor([2.0])
        opt.step()
        assert float(w.detach()) == pytest.approx(before - lr * 0.5 * 2.0)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        sched.step()
    plateau.remove()


def test_plateau_on_optimizer_ignores_nonfinite_validation() -> None:
    plateau = PlateauOnOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    for _ in range(20):
        plateau.val_loss(math.nan)
    assert plateau.factor == 1.0


@pytest.mark.parametrize(
    ("losses", "first_nan", "stop_at"),
    [
        ([1.0] * 5, -1, None),
        ([1.0, math.nan, 1.0] + [math.inf] * NAN_PATIENCE, 2, 3 + NAN_PATIENCE),
        ([math.nan] * (NAN_PATIENCE - 1) + [1.0] + [math.nan] * 3, 1, None),
    ],
    ids=["finite", "nan-then-patience", "streak-broken"],
)
def test_facts_count_nonfinite_steps_like_the_plain_loop(
    losses: list[float], first_nan: int, stop_at: int | None
) -> None:
    facts = Facts()
    stops = [step for step, x in enumerate(losses, 1) if facts.train_loss(step, x)]
    assert (stops[0] if stops else None) == stop_at
    out = facts.result(math.nan, None)
    assert out["first_nan_step"] == first_nan and out["final_val"] is None


def test_holdout_runs_have_their_own_cache_keys() -> None:
    """Editing a held-out module (its digest) changes only held-out keys: the 600+ cached runs
    of the other tasks keep theirs."""
    digests = worker.source_digests()
    edited = dict(digests, zoo_holdout="0" * 64, hook_holdout="1" * 64)
    for mode in ("none", "apply", "plateau"):
        plain = {"task": "mlp_digits", "mult": 1.0, "seed": 0, "mode": mode}
        held = {"task": "lit_digits", "mult": 1.0, "seed": 0, "mode": mode}
        assert worker.job_key(plain, digests, "train") == worker.job_key(plain, edited, "train")
        assert worker.job_key(held, digests, "train") != worker.job_key(held, edited, "train")


def test_holdout_is_its_own_split_and_not_in_the_default_sweep() -> None:
    import run
    import score

    assert set(score.HOLDOUT_TASKS) == set(holdout.TASKS) == {"lit_digits", "hf_gpt2", "ae_signals"}
    assert all(score.split_of(t, s) == "holdout" for t in holdout.TASKS for s in (0, 1, 2))
    assert not set(run.TASK_NAMES) & set(holdout.TASKS)
    assert run.jobs_for(score.SPLIT_TASKS["holdout"], (1.0,), (0,), ("none",))


def test_worker_runs_a_holdout_job_and_caches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's path: run_job dispatches a held-out task to holdout.train and caches its
    facts (a ``plateau`` job: no lrwatch, so nothing of its verdicts is produced)."""
    monkeypatch.setattr(worker, "OUT", tmp_path)
    job = {"task": "ae_signals", "mult": 1.0, "seed": 0, "mode": "plateau"}
    digests = worker.source_digests()
    first = worker.run_job(job, digests)
    assert first["task"] == "ae_signals" and first["steps_run"] == holdout.TASKS["ae_signals"].steps
    assert list((tmp_path / "cache").glob("*.json")) == [
        tmp_path / "cache" / f"{worker.job_key(job, digests, 'train')}.json"
    ]
    assert worker.run_job(job, digests) == json.loads(json.dumps(first))  # from the cache


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.parametrize("task", [*holdout.TASKS, *holdout2.TASKS])
@pytest.mark.parametrize("mode", ["apply", "plateau"])
def test_holdout_task_runs_end_to_end(
    task: str, mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 steps (two validations), for the tasks of both held-out splits: the daemon read the
    run (its state file, which the trainer waits for), the facts came back, and nothing was
    written outside the run's directory but the daemon's log beside it in apply mode."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_dir = tmp_path / "home" / "run"
    split = holdout if task in holdout.TASKS else holdout2
    facts = split.train(task, 1.0, 0, mode, run_dir, steps=40)
    assert facts["task"] == task and facts["mode"] == mode
    assert facts["stopped"] or facts["steps_run"] == 40
    assert facts["first_nan_step"] == -1
    assert [s for s, _ in facts["curve"]] == [20, 40][: len(facts["curve"])]
    assert facts["final_val"] is not None and math.isfinite(facts["final_val"])
    assert list(cwd.iterdir()) == []
    beside = {p.name for p in (tmp_path / "home").iterdir()}
    assert beside == ({"run", "serve.log"} if mode == "apply" else {"run"})
    events = list(run_dir.glob("events.out.tfevents.*"))
    if mode == "apply":
        assert (run_dir / schema.DAEMON_SUBRUN / "state.json").exists()
        assert len(events) == 1
    else:
        assert events == [] and facts["plateau_factor"] == 1.0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.parametrize("task", ["lit_digits", "hf_gpt2"])
def test_plateau_factor_reaches_the_frameworks_optimizer(
    task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plateau factor of 0 applied through the step hooks must train exactly like an LR of 0
    given to the framework (mult 0): the hooks sit on the optimizer that actually steps."""
    lr_zero = holdout.train(task, 0.0, 0, "plateau", tmp_path / "a" / "run", steps=40)
    monkeypatch.setattr(PlateauOnOptimizer, "factor", property(lambda self: 0.0))
    cut_to_zero = holdout.train(task, 1.0, 0, "plateau", tmp_path / "b" / "run", steps=40)
    assert cut_to_zero["curve"] == lr_zero["curve"]
    assert cut_to_zero["final_val"] == lr_zero["final_val"]
