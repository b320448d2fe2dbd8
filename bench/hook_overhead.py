"""Cost of the hook per training step, against a bare step and the arithmetic floor, in one run.

Models (CPU): an MLP 784-1024-1024-10 (batch 128), a small CNN (batch 32 of 3x32x32) and a small
GPT-style transformer (4 layers, d=256, batch 2 x 64 tokens); AdamW. Cases, each on its own copy
of the model (same init) so the monitors live through the whole run, interleaved in shuffled
rounds so that a loaded machine slows every case alike:

- ``bare``: forward, backward, step, zero_grad;
- ``defaults``: ``lrwatch.watch(model, opt, logdir=..., criterion=...)`` (adaptive cadence);
- ``every_step``: lrwatch with ``log_every=1, per_layer=True`` (all per-tensor tags each step);
- ``hand``: the hand-written pattern: ``.norm().item()`` per gradient and weight plus one
  ``SummaryWriter.add_scalar`` per tag, every step;
- ``floor``: the arithmetic of ``every_step`` with no writing: foreach norms of grads and
  weights before, ``_foreach_copy_`` into preallocated buffers, step, ``_foreach_sub_``, norms
  of the difference and of the weights after, one host transfer;
- ``signals``: the arithmetic floor of what ``defaults`` records every step (loss, LR,
  non-finite flag, global grad norm): one foreach norm of the gradients and their total, kept
  on device and moved to the host 50 steps at a time, with no writing.

Time is the process's CPU time (all its threads, the writer thread included): on a machine
shared with other jobs, wall time mostly measures the others. Prints ms/step and ratios to bare
and to the floor; "hook ms" is the time around ``optimizer.step()`` beyond bare (where the cases
differ) and backward (where lrwatch takes the gradient norms, at its end), amortised over the
case's cadence, which is far less noisy than the difference of whole steps. Memory: the size of
the weight snapshot each case holds (``defaults`` keeps it between logging steps for parameters up
to 32 MB, larger ones only during a logging step), and with
``--memory`` the peak RSS of each case in a fresh process. Usage::

    PYTHONPATH=. python bench/hook_overhead.py [--quick] [--rounds N] [--steps K] [--memory]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lrwatch
from lrwatch.hook.cadence import DENSE_STEPS
from lrwatch.hook.snapshots import Snapshots

# Warm-up steps before timing: past the dense start of "auto" and past the rollback copies'
# first allocations (the first step's and two more, every 100 steps); from then on a copy reuses
# the oldest one's memory (steady state: ~2 ms a copy every 100 steps on the MLP; the three
# first copies allocate, ~10-20 ms each, once per run).
WARMUP = max(DENSE_STEPS, Snapshots().every * (Snapshots().keep + 1)) + 3

Step = Callable[[], None]


def mlp() -> tuple[nn.Module, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    return model, lambda: (torch.randn(128, 784), torch.randint(0, 10, (128,)))


def cnn() -> tuple[nn.Module, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    model = nn.Sequential(
        *block(3, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    return model, lambda: (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))


class GPT(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 256, layers: int = 4, ctx: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(
            d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        h = self.blocks(h, mask=self.mask, is_causal=True)
        return self.head(self.norm(h)).flatten(0, 1)


def gpt() -> tuple[nn.Module, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    return GPT(), lambda: (torch.randint(0, 512, (2, 64)), torch.randint(0, 512, (128,)))


MODELS = {"mlp": mlp, "cnn": cnn, "gpt": gpt}


class Case:
    """One case's model copy, its step function and what it measured."""

    def __init__(self, case: str, build: Any, logdir: Path) -> None:
        torch.manual_seed(0)
        self.model, data = build()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.crit = nn.CrossEntropyLoss()
        self.batches = [data() for _ in range(4)]
        self.n = 0
        self.before: Step = lambda: None
        self.after: Step = lambda: None
        self.close: Callable[[], None] = lambda: None
        self.mon: lrwatch.Monitor | None = None
        self.extra = 0  # bytes held for the weight snapshot
        self.region: dict[bool, list[float]] = {False: [], True: []}  # by "was a logging step"
        param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if case in ("defaults", "every_step"):
            kw: dict[str, Any] = {"log_every": 1} if case == "every_step" else {}
            self.mon = lrwatch.watch(
                self.model, self.opt, logdir=logdir / case, criterion=self.crit, **kw
            )
            self.close, self.extra = self.mon.close, param_bytes
        elif case == "hand":
            self.before, self.after, self.close = hand_written(self.model, logdir / case)
        elif case == "floor":
            self.before, self.after = floor(self.model)
            self.extra = param_bytes
        elif case == "signals":
            self.before = signals_floor(self.model)

    def step(self) -> None:
        x, y = self.batches[self.n % len(self.batches)]
        self.n += 1
        loss = self.crit(self.model(x), y)
        t0 = time.process_time()  # the region where the cases differ: backward and step
        loss.backward()
        self.before()
        self.opt.step()
        self.after()
        dt = time.process_time() - t0
        self.region[self.mon is not None and self.mon._cadence.logged_last].append(dt)
        self.opt.zero_grad()

    def hook_time(self, bare_region: float) -> float:
        """Seconds per step around optimizer.step() beyond bare, amortised over the cadence."""
        plain = statistics.fmean(self.region[False]) if self.region[False] else 0.0
        if not self.region[True]:
            return plain - bare_region
        logged = statistics.fmean(self.region[True])
        if not self.region[False]:
            return logged - bare_region
        every = self.mon.log_every if self.mon is not None else 1
        return plain - bare_region + (logged - plain) / every


