"""``hf_gpt2``: a held-out zoo task written the way a Hugging Face ``Trainer`` user writes it.

A tiny GPT-2 built from a ``GPT2Config`` (no download) learning Python's standard-library
sources character by character (the zoo's ``stdlib_text``), trained by the ``Trainer`` with its
own AdamW, linear warm-up + cosine schedule and ``max_grad_norm``, evaluated by the Trainer's
evaluation loop every ``VAL_EVERY`` steps, lrwatch attached through ``lrwatch.hf``. The Trainer
reports to nothing, logs nothing, saves nothing and shows no progress bar.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from a config, never the hub

import torch  # noqa: E402
from framework_run import (  # noqa: E402
    STEP_SLEEP,
    VAL_EVERY,
    Facts,
    PlateauOnOptimizer,
    apply_daemon,
    wait_for_daemon,
    watch_kwargs,
)
from tasks import VOCAB, stdlib_text  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from lrwatch.hf import LRWatchCallback  # noqa: E402

SEQ, BATCH = 64, 16
WARMUP = 30
CLIP = 1.0  # TrainingArguments.max_grad_norm (also the Trainer's default)


class Windows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``SEQ``-character windows of a token stream; the model shifts the labels itself."""

    def __init__(self, src: torch.Tensor, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(src) - SEQ, (n,), generator=g)
        self.ids = torch.stack([src[s : s + SEQ] for s in starts.tolist()])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class _ZooFacts(TrainerCallback):
    """Gathers the zoo's facts from the Trainer's events; runs after lrwatch's callback."""

    def __init__(self, mode: str, run_dir: Path, lrw: LRWatchCallback | None) -> None:
        self.mode, self.run_dir, self.lrw = mode, run_dir, lrw
        self.facts = Facts()
        self.plateau: PlateauOnOptimizer | None = None
        self.training = False
        self._loss: torch.Tensor | None = None
        self._handle: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.training = True
        self._handle = kw["model"].register_forward_hook(self._on_forward)
        if self.mode == "plateau":
            self.plateau = PlateauOnOptimizer(_unwrap(kw["optimizer"]))
        if self.mode == "apply" and self.lrw is not None:
            wait_for_daemon(self.lrw.monitor, self.run_dir)

    def _on_forward(self, module: Any, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled():
            self._loss = output.loss.detach()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.mode == "apply":
            time.sleep(STEP_SLEEP)
        loss = float("nan") if self._loss is None else float(self._loss.item())
        if self.facts.train_loss(state.global_step, loss):
            control.should_training_stop = True
        mon = self.lrw.monitor if self.lrw is not None else None
        if mon is not None and mon.should_stop:  # lrwatch's callback stops the Trainer
            self.facts.stopped = True

    def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.training:
            return  # the final evaluate() after training is not a curve point
        val = float(kw["metrics"]["eval_loss"])
        self.facts.val_loss(state.global_step, val)
        if self.plateau is not None:
            self.plateau.val_loss(val)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.training = False
        self._handle.remove()
        if self.plateau is not None:
            self.plateau.remove()


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper (itself an Optimizer subclass whose own
    hook registry is never run): the inner optimizer's step hooks are the ones that fire."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    assert isinstance(optimizer, torch.optim.Optimizer)
    return optimizer


def _args(lr: float, steps: int, seed: int, run_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(run_dir / "trainer_output"),  # nothing is saved there
        use_cpu=True,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=64,
        learning_rate=lr,
        weight_decay=0.01,
        warmup_steps=WARMUP,
        lr_scheduler_type="cosine",
        max_grad_norm=CLIP,
        eval_strategy="steps",
        eval_steps=VAL_EVERY,
        seed=seed,
        dataloader_num_workers=0,
    )


def train(lr: float, steps: int, seed: int, mode: str, run_dir: Path) -> dict[str, Any]:
    """One run of ``hf_gpt2`` in ``mode`` (trainer.py's modes), its facts as trainer.py's."""
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    data = stdlib_text()
    cut = int(len(data) * 0.9)
    torch.manual_seed(seed)
    model = tiny_gpt2()
    lrw = LRWatchCallback(logdir=run_dir, **watch_kwargs(mode)) if mode != "plateau" else None
    zoo = _ZooFacts(mode, run_dir, lrw)
    with apply_daemon(mode, run_dir):
        trainer = Trainer(
            model=model,
            args=_args(lr, steps, seed, run_dir),
            train_dataset=Windows(data[:cut], steps * BATCH, 1234),
            eval_dataset=Windows(data[cut:], 64, 1000 + seed),
            callbacks=[c for c in (lrw, zoo) if c is not None],
        )
        trainer.remove_callback(PrinterCallback)  # disable_tqdm prints every log dict instead
        trainer.train()
    final = trainer.evaluate()["eval_loss"]
    return zoo.facts.result(float(final), zoo.plateau)
