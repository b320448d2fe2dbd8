"""The Lightning callback with the real Trainer on CPU: tags in the logger's run, loss, stop."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

from lrwatch import schema  # noqa: E402
from lrwatch.control import append_action  # noqa: E402
from lrwatch.lightning import LRWatch  # noqa: E402
from lrwatch.schema import ActionKind  # noqa: E402

pytestmark = [
    # Lightning's advice for real runs (more dataloader workers, ...), not failures here.
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*"),
]


class Tiny(pl.LightningModule):
    """A linear classifier that records every training loss it returns, for comparison."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.lr = lr
        self.train_losses: list[float] = []
        self.val_losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.train_losses.append(loss.item())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("val_loss", loss)
        if not self.trainer.sanity_checking:
            self.val_losses.append(loss.item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loaders(
    n: int = 64, batch_size: int = 8, nan_row: int | None = None
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    if nan_row is not None:
        x[nan_row, 0] = math.nan
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16)
    return train, val


def trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> Any:
    torch.manual_seed(0)
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
        "logger": TensorBoardLogger(str(tmp_path / "tb")),
        "callbacks": callbacks,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def scalars(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_lightning_callback_writes_the_steps_losses_into_the_loggers_run(tmp_path: Path) -> None:
    model = Tiny()
    t = trainer(tmp_path, [LRWatch(log_every=1)], max_steps=12, val_check_interval=4)
    train, val = loaders()
    t.fit(model, train, val)
    run = Path(t.logger.log_dir)
    assert run == tmp_path / "tb" / "lightning_logs" / "version_0"
    acc = scalars(run)
    tags = set(acc.Tags()["scalars"])
    assert {schema.LOSS, schema.LR, schema.GRAD_NORM, schema.UPDATE_RATIO} <= tags
    assert "val_loss" in tags  # Lightning's own logger, same run directory
    loss = acc.Scalars(schema.LOSS)
    assert [e.step for e in loss] == list(range(1, 13))
    assert [e.value for e in loss] == pytest.approx(model.train_losses, rel=1e-6)
    assert all(e.value == pytest.approx(0.1) for e in acc.Scalars(schema.LR))


def test_lightning_callback_averages_accumulated_batches_per_step(tmp_path: Path) -> None:
    model = Tiny()
    cb = LRWatch(log_every=1)
    t = trainer(tmp_path, [cb], max_steps=4, accumulate_grad_batches=2, limit_val_batches=0)
    t.fit(model, loaders()[0])
    loss = scalars(Path(t.logger.log_dir)).Scalars(schema.LOSS)
    pairs = [model.train_losses[i : i + 2] for i in range(0, 8, 2)]
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([sum(p) / 2 for p in pairs], rel=1e-6)


def test_lightning_callback_writes_val_metrics_when_no_tensorboard_logger(tmp_path: Path) -> None:
    model = Tiny()
    t = trainer(
        tmp_path, [LRWatch()], max_steps=8, val_check_interval=4, logger=CSVLogger(tmp_path)
    )
    train, val = loaders()
    t.fit(model, train, val)
    acc = scalars(tmp_path / "lrwatch")
    val_loss = acc.Scalars("val_loss")
    assert [e.step for e in val_loss] == [4, 8]
    assert [e.value for e in val_loss] == pytest.approx(model.val_losses, rel=1e-6)
    assert len(acc.Scalars(schema.LOSS)) == 8


class StopAfter(pl.Callback):
    """Plays the daemon: appends a stop action to the run's control file after ``batches``."""

    def __init__(self, watcher: LRWatch, batches: int) -> None:
        self.watcher, self.batches = watcher, batches

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.batches:
            assert self.watcher.monitor is not None
            append_action(self.watcher.monitor.run_dir, action=ActionKind.STOP, reason="test")


def test_lightning_callback_turns_a_stop_action_into_trainer_should_stop(tmp_path: Path) -> None:
    watcher = LRWatch(log_every=1, control_every=1)
    t = trainer(tmp_path, [watcher, StopAfter(watcher, 5)], max_steps=50, limit_val_batches=0)
    t.fit(Tiny(), loaders()[0])
    assert t.should_stop
    assert t.global_step == 6  # the action lands at the next step boundary
    acc = scalars(Path(t.logger.log_dir))
    assert [(e.step, e.value) for e in acc.Scalars(schema.STOP)] == [(6, 1.0)]
    assert [e.step for e in acc.Scalars(schema.LOSS)] == list(range(1, 7))
    assert watcher.monitor is None  # closed at fit end


class CutAfter(pl.Callback):
    """Plays the daemon: appends an LR cut by 10 to the run's control file after ``batches``."""

    def __init__(self, watcher: LRWatch, batches: int) -> None:
        self.watcher, self.batches = watcher, batches

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.batches:
            assert self.watcher.monitor is not None
            run = self.watcher.monitor.run_dir
            append_action(run, action=ActionKind.LR_CUT, factor=10, reason="test")


def test_issue12_lr_monitor_shows_the_schedulers_lr_after_a_cut_and_lrwatch_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor

    watcher = LRWatch(log_every=1, control_every=1)
    callbacks = [watcher, CutAfter(watcher, 5), LearningRateMonitor(logging_interval="step")]
    t = trainer(tmp_path, callbacks, max_steps=10, limit_val_batches=0, log_every_n_steps=1)
    with caplog.at_level("WARNING", logger="lrwatch"):
        t.fit(Tiny(lr=0.1), loaders()[0])
    acc = scalars(Path(t.logger.log_dir))
    effective = {e.step: e.value for e in acc.Scalars(schema.LR)}  # the ack row repeats step 6
    assert effective == {s: pytest.approx(0.1 if s <= 5 else 0.01) for s in range(1, 11)}
    # Why Lightning's chart disagrees: LearningRateMonitor reads param_groups between steps,
    # where lrwatch keeps the scheduler's value (so a scheduler never compounds the cut).
    monitor = [e.value for e in acc.Scalars("lr-SGD")]
    assert len(monitor) >= 10 and monitor == [pytest.approx(0.1)] * len(monitor)
    [line] = [r.getMessage() for r in caplog.records if "LearningRateMonitor" in r.getMessage()]
    assert "from step 6 the optimizer steps with lr 0.01" in line
    assert "scheduler's 0.1 / 10" in line and schema.LR in line


def test_lightning_callback_records_a_nan_loss(tmp_path: Path) -> None:
    model = Tiny()
    t = trainer(tmp_path, [LRWatch(log_every=1)], max_steps=6, limit_val_batches=0)
    t.fit(model, loaders(nan_row=4 * 8)[0])  # batch 5: NaN loss, NaN weights from then on
    acc = scalars(Path(t.logger.log_dir))
    values = [e.value for e in acc.Scalars(schema.LOSS)]
    assert [math.isfinite(v) for v in values] == [True] * 4 + [False] * 2
    assert [math.isfinite(v) for v in model.train_losses] == [True] * 4 + [False] * 2
    assert max(e.value for e in acc.Scalars(schema.NONFINITE)) == 1.0


@pytest.mark.slow
def test_lightning_ddp_ranks_stop_at_the_same_step(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("lightning_ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": str(worker.parents[1]), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launch, "--nproc_per_node", "2", str(worker), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Appended after step 7, read at the step-10 check by rank 0 and broadcast to rank 1.
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"global_step": 10, "should_stop": True}
    assert [(e.step, e.value) for e in scalars(tmp_path).Scalars(schema.STOP)] == [(10, 1.0)]
    assert len([f for f in tmp_path.iterdir() if f.name.endswith(".lrwatch")]) == 1


@pytest.mark.slow
def test_lightning_fsdp2_grad_norm_is_the_dtensor_total_and_actions_apply_on_every_rank(
    tmp_path: Path,
) -> None:
    """``ModelParallelStrategy`` + ``fully_shard`` in ``configure_model``, 2 ranks, gloo."""
    from test_sharded import check_against, torchrun

    torchrun("lightning_fsdp_worker.py", str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # the same LR and the same global norm each step, the same last step
    # A cut appended after step 2 and a stop after step 6, read at the checks of steps 5, 10.
    assert r0["lr"] == pytest.approx([0.01] * 4 + [0.005] * 6)
    assert r0["global_step"] == 10
    acc = scalars(tmp_path / "run")
    got = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}
    assert [s for s, v in got[schema.STOP].items() if v == 1.0] == [10]
    totals = dict(enumerate(r0["grad_norm"], start=1))
    assert got[schema.GRAD_NORM] == pytest.approx(totals, rel=1e-5)  # every step
    before_cut = {t: {s: v for s, v in vs.items() if s <= 4} for t, vs in got.items()}
    expected = json.loads((tmp_path / "expected.json").read_text())
    check_against(before_cut, {"fsdp_clip_grad_norm": totals, **expected})


class Overflowing(Tiny):
    """Leaves an Inf in one gradient after backward at ``batch``, as an fp16 overflow would."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch

    def on_after_backward(self) -> None:
        if len(self.train_losses) == self.batch + 1:
            first = next(self.parameters()).grad
            assert first is not None
            first[0, 0] = math.inf


def test_lightning_callback_records_the_16_mixed_scalers_skips(tmp_path: Path) -> None:
    from lightning.pytorch.plugins import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256))
    t = trainer(tmp_path, [LRWatch()], max_steps=8, limit_val_batches=0, plugins=[plugin])
    t.fit(Overflowing(batch=3), loaders()[0])
    acc = scalars(Path(t.logger.log_dir))
    skipped = [(e.step, e.value) for e in acc.Scalars(schema.SKIPPED)]
    assert skipped == [(s, float(s == 4)) for s in range(1, 9)]  # the 4th iteration skipped
    scales = [e.value for e in acc.Scalars(schema.LOSS_SCALE)]
    assert scales == [256.0] * 4 + [128.0] * 4  # halved by the skip, as GradScaler does
    assert t.global_step == 8


def test_lightning_callback_resumes_the_step_count_from_a_checkpoint(tmp_path: Path) -> None:
    t = trainer(tmp_path, [LRWatch()], max_steps=8, limit_val_batches=0)  # one whole epoch
    t.fit(Tiny(), loaders()[0])
    ckpt = tmp_path / "eight.ckpt"
    t.save_checkpoint(ckpt)
    resumed = trainer(tmp_path, [LRWatch(log_every=1)], max_steps=12, limit_val_batches=0)
    resumed.fit(Tiny(), loaders()[0], ckpt_path=str(ckpt))
    loss = scalars(Path(resumed.logger.log_dir)).Scalars(schema.LOSS)
    assert Path(resumed.logger.log_dir).name == "version_1"
    assert [e.step for e in loss] == [9, 10, 11, 12]  # the step axis goes on, as Lightning's does
