"""The Hugging Face callback with the real Trainer on CPU and a tiny model built from a config."""

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for the hub
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lrwatch import schema  # noqa: E402
from lrwatch.control import append_action  # noqa: E402
from lrwatch.hf import LRWatchCallback  # noqa: E402
from lrwatch.schema import ActionKind  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Regression(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Token sequences whose target is the share of token 1; ``nan_at`` poisons one label."""

    def __init__(self, n: int = 32, length: int = 8, nan_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 4, (n, length), generator=g)
        self.labels = (self.ids == 1).float().mean(1)
        if nan_at is not None:
            self.labels[nan_at] = math.nan

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


def tiny_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    config.num_labels, config.problem_type = 1, "regression"
    return BertForSequenceClassification(config)


class LossRecorder(TrainerCallback):
    """An independent record: the model's training losses, grouped by the step they led to."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.current: list[float] = []
        self.per_step: dict[int, list[float]] = {}
        model.register_forward_hook(self._on_forward)

    def _on_forward(self, module: Any, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled():
            self.current.append(output.loss.item())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.per_step[state.global_step], self.current = self.current, []


def make_trainer(tmp_path: Path, data: Regression, callbacks: list[Any], **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    options.update(kwargs)
    model = tiny_model()
    recorder = LossRecorder(model)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**options),
        train_dataset=data,
        eval_dataset=Regression(n=8),
        callbacks=[*callbacks, recorder],
    )
    return trainer, recorder


def scalars(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_hf_callback_records_each_steps_mean_loss_and_eval_metrics(tmp_path: Path) -> None:
    trainer, recorder = make_trainer(
        tmp_path,
        Regression(),
        [LRWatchCallback(log_every=1)],
        max_steps=6,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=3,
    )
    trainer.train()
    acc = scalars(tmp_path / "out" / "lrwatch")
    loss = acc.Scalars(schema.LOSS)
    assert [e.step for e in loss] == list(range(1, 7))
    expected = [sum(recorder.per_step[s]) / 2 for s in range(1, 7)]
    assert [e.value for e in loss] == pytest.approx(expected, rel=1e-5)
    hf_eval = [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    got = [(e.step, e.value) for e in acc.Scalars("eval_loss")]
    assert [s for s, _ in got] == [s for s, _ in hf_eval] == [3, 6]
    assert [v for _, v in got] == pytest.approx([v for _, v in hf_eval], rel=1e-6)
    lr = {e.step: e.value for e in acc.Scalars(schema.LR)}
    hf_lr = {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "loss" in h}
    assert set(hf_lr) <= set(lr)
    assert {s: lr[s] for s in hf_lr} == pytest.approx(hf_lr, rel=1e-6)
    assert {schema.GRAD_NORM, schema.UPDATE_RATIO, schema.NONFINITE} <= set(acc.Tags()["scalars"])


def test_hf_callback_sees_the_nan_loss_the_trainer_filters_from_its_logs(tmp_path: Path) -> None:
    trainer, recorder = make_trainer(
        tmp_path, Regression(n=16, nan_at=5), [LRWatchCallback(log_every=1)], max_steps=6
    )
    assert trainer.args.logging_nan_inf_filter  # the default under test
    trainer.train()
    hf_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(hf_losses) == 6 and all(math.isfinite(v) for v in hf_losses)
    acc = scalars(tmp_path / "out" / "lrwatch")
    got = [math.isfinite(e.value) for e in acc.Scalars(schema.LOSS)]
    truth = [math.isfinite(recorder.per_step[s][0]) for s in range(1, 7)]
    assert not all(truth)  # the poisoned sample was drawn (it is in every epoch)
    assert got == truth
    flagged = [e.step for e in acc.Scalars(schema.NONFINITE) if e.value == 1.0]
    assert flagged and flagged[0] == truth.index(False) + 1


class StopAt(TrainerCallback):
    """Plays the daemon: appends a stop action to the run's control file at ``step``."""

    def __init__(self, watcher: LRWatchCallback, step: int) -> None:
        self.watcher, self.step = watcher, step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and self.watcher.monitor is not None:
            append_action(self.watcher.monitor.run_dir, action=ActionKind.STOP, reason="test")


def test_hf_callback_turns_a_stop_action_into_should_training_stop(tmp_path: Path) -> None:
    watcher = LRWatchCallback(log_every=1, control_every=1)
    trainer, _ = make_trainer(
        tmp_path, Regression(), [watcher, StopAt(watcher, 3)], max_steps=40, logging_steps=100
    )
    trainer.train()
    assert trainer.state.global_step == 4  # applied at the next step boundary
    acc = scalars(tmp_path / "out" / "lrwatch")
    assert [(e.step, e.value) for e in acc.Scalars(schema.STOP)] == [(4, 1.0)]
    assert watcher.monitor is None  # closed at train end


def test_importing_lrwatch_imports_neither_lightning_nor_transformers() -> None:
    code = (
        "import sys, lrwatch\n"
        "names = ('lightning', 'pytorch_lightning', 'transformers')\n"
        "bad = [m for m in names if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


class OwnLoss(Trainer):
    """A Trainer that computes the loss itself, so the model's output carries none."""

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.mse_loss(outputs.logits.squeeze(-1), labels)
        return (loss, outputs) if return_outputs else loss


def test_hf_callback_falls_back_to_the_logged_loss_without_a_model_loss(tmp_path: Path) -> None:
    model = tiny_model()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        max_steps=6,
        logging_steps=2,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = OwnLoss(
        model=model, args=args, train_dataset=Regression(), callbacks=[LRWatchCallback()]
    )
    trainer.train()
    hf = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    got = [(e.step, e.value) for e in scalars(tmp_path / "out" / "lrwatch").Scalars(schema.LOSS)]
    assert [s for s, _ in got] == [s for s, _ in hf] == [2, 4, 6]
    assert [v for _, v in got] == pytest.approx([v for _, v in hf], rel=1e-6)


def test_hf_callback_continues_the_step_axis_after_a_resume(tmp_path: Path) -> None:
    first, _ = make_trainer(
        tmp_path,
        Regression(),
        [LRWatchCallback()],
        max_steps=4,
        save_strategy="steps",
        save_steps=4,
    )
    first.train()
    again, _ = make_trainer(tmp_path, Regression(), [LRWatchCallback()], max_steps=6)
    again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    run = tmp_path / "out" / "lrwatch"
    assert len([f for f in run.iterdir() if "tfevents" in f.name]) == 2
    assert [e.step for e in scalars(run).Scalars(schema.LOSS)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_hf_trainer_asked_for_fsdp_on_cpu_runs_ddp_and_the_callback_stays_exact(
    tmp_path: Path,
) -> None:
    """``fsdp=True`` with FSDP2 under torchrun on CPU: Accelerate falls back to DDP silently.

    Pinned here (the README's table says so): when Accelerate shards on CPU one day, this fails
    and the table changes. Under that DDP, lrwatch's grad norm equals the Trainer's own logged
    pre-clip total every step, and a stop ends both ranks at the same step.
    """
    from test_sharded import scalars, torchrun

    torchrun("hf_fsdp_worker.py", str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["wrapped"] == r1["wrapped"] == "DistributedDataParallel"
    # Appended after step 3, read at the step-5 check by rank 0 and broadcast to rank 1.
    assert r0["global_step"] == r1["global_step"] == 5
    got = scalars(tmp_path / "run")
    assert [s for s, v in got[schema.STOP].items() if v == 1.0] == [5]
    trainers = {int(s): v for s, v in r0["grad_norm"].items()}
    assert got[schema.GRAD_NORM] == pytest.approx(trainers, rel=1e-5)


def test_issue14_hf_run_appears_once_in_tensorboard_with_both_writers_charts(
    tmp_path: Path,
) -> None:
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    trainer, _ = make_trainer(
        tmp_path,
        Regression(),
        [LRWatchCallback(log_every=1)],
        max_steps=6,
        report_to=["tensorboard"],
        eval_strategy="steps",
        eval_steps=3,
    )
    trainer.train()
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path / "out"))
    mux.Reload()
    [run] = mux.Runs()  # one run: the Trainer's own runs/<date>_<host>
    assert run.startswith("runs/")
    tags = set(mux.GetAccumulator(run).Tags()["tensors"])  # scalars come as tensors here
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= tags  # the Trainer's
    assert {schema.LOSS, schema.LR, schema.GRAD_NORM} <= tags  # lrwatch's, in the same run
    assert "eval_loss" not in tags  # the Trainer's callback writes eval/loss already
    assert not (tmp_path / "out" / "lrwatch").exists()


def test_hf_callback_keeps_its_own_run_without_the_trainers_tensorboard(tmp_path: Path) -> None:
    trainer, _ = make_trainer(tmp_path, Regression(n=16), [LRWatchCallback()], max_steps=2)
    trainer.train()  # report_to=[]: nobody else writes TensorBoard
    assert schema.LOSS in scalars(tmp_path / "out" / "lrwatch").Tags()["scalars"]
    assert not (tmp_path / "out" / "runs").exists()