def hand_written(model: nn.Module, logdir: Path) -> tuple[Step, Step, Callable[[], None]]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    step = [0]

    def before() -> None:
        step[0] += 1
        for name, p in model.named_parameters():
            if p.grad is not None:
                writer.add_scalar(f"grad_norm/{name}", p.grad.norm().item(), step[0])

    def after() -> None:
        for name, p in model.named_parameters():
            writer.add_scalar(f"weight_norm/{name}", p.detach().norm().item(), step[0])

    return before, after, writer.close


def floor(model: nn.Module) -> tuple[Step, Step]:
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [torch.empty_like(p) for p in params]
    held: list[torch.Tensor] = []

    def before() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        held[:] = [
            torch.stack(torch._foreach_norm(grads)),
            torch.stack(torch._foreach_norm(params)),
        ]
        torch._foreach_copy_(buffers, [p.detach() for p in params])

    def after() -> None:
        torch._foreach_sub_(buffers, [p.detach() for p in params])
        upd = torch.stack(torch._foreach_norm(buffers))
        w = torch.stack(torch._foreach_norm(params))
        torch.cat([*held, upd / held[1], w]).tolist()

    return before, after


def signals_floor(model: nn.Module) -> Step:
    """Per step: the global grad norm on device; every 50 steps, one host transfer."""
    params = [p for p in model.parameters() if p.requires_grad]
    held: list[torch.Tensor] = []

    def before() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        held.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        if len(held) == 50:
            torch.stack(held).tolist()
            held.clear()

    return before


