"""Rollback and every control action under a real FSDP2 job and a real DDP job (torchrun, gloo).

A rollback restores each rank's own copies (local shards under FSDP2): a rank that restored
alone, or restored another step than the others, leaves a model no rank ever trained, and a
rank left alone in a collective hangs the job. The worker (tests/rollback_worker.py) keeps its
own record of every rank's full parameters and optimizer state, and these tests compare lrwatch's
restores with it, exactly, on every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fsdp_worker import build
from test_sharded import scalars, torchrun

from lrwatch import schema

CLIP = 0.05  # tests/rollback_worker.py's schedule: actions read at the check steps (every 5)
CUT_AT, ROLLBACKS, CLIP_AT, STOP_AT = 5, {35: 30, 40: 20}, 45, 50


def results(tmp_path: Path) -> list[dict[str, Any]]:
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def assert_same(got: dict[str, dict[str, torch.Tensor]], want: dict[str, Any]) -> None:
    """Full parameters and optimizer state equal bit for bit, tensor by tensor."""
    assert got.keys() == want.keys()
    for name, values in want.items():
        assert got[name].keys() == values.keys(), name
        for key, value in values.items():
            torch.testing.assert_close(got[name][key], value, rtol=0, atol=0, msg=f"{name} {key}")


def failures(result: dict[str, Any]) -> list[str]:
    return [msg for _, msg in result["said"] if "failed" in msg or "no rank" in msg]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_rollback_cut_clip_and_stop_act_alike_on_every_rank(tmp_path: Path, layout: str) -> None:
    logdir = tmp_path / "run"
    torchrun("rollback_worker.py", "--logdir", str(logdir), "--layout", layout, timeout=120)
    r0, r1 = results(tmp_path)
    for r in (r0, r1):
        assert r["last_step"] == STOP_AT and r["mon_step"] == list(range(1, STOP_AT + 1))
        assert r["lr"] == [0.01] * (CUT_AT - 1) + [0.005] * (STOP_AT - CUT_AT + 1)
        for read_at, restored in ROLLBACKS.items():  # the record of before that step's update,
            assert_same(r["after"][read_at], r["before"][restored])  # and no update on top
        assert not failures(r), failures(r)
        norms = r["grad_norm"]  # what the optimizer stepped with (0: a rollback dropped them)
        assert [norms[s - 1] for s in ROLLBACKS] == [0.0, 0.0]
        unclipped = [n for s, n in enumerate(norms, 1) if s < CLIP_AT and s not in ROLLBACKS]
        assert min(unclipped) > CLIP >= max(norms[CLIP_AT - 1 :]) / (1 + 1e-5)
    whole = sum(p.numel() * p.element_size() for p in build().parameters())
    assert r0["param_bytes"] == r1["param_bytes"] == whole  # "auto": the same choice everywhere
    for key in ("lr", "mon_step"):
        assert r0[key] == r1[key], key
    assert r0["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-6)
    for step, state in r0["before"].items():  # every rank saw the same whole model
        assert_same(r1["before"][step], state)
    got = scalars(logdir)
    assert set(got[schema.GRAD_NORM]) == set(range(1, STOP_AT + 1))  # measuring went on
    assert sorted(got[schema.CONTROL_ACK]) == [CUT_AT, *ROLLBACKS, CLIP_AT, STOP_AT]
    assert {s for s, v in got[schema.STOP].items() if v == 1.0} == {STOP_AT}


@pytest.mark.slow
def test_a_copy_missing_on_one_rank_rolls_back_no_rank(tmp_path: Path) -> None:
    """Rank 1 fails to copy step 30 (its device full, say); rank 0 has the copy.

    Asked for step 30, rank 0 would restore its shards of step 30 and rank 1 its shards of
    step 20: a model no rank ever trained. Every rank must restore the same step or none.
    """
    logdir = tmp_path / "run"
    args = ["--logdir", str(logdir), "--layout", "fsdp", "--fail-take", "1:30"]
    torchrun("rollback_worker.py", *args, timeout=120)
    for r in results(tmp_path):
        for name, values in r["after"][35].items():  # a plain step: every value moved
            for old in (30, 20):
                assert (values["param"] != r["before"][old][name]["param"]).all(), (name, old)
        assert sum("no rank rolls back" in msg for _, msg in r["said"]) == 1
        assert_same(r["after"][40], r["before"][20])  # asked for 25: every rank holds 20
        assert r["lr"] == [0.01] * (CUT_AT - 1) + [0.005] * (STOP_AT - CUT_AT + 1)


@pytest.mark.slow
def test_a_measuring_failure_on_the_rollback_step_neither_hangs_nor_stops_the_job(
    tmp_path: Path,
) -> None:
    """Rank 1's measuring fails on the (logging) step that reads the rollback.

    The step's all-reduce must still match on every rank: the gradients' norms were taken
    before the rollback dropped the gradients, so the failed rank's zeros must count them too.
    Every rank then stops measuring, and the rollback and the training go on.
    """
    logdir = tmp_path / "run"
    args = ["--logdir", str(logdir), "--layout", "fsdp", "--fail", "start:1:35"]
    torchrun("rollback_worker.py", *args, timeout=120)
    for r in results(tmp_path):
        assert r["last_step"] == STOP_AT
        assert_same(r["after"][35], r["before"][30])
        assert_same(r["after"][40], r["before"][20])
    got = scalars(logdir)
    assert set(got[schema.GRAD_NORM]) == set(range(1, 35))  # the failed step's sum dropped
    assert set(got[schema.LOSS]) == set(range(1, STOP_AT + 1))
