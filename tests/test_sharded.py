"""Sharded training for real: FSDP2 under torchrun on gloo, every value checked, no hang.

The worker (tests/fsdp_worker.py) arms ``faulthandler`` so that a collective one rank never
joins ends the run with every rank's stack instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrwatch import schema

HERE = Path(__file__).parent


def torchrun(worker: str, *args: str, nproc: int = 2, timeout: float = 180) -> None:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), str(HERE / worker), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]


def scalars(logdir: Path) -> dict[str, dict[int, float]]:
    files = [f for f in logdir.iterdir() if "tfevents" in f.name]
    assert len(files) == 1, files  # only global rank 0 writes
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def check_against(got: dict[str, dict[int, float]], expected: dict[str, Any]) -> None:
    """Every logged step of every expected tag equals the reference (float tolerance)."""
    fsdp_total = {int(s): v for s, v in expected.pop("fsdp_clip_grad_norm").items()}
    logged = got[schema.GRAD_NORM]
    assert logged, "no grad norm logged"
    assert logged == pytest.approx({s: fsdp_total[s] for s in logged}, rel=1e-5)
    for tag, values in expected.items():
        assert tag in got, tag
        want = {int(s): v for s, v in values.items() if int(s) in got[tag]}
        assert want, tag
        assert got[tag] == pytest.approx(want, rel=2e-4, abs=1e-7), tag


def collectives_per_step(tmp_path: Path, nproc: int = 2) -> list[int]:
    """All-reduces lrwatch issued in each step, on every rank (each must be the same)."""
    counts = [
        json.loads((tmp_path / f"rank{r}.json").read_text())["all_reduces"] for r in range(nproc)
    ]
    assert all(c == counts[0] for c in counts)
    return list(counts[0])


@pytest.mark.slow
def test_fsdp2_logs_every_step_with_the_values_of_the_unsharded_run(tmp_path: Path) -> None:
    logdir = tmp_path / "run"
    torchrun("fsdp_worker.py", "--logdir", str(logdir), "--log-every", "1")
    got = scalars(logdir)
    check_against(got, json.loads((tmp_path / "expected.json").read_text()))
    assert collectives_per_step(tmp_path) == [1] * 6  # the grad norm is every step's


@pytest.mark.slow
def test_fsdp2_auto_cadence_is_agreed_by_every_rank(tmp_path: Path) -> None:
    logdir = tmp_path / "run"
    torchrun("fsdp_worker.py", "--logdir", str(logdir), "--log-every", "0", "--steps", "40")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["log_every"] == ranks[1]["log_every"]
    got = scalars(logdir)
    check_against(got, json.loads((tmp_path / "expected.json").read_text()))
    assert collectives_per_step(tmp_path) == [1] * 40  # logging step or not: ONE all-reduce
    assert set(got[schema.GRAD_NORM]) == set(range(1, 41))
    assert set(got[schema.UPDATE_RATIO]) >= set(range(1, 41))  # the dense start of "auto"


@pytest.mark.slow
def test_fsdp2_control_actions_apply_at_the_same_step_on_every_rank(tmp_path: Path) -> None:
    logdir = tmp_path / "run"
    torchrun("fsdp_control_worker.py", "--logdir", str(logdir))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["last_step"] == r1["last_step"] and r0["lr"] == r1["lr"]
    assert r0["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-6)
    lrs, norms = r0["lr"], r0["grad_norm"]
    # Actions written after steps 3, 13, 23 are read at the next check (every 10 steps).
    assert lrs[:9] == [0.1] * 9 and lrs[9:] == pytest.approx([0.05] * (len(lrs) - 9))
    assert max(norms[:19]) > 0.05 and max(norms[19:]) <= 0.05 * (1 + 1e-4)
    assert r0["last_step"] == 30
    got = scalars(logdir)
    assert {s for s, v in got[schema.STOP].items() if v == 1.0} == {30}
    preclip = got[schema.GRAD_NORM_PRECLIP]
    assert all(v > 0.05 for v in preclip.values())  # the clip acted on every logged step
    grad_norm = got[schema.GRAD_NORM]  # every step, before any clip
    unclipped = {s: norms[s - 1] for s in range(1, 20)}
    assert {s: grad_norm[s] for s in range(1, 20)} == pytest.approx(unclipped, rel=1e-5)
    assert {s: grad_norm[s] for s in preclip} == pytest.approx(preclip, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "nproc"), [("hsdp", 4), ("tp", 2), ("tp", 4)], ids=["hsdp-2x2", "tp-2", "tp-4"]
)
def test_hsdp_and_tensor_parallel_values_equal_the_unsharded_run(
    tmp_path: Path, layout: str, nproc: int
) -> None:
    logdir = tmp_path / "run"
    args = ["--logdir", str(logdir), "--layout", layout, "--steps", "4", "--log-every", "2"]
    torchrun("fsdp_worker.py", *args, nproc=nproc, timeout=240)
    got = scalars(logdir)
    check_against(got, json.loads((tmp_path / "expected.json").read_text()))
    assert collectives_per_step(tmp_path, nproc) == [1] * 4
    assert set(got[schema.UPDATE_RATIO]) == {1, 2, 4}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fail", "log_every"),
    [("step_grads:1:3", "2"), ("_after:0:3", "1")],
    ids=["pre-hook-rank1-between-logging-steps", "post-hook-rank0-logging-step"],
)
def test_a_failure_on_one_rank_stops_measuring_on_every_rank_without_a_hang(
    tmp_path: Path, fail: str, log_every: str
) -> None:
    """lrwatch's own code raises on one rank only, between backward and the all-reduce.

    Before, a rank failing in the post-hook skipped the all-reduce and the other waited in it
    until the process group's timeout (``_after``: the worker's faulthandler fired), and one
    failing in the pre-hook joined it with the previous step's norms (a wrong grad norm, no
    error). Now every rank issues it at that step with the same length, learns of the
    failure from it and stops measuring at the next step, together; training goes on.
    """
    logdir = tmp_path / "run"
    args = ["--logdir", str(logdir), "--steps", "6", "--log-every", log_every, "--fail", fail]
    torchrun("fsdp_worker.py", *args)
    failed = 3
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [6, 6]
    assert collectives_per_step(tmp_path) == [1] * failed + [0] * (6 - failed)
    got = scalars(logdir)
    assert set(got[schema.LOSS]) == set(range(1, 7))  # the rest of each row is still written
    assert set(got[schema.GRAD_NORM]) == set(range(1, failed))  # the failed step's sum dropped
    assert max(got[schema.UPDATE_RATIO]) < failed
    check_against(got, json.loads((tmp_path / "expected.json").read_text()))


def test_fsdp1_flat_parameters_are_not_measured_and_the_run_is_still_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """FSDP1 refuses a CPU (``FSDP needs a non-CPU accelerator device``), so its flat
    parameters are stood in for by plain ones marked with torch's own FSDP1 marker, in a
    one-rank gloo group. lrwatch writes no norm it would get wrong (rank 0's slice taken for
    the whole), says why once, and records the loss and the LR of every step.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    import lrwatch

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 2)
        for p in model.parameters():
            _set_fsdp_flattened(p)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with caplog.at_level("WARNING", logger="lrwatch"):
            with lrwatch.watch(model, opt, logdir=tmp_path / "run", log_every=1) as mon:
                for _ in range(3):
                    loss = model(torch.randn(8, 4)).pow(2).mean()
                    loss.backward()
                    mon.log(loss=loss)
                    opt.step()
                    opt.zero_grad()
    finally:
        dist.destroy_process_group()
    got = scalars(tmp_path / "run")
    assert not {schema.GRAD_NORM, schema.UPDATE_RATIO, schema.WEIGHT_NORM} & set(got)
    assert set(got[schema.LOSS]) == set(got[schema.lr_group_tag(0)]) == {1, 2, 3}
    assert caplog.text.count("FSDP1") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_write_one_run_and_every_node_applies_the_decisions(tmp_path: Path) -> None:
    """2 nodes x 2 processes, as two torchrun launches; each node has its own directory.

    Only node 0 (global rank 0) writes and reads the control file; node 1's directory stays
    empty of event files, yet its ranks apply the cut, the clip and the stop at the same steps.
    """
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        cmd += ["--node_rank", str(node), "--nproc_per_node", "2", "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "lrwatch-test"]
        cmd += [str(HERE / "fsdp_control_worker.py"), "--logdir", str(tmp_path / f"node{node}")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()  # only if still running after a timeout
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()[-6000:]
    results = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert len(results) == 4
    for r in results[1:]:
        assert r["lr"] == results[0]["lr"] and r["last_step"] == results[0]["last_step"] == 30
    assert [f.name for f in (tmp_path / "node0").glob("*tfevents*")]
    node1 = tmp_path / "node1"
    assert not node1.exists() or not list(node1.glob("*tfevents*"))