def run(model_name: str, cases: list[str], rounds: int, steps: int, logdir: Path) -> None:
    built = {c: Case(c, MODELS[model_name], logdir / model_name) for c in cases}
    for case in built.values():  # warm up: allocator, dense start of "auto", first copies
        for _ in range(WARMUP):
            case.step()
        case.region = {False: [], True: []}
    times: dict[str, list[float]] = {c: [] for c in cases}
    order = list(cases)
    for _ in range(rounds):
        random.shuffle(order)
        for c in order:
            t0 = time.process_time()
            for _ in range(steps):
                built[c].step()
            times[c].append((time.process_time() - t0) / steps)
    for case in built.values():
        case.close()
    mean = {c: statistics.fmean(v) for c, v in times.items()}
    bare_region = statistics.fmean(built["bare"].region[False])
    hook = {c: built[c].hook_time(bare_region) for c in cases}
    n = sum(p.numel() for p in built["bare"].model.parameters())
    print(f"\n{model_name}: {n / 1e6:.2f}M params, {rounds} rounds x {steps} steps")
    print(
        f"{'case':<11} {'ms/step':>8} {'vs bare':>8} | {'hook ms':>8} {'vs bare':>8} "
        f"{'vs floor':>9} | {'extra MB':>8}  cadence"
    )
    for c in cases:
        mon = built[c].mon
        cadence = mon.log_every if mon is not None else "every step" if c != "bare" else "-"
        print(
            f"{c:<11} {mean[c] * 1e3:8.2f} {mean[c] / mean['bare'] - 1:+8.1%} | "
            f"{hook[c] * 1e3:8.3f} {hook[c] / mean['bare']:+8.2%} "
            f"{hook[c] / max(hook['floor'], 1e-9):8.2f}x | {built[c].extra / 2**20:8.2f}  {cadence}"
        )
    floor_pct = hook["signals"] / mean["bare"]
    if hook["defaults"] <= 0.01 * mean["bare"]:
        verdict = "<= 1%"
    elif hook["signals"] <= 0:  # the floor measured at or below the bare step: noise
        verdict = "the floor is within this run's noise: no ratio"
    else:
        verdict = f"{hook['defaults'] / hook['signals']:.2f}x the per-step signals' floor"
    print(
        f"defaults: {hook['defaults'] / mean['bare']:+.2%} of a step ({verdict}); "
        f"per-step signals' floor {floor_pct:+.2%}"
    )
    for c in ("defaults", "every_step"):
        print(
            f"{c}: lrwatch's own measurement (perf_counter inside its hooks): {self_cost(built[c])}"
        )


def self_cost(case: Case) -> str:
    """The hooks' cost as lrwatch's adaptive cadence sees it: free of the subtraction noise."""
    mon = case.mon
    assert mon is not None
    per_step = statistics.median(mon._cadence.overheads) if mon._cadence.overheads else 0.0
    logging_step = statistics.median(mon._cadence.costs)
    period = statistics.median(mon._cadence.intervals) if mon._cadence.intervals else float("nan")
    total = per_step + logging_step / mon.log_every
    return (
        f"{per_step * 1e6:.0f} us every step + {logging_step * 1e3:.2f} ms per logging step "
        f"/ {mon.log_every} = {total / period:.2%} of a {period * 1e3:.1f} ms step (wall)"
    )


def peak_rss_child(model_name: str, case: str, steps: int) -> None:
    """In a fresh process: train ``steps`` steps of ``case`` and print the peak RSS in bytes."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        c = Case(case, MODELS[model_name], Path(tmp))
        for _ in range(steps):
            c.step()
        c.close()
    status = Path("/proc/self/status").read_text()
    (line,) = [x for x in status.splitlines() if x.startswith("VmHWM:")]
    print(int(line.split()[1]) * 1024)


def measure_memory(models: list[str], steps: int) -> None:
    """Peak RSS of each case in its own process, minus the bare case's (a real measurement)."""
    import subprocess
    import sys

    print("\nextra peak memory (peak RSS of a fresh process minus bare's, MB)")
    for name in models:
        peaks = {}
        for case in ("bare", "defaults", "every_step", "hand", "floor"):
            cmd = [sys.executable, __file__, "--peak-rss-child", name, case, str(steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            peaks[case] = int(out.stdout.split()[-1])
        row = "  ".join(f"{c} {(v - peaks['bare']) / 2**20:+6.1f}" for c, v in peaks.items())
        print(f"{name:<4} {row}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: under a minute")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--models", default="mlp,cnn,gpt")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS per case")
    parser.add_argument("--peak-rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss_child:
        name, case, steps_ = args.peak_rss_child
        peak_rss_child(name, case, int(steps_))
        return
    rounds = args.rounds or (2 if args.quick else 12)
    steps = args.steps or (3 if args.quick else 20)
    torch.set_num_threads(1)
    random.seed(0)
    cases = ["bare", "defaults", "every_step", "hand", "floor", "signals"]
    print(
        "ms/step: whole step, CPU time; hook ms: time around optimizer.step() beyond bare,\n"
        "amortised over the case's cadence; its vs bare is against the whole bare step."
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            run(name, cases, rounds, steps, Path(tmp))
    if args.memory:
        measure_memory(args.models.split(","), 12)


if __name__ == "__main__":
    main()
