"""Train a tiny BERT with the Hugging Face ``Trainer``, watched by lrwatch's callback.

The model is built from a config (no download) and learns a made-up task: does a sequence hold
more 1-tokens than 2-tokens? The only lrwatch line is ``callbacks=[LRWatchCallback()]``: it
attaches to the Trainer's model and optimizer, reads every step's loss from the model's output
(so it sees the NaN losses that the Trainer's logs hide with ``logging_nan_inf_filter``), writes
the eval metrics next to its tags and stops training when the control file says so::

    pip install transformers accelerate
    python examples/hf_trainer.py --logdir runs/hf_tiny_bert
    python examples/hf_trainer.py --logdir runs/hf_hot --lr 0.5    # too hot: stuck above chance
    lrwatch analyze runs/hf_tiny_bert

Every script in examples/ accepts ``--logdir`` and ``--quick``: tests/test_examples.py runs them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from a config, never the hub

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from lrwatch.hf import LRWatchCallback  # noqa: E402

VOCAB, LENGTH = 16, 24


class MoreOnes(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences labelled 1 when token 1 outnumbers token 2."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.labels = ((self.ids == 1).sum(1) > (self.ids == 2).sum(1)).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


def tiny_bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
    )
    config.num_labels = 2
    return BertForSequenceClassification(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/hf_tiny_bert", help="run directory")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="30 steps, for tests and smoke runs")
    args = parser.parse_args()
    steps = 30 if args.quick else args.steps

    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    training = TrainingArguments(
        output_dir=str(Path(args.logdir) / "trainer_output"),
        use_cpu=True,
        report_to=[],  # lrwatch writes the TensorBoard events itself
        max_steps=steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        warmup_steps=steps // 10,
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=max(steps // 3, 1),
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = Trainer(
        model=tiny_bert(args.seed),
        args=training,
        train_dataset=MoreOnes(2048, args.seed),
        eval_dataset=MoreOnes(256, args.seed + 1),
        callbacks=[LRWatchCallback(logdir=args.logdir)],
    )
    result = trainer.train()
    print(f"after {result.global_step} steps: train loss {result.training_loss:.4f}")
    if trainer.state.global_step < steps:
        print("stopped early: lrwatch asked to stop")

    print(f"\nevent files in {Path(args.logdir).resolve()}")
    print(f"look at them with:  tensorboard --logdir {args.logdir}")
    print(f"or ask lrwatch:     lrwatch analyze {args.logdir}")


if __name__ == "__main__":
    main()
