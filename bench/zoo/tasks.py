"""The zoo's tasks: small real trainings of different shapes, written the way users write them.

Each task is a genuine training on data that needs no download: character-level language models
on Python's own standard-library sources, classifiers on scikit-learn's digits and breast-cancer
sets, a regression MLP on diabetes. They mix optimizers (SGD, SGD + momentum, Adam, AdamW),
schedules (constant, StepLR, warm-up + cosine, OneCycle), the user's own ``clip_grad_norm_`` and
bf16 autocast, because the advisor failed on exactly that variety. ``lr`` is each task's tuned
learning rate (the sweep multiplies it); a run of any task takes a few seconds on one core.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Setup:
    """One task instantiated for a seed: what a user's script would hold before its loop."""

    model: nn.Module
    loss_fn: nn.Module
    batch: Callable[[torch.Generator], Batch]
    val: Batch
    optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
    schedule: Callable[[torch.optim.Optimizer, float, int], torch.optim.lr_scheduler.LRScheduler]
    clip: float | None = None  # the user's own clip_grad_norm_
    bf16: bool = False  # forward under torch.autocast("cpu", torch.bfloat16)


@dataclass(frozen=True)
class Task:
    name: str
    lr: float  # the tuned learning rate: multiplier 1 of the sweep
    steps: int
    build: Callable[[int], Setup]
    note: str


# ------------------------------------------------------------------------------ data
def _standardise(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[torch.Tensor, ...]:
    """A fixed validation quarter per seed; features standardised with training statistics."""
    idx = np.random.default_rng(seed).permutation(len(x))
    val, tr = idx[: len(x) // 4], idx[len(x) // 4 :]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    x = ((x - mu) / sd).astype(np.float32)
    return torch.tensor(x[tr]), torch.tensor(y[tr]), torch.tensor(x[val]), torch.tensor(y[val])


def _sampler(x: torch.Tensor, y: torch.Tensor, size: int) -> Callable[[torch.Generator], Batch]:
    def batch(gen: torch.Generator) -> Batch:
        idx = torch.randint(0, len(x), (size,), generator=gen)
        return x[idx], y[idx]

    return batch


_TEXT_FILES = ("argparse.py", "dataclasses.py", "functools.py", "pathlib.py", "typing.py")
VOCAB = 96  # printable ASCII plus newline; anything else maps to one "other" symbol


def stdlib_text() -> torch.Tensor:
    """Some of Python's own standard library as a character stream (the same on every machine
    with this Python), encoded into ``VOCAB`` symbols."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / name).read_text(encoding="utf-8") for name in _TEXT_FILES)
    codes = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).astype(np.int64)
    codes = np.where(codes == 10, 95, codes - 32)
    codes = np.where((codes < 0) | (codes >= VOCAB), 0, codes)
    return torch.tensor(codes)


def _text_batches(
    seq: int, size: int, seed: int
) -> tuple[Callable[[torch.Generator], Batch], Batch]:
    data = stdlib_text()
    cut = int(len(data) * 0.9)
    train, held = data[:cut], data[cut:]

    def windows(src: torch.Tensor, starts: torch.Tensor) -> Batch:
        rows = torch.stack([src[s : s + seq + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def batch(gen: torch.Generator) -> Batch:
        return windows(train, torch.randint(0, len(train) - seq - 1, (size,), generator=gen))

    fixed = torch.Generator().manual_seed(1000 + seed)
    return batch, windows(held, torch.randint(0, len(held) - seq - 1, (64,), generator=fixed))


# ------------------------------------------------------------------------------ schedules
def constant(
    opt: torch.optim.Optimizer, lr: float, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def step_lr(every: int, gamma: float) -> Callable[..., torch.optim.lr_scheduler.LRScheduler]:
    def make(
        opt: torch.optim.Optimizer, lr: float, steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.StepLR(opt, every, gamma)

    return make


def warmup_cosine(warm: int) -> Callable[..., torch.optim.lr_scheduler.LRScheduler]:
    def make(
        opt: torch.optim.Optimizer, lr: float, steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        def f(s: int) -> float:
            if s < warm:
                return (s + 1) / warm
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min((s - warm) / (steps - warm), 1)))

        return torch.optim.lr_scheduler.LambdaLR(opt, f)

    return make


def one_cycle(
    opt: torch.optim.Optimizer, lr: float, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps + 1)


def _sgd(momentum: float) -> Callable[[list[nn.Parameter], float], torch.optim.Optimizer]:
    return lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=momentum)


def _adam(p: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(p, lr=lr)


def _adamw(p: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(p, lr=lr, weight_decay=0.01)


# ------------------------------------------------------------------------------ models
def _mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


class CharGRU(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.gru = nn.GRU(32, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(x))
        return self.head(out).reshape(-1, VOCAB)


class CharLSTM(nn.Module):
    def __init__(self, hidden: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.lstm = nn.LSTM(32, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out).reshape(-1, VOCAB)


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, seq: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        block = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(self.body(h, mask=self.mask, is_causal=True)).reshape(-1, VOCAB)


class FlatCE(nn.Module):
    """Cross-entropy for a language model whose targets come as (batch, seq)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), target.reshape(-1))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(-1, 1, 8, 8))


