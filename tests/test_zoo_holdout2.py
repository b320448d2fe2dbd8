"""The zoo's second held-out split (bench/zoo/holdout2.py): plumbing only, never lrwatch's verdicts.

Like tests/test_zoo_holdout.py for the first one: nothing here reads a finding or a decision of
lrwatch on these tasks, as the split is scored once, by the lead. What is checked: adding the
split kept every other run's cache key (the digests of the other splits are still what they were
defined as before it existed, and editing this split's modules changes only its own keys), the
default sweep leaves it out, the ViT cuts its patches and the schedule warms up and decays as
documented (against torch's ``unfold`` and a hand computation). Each task's end-to-end run in
``apply`` and ``plateau`` mode is tested with the first split's (tests/test_zoo_holdout.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ZOO = Path(__file__).resolve().parent.parent / "bench" / "zoo"
sys.path.insert(0, str(ZOO))

import holdout  # noqa: E402
import holdout2  # noqa: E402
import worker  # noqa: E402


def test_the_held_out_splits_digests_are_made_of_their_own_modules() -> None:
    """The ``holdout`` split's digests, computed here from their definition (its modules; the
    hook plus the framework integrations), and the plain splits' from tasks.py and trainer.py
    alone: a holdout2 module is in neither, so editing one retrains nothing of theirs."""
    digests = worker.source_digests()
    zoo = [ZOO / "tasks.py", ZOO / "trainer.py"]
    modules = ("holdout", "framework_run", "plain_run", "lit_task", "hf_task", "ae_task")
    assert digests["zoo_holdout"] == worker._digest(zoo + [ZOO / f"{m}.py" for m in modules])
    lw = worker.LRWATCH
    hook = [lw / n for n in worker.HOOK_FILES] + sorted(lw.glob("hook/*.py"))
    hook += sorted(lw.glob("objstore/*.py"))
    integrations = ["lightning.py", "hf.py", "integrations/lightning.py", "integrations/hf.py"]
    assert digests["hook_holdout"] == worker._digest(hook + [lw / n for n in integrations])
    assert digests["zoo"] == worker._digest(zoo) and digests["hook"] == worker._digest(hook)


@pytest.mark.parametrize("mode", ["none", "apply", "plateau"])
def test_holdout2_runs_have_their_own_cache_keys(mode: str) -> None:
    """Editing a holdout2 module (its digests) changes only holdout2 keys: the runs of the other
    tasks, the first held-out split's included, keep theirs."""
    digests = worker.source_digests()
    edited = dict(digests, zoo_holdout2="0" * 64, hook_holdout2="1" * 64)
    parts = ("train", "replay") if mode == "none" else ("train",)
    for task in ("mlp_digits", "lstm_chars", "lit_digits", "ae_signals", *holdout2.TASKS):
        job = {"task": task, "mult": 1.0, "seed": 0, "mode": mode}
        for part in parts:
            same = worker.job_key(job, digests, part) == worker.job_key(job, edited, part)
            assert same == (task not in holdout2.TASKS), (task, part)


def test_holdout2_is_its_own_split_and_not_in_the_default_sweep() -> None:
    import run
    import score

    names = {"vit_digits", "lstm_forecast", "ctr_embed"}
    assert set(score.HOLDOUT2_TASKS) == set(holdout2.TASKS) == names
    assert not set(holdout2.TASKS) & set(holdout.TASKS)
    assert all(score.split_of(t, s) == "holdout2" for t in holdout2.TASKS for s in (0, 1, 2))
    assert not set(run.TASK_NAMES) & set(holdout2.TASKS)
    assert score.SPLIT_TASKS["holdout2"] == score.HOLDOUT2_TASKS
    assert all(worker.HELD_OUT_SPLIT[t] == "holdout2" for t in holdout2.TASKS)


def test_vit_patches_are_the_images_2x2_blocks_in_row_order() -> None:
    """The ViT's patch cut, against torch's ``unfold`` (2x2 blocks, stride 2, row-major)."""
    from vit_task import PATCH, TinyViT

    x = torch.randn(3, 64)
    seen: list[torch.Tensor] = []
    vit = TinyViT()
    vit.embed.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    vit(x)
    ref = torch.nn.functional.unfold(x.reshape(3, 1, 8, 8), PATCH, stride=PATCH).transpose(1, 2)
    assert torch.equal(seen[0], ref)


def test_warmup_linear_rises_over_a_tenth_then_falls_to_zero() -> None:
    from vit_task import warmup_linear

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_linear(opt, 2.0, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[9] == pytest.approx(2.0)
    assert lrs[10] == pytest.approx(2.0 * 90 / 90) and lrs[55] == pytest.approx(2.0 * 45 / 90)
    assert lrs[99] == pytest.approx(2.0 / 90)


def test_worker_runs_a_holdout2_job_and_caches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's path: run_job dispatches a holdout2 task to holdout2.train and caches its facts
    (a ``plateau`` job: no lrwatch, so nothing of its verdicts is produced)."""
    monkeypatch.setattr(worker, "OUT", tmp_path)
    job = {"task": "ctr_embed", "mult": 1.0, "seed": 0, "mode": "plateau"}
    digests = worker.source_digests()
    first = worker.run_job(job, digests)
    assert first["task"] == "ctr_embed" and first["steps_run"] == holdout2.TASKS["ctr_embed"].steps
    assert list((tmp_path / "cache").glob("*.json")) == [
        tmp_path / "cache" / f"{worker.job_key(job, digests, 'train')}.json"
    ]
    assert worker.run_job(job, digests) == json.loads(json.dumps(first))  # from the cache