# ------------------------------------------------------------------------------ the tasks
def _digits(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _standardise(d.data, d.target.astype(np.int64), seed)


def mlp_digits(seed: int) -> Setup:
    xtr, ytr, xva, yva = _digits(seed)
    return Setup(
        _mlp((64, 128, 10)),
        nn.CrossEntropyLoss(),
        _sampler(xtr, ytr, 32),
        (xva, yva),
        _sgd(0.9),
        constant,
    )


def cnn_digits(seed: int) -> Setup:
    xtr, ytr, xva, yva = _digits(seed)
    return Setup(
        CNN(), nn.CrossEntropyLoss(), _sampler(xtr, ytr, 32), (xva, yva), _adam, step_lr(150, 0.3)
    )


def reg_diabetes(seed: int) -> Setup:
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    y = ((d.target - d.target.mean()) / d.target.std()).astype(np.float32)[:, None]
    xtr, ytr, xva, yva = _standardise(d.data, y, seed)
    return Setup(
        _mlp((10, 64, 64, 1)),
        nn.MSELoss(),
        _sampler(xtr, ytr, 32),
        (xva, yva),
        _adamw,
        warmup_cosine(50),
        clip=1.0,
    )


def mlp_cancer(seed: int) -> Setup:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    xtr, ytr, xva, yva = _standardise(d.data, d.target.astype(np.int64), seed)
    return Setup(
        _mlp((30, 64, 2)),
        nn.CrossEntropyLoss(),
        _sampler(xtr, ytr, 32),
        (xva, yva),
        _sgd(0.0),
        step_lr(150, 0.5),
    )


def mlp_synth(seed: int) -> Setup:
    """Generated data (scikit-learn's make_classification): 5 classes, 10 informative of 20."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        3000, 20, n_informative=10, n_classes=5, class_sep=0.8, random_state=100 + seed
    )
    xtr, ytr, xva, yva = _standardise(x, y.astype(np.int64), seed)
    return Setup(
        _mlp((20, 128, 128, 5)), nn.CrossEntropyLoss(), _sampler(xtr, ytr, 64), (xva, yva),
        _adamw, constant,
    )  # fmt: skip


def lstm_chars(seed: int) -> Setup:
    batch, val = _text_batches(48, 16, seed)
    return Setup(CharLSTM(), FlatCE(), batch, val, _sgd(0.9), step_lr(100, 0.5), clip=5.0)


def gru_chars(seed: int) -> Setup:
    batch, val = _text_batches(64, 16, seed)
    return Setup(CharGRU(), FlatCE(), batch, val, _adam, warmup_cosine(30), clip=1.0)


def tfm_chars(seed: int) -> Setup:
    batch, val = _text_batches(64, 16, seed)
    return Setup(TinyTransformer(), FlatCE(), batch, val, _adamw, one_cycle, bf16=True)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("mlp_digits", 0.05, 500, mlp_digits, "MLP, SGD+momentum 0.9, constant LR"),
        Task("cnn_digits", 2e-3, 450, cnn_digits, "small CNN, Adam, StepLR(150, 0.3)"),
        Task(
            "reg_diabetes",
            1e-3,
            500,
            reg_diabetes,
            "regression MLP, AdamW, warm-up 50 + cosine, user clip_grad_norm_(1.0)",
        ),
        Task(
            "gru_chars",
            2e-2,
            300,
            gru_chars,
            "char GRU LM on stdlib source, Adam, warm-up 30 + cosine, user clip_grad_norm_(1.0)",
        ),
        Task(
            "mlp_cancer", 0.5, 450, mlp_cancer, "MLP on breast cancer, plain SGD, StepLR(150, 0.5)"
        ),
        Task(
            "tfm_chars",
            3e-3,
            300,
            tfm_chars,
            "2-layer transformer LM on stdlib source, AdamW, OneCycle, bf16 autocast",
        ),
        Task("mlp_synth", 3e-3, 400, mlp_synth, "MLP on generated 5-class data, AdamW, constant"),
        Task(
            "lstm_chars",
            3.0,
            300,
            lstm_chars,
            "char LSTM LM on stdlib source, SGD+momentum 0.9, StepLR(100, 0.5), clip_grad_norm_(5)",
        ),
    )
}
