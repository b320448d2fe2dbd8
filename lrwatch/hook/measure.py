"""What the monitor measures around a step: gradient, weight and update norms, and the checks.

A logging step is a two-point quantity (cockpit's ``update_size``): :meth:`Measurer.start` takes
the weights' norms and a snapshot before the step, :meth:`Measurer.finish` the update and the
weights after it, and returns one block of values with their tags. Every step has its gradient
norms, taken where backward ended (:meth:`Measurer.on_backward`), so they are the norms before
any clipping; their total is also the step's non-finite check of every gradient. It is apart
from the monitor because it is the part that costs: its few batched kernels (no ``.item()``)
are what ``bench/hook_overhead.py`` measures, while the monitor is wiring.

Sharded parameters (DTensors: FSDP2, HSDP, tensor parallel) are measured on their local shards;
:meth:`Measurer.reduce` sums the squares over the ranks in one all-reduce a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lrwatch import schema
from lrwatch.hook import ranks, stats

Tensor = torch.Tensor


class Plan:
    """How to reduce one set of parameters: foreach groups and the tags of its values."""

    def __init__(
        self, groups: list[list[int]], names: list[str], shares: Tensor | None = None
    ) -> None:
        self.groups = groups
        self.shares = shares  # sharded: 1 / copies of each tensor's local values
        self.grad_tags = [schema.per_tensor_tag("grad_norm", n) for n in names]
        self.update_tags = [schema.per_tensor_tag("update_ratio", n) for n in names]
        self.weight_tags = [schema.per_tensor_tag("weight_norm", n) for n in names]


@dataclass(slots=True)
class StepGrads:
    """A step's gradient norms, taken where backward ended (before anyone clipped).

    ``norms`` are per tensor; sharded, they are local until :meth:`Measurer.reduce` sums them,
    and ``total`` (which the row already holds) is filled in place then.
    """

    plan: Plan
    norms: Tensor
    total: Tensor


@dataclass(slots=True)
class Pending:
    """A logging step between its pre- and post-hook; ``cost`` adds up its seconds of work."""

    weights: list[Tensor]  # the parameters the step may move (local shards)
    plan: Plan
    w_before: Tensor
    snapshot: list[Tensor]
    cost: float = 0.0
    grads: StepGrads | None = None
    agreed: Tensor | None = None  # sharded: rank 0's proposed cadence, after the all-reduce


class Measurer:
    """The norms of one model's parameters under one optimizer.

    Args:
        world: ranks of a sharded run (every rank measures its shards; one all-reduce a step),
            0 otherwise.
        scaler: the run's GradScaler, or None: backward leaves gradients multiplied by its
            scale, which the norms taken there are divided by.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        world: int = 0,
        scaler: Any = None,
    ) -> None:
        self.optimizer = optimizer
        self.world = world
        self.buffers: list[Tensor] | None = None  # a snapshot kept for the next logging step
        self.backward: StepGrads | None = None  # norms at the end of the latest backward
        self._scaler = scaler
        self._names = param_names(model)
        self._plans: dict[tuple[int, ...], Plan] = {}

    def on_backward(self) -> None:
        """At the end of a backward pass: the norms of the gradients it left (on device).

        With gradient accumulation the last backward before the step wins: the gradients
        accumulate, so its norms are those of the gradients the step will use.
        """
        with torch.no_grad():
            self.backward = self._grads_now(scaled=True)

    def step_grads(self) -> StepGrads | None:
        """The step's gradient norms: from the end of backward, else measured now.

        Measured now (a backward lrwatch did not see) the gradients may already be unscaled
        by the user's ``scaler.unscale_()``, so they are taken as they are.
        """
        sg, self.backward = self.backward, None
        if sg is None:
            with torch.no_grad():  # a grad of a grad (create_graph=True) would build a graph
                sg = self._grads_now(scaled=False)
        return sg

    def start(self, grads: StepGrads | None, *, closure_step: bool) -> Pending:
        """Weights before the step: their norms and a snapshot (dropped or reused after).

        With a closure the gradients do not exist yet: every trainable parameter may move.
        """
        params = all_params(self.optimizer)
        moving = tuple(
            i
            for i, p in enumerate(params)
            if p.grad is not None or (closure_step and p.requires_grad)
        )
        plan = self._plan(moving, params)
        weights = [stats.local(params[i]) for i in moving]  # a shard's snapshot is the shard
        with torch.no_grad():  # weights require grad: no autograd node per norm
            w_before = stats.foreach_norms(weights, plan.groups)
            snapshot = stats.snapshot(weights, self.buffers)
            return Pending(weights, plan, w_before, snapshot, grads=grads)

    def _grads_now(self, *, scaled: bool) -> StepGrads | None:
        """Per-tensor norms of the gradients there now, and their total (sharded: to come)."""
        params = all_params(self.optimizer)
        with_grad = tuple(i for i, p in enumerate(params) if p.grad is not None)
        if not with_grad:
            return None
        plan = self._plan(with_grad, params)
        grads = [stats.local(params[i].grad) for i in with_grad]  # type: ignore[arg-type]
        norms = stats.foreach_norms(grads, plan.groups)
        scale = getattr(self._scaler, "_scale", None) if scaled else None
        if isinstance(scale, Tensor):
            norms = norms / scale.to(norms.device)  # a device tensor: no sync
        if self.world:  # local norms: the total exists once reduce has summed them
            return StepGrads(plan, norms, torch.zeros(1, device=norms.device))
        return StepGrads(plan, norms, stats.total_norm(norms).reshape(1))

    def finish(
        self,
        pending: Pending,
        *,
        preclip: Tensor | None,
        per_layer: bool,
        keep_buffers: bool,
        proposal: int = 0,
    ) -> tuple[list[str], Tensor] | None:
        """After the step: update and weight norms, then one block with every value.

        Few kernels on purpose: on a model of many small tensors the per-op overhead, not the
        arithmetic, is what a logging step costs beyond the floor. Sharded, the local norms
        are summed over the ranks in one all-reduce, which also carries rank 0's ``proposal``
        for the cadence (see :class:`lrwatch.hook.cadence.Cadence`).
        """
        with torch.no_grad():  # the weights require grad: keep autograd out of every op
            u, w_after = self._after(pending)
            if self.world:
                norms = [u, pending.w_before, w_after]
                reduced = self.reduce(pending.grads, norms, pending.plan.shares, proposal)
                u, pending.w_before, w_after = reduced[:3]
                pending.agreed = reduced[3]
            block = self._block(pending, u, w_after, preclip=preclip, per_layer=per_layer)
        self.buffers = pending.snapshot if keep_buffers else None
        return block

    def _after(self, pending: Pending) -> tuple[Tensor, Tensor]:
        """Per-tensor update norms and weight norms after the step (local shards if sharded)."""
        if not pending.weights:
            return torch.zeros(0), torch.zeros(0)
        groups = pending.plan.groups
        u = stats.update_norms(pending.snapshot, pending.weights, groups)
        return u, stats.foreach_norms(pending.weights, groups)

    def reduce(
        self,
        grads: StepGrads | None,
        norms: list[Tensor],
        shares: Tensor | None = None,
        proposal: int = 0,
    ) -> list[Tensor]:
        """Global norms from local ones: squared, shared out, summed in ONE all-reduce.

        ``grads`` are reduced in place; ``norms`` (update, weights before and after, on a
        logging step) come back global, followed by the reduced ``proposal`` (rank 0's cadence).
        Every rank calls this at the same steps with vectors of the same length (the same
        parameters have gradients everywhere), so the collective always matches.
        """
        parts, each = list(norms), [shares] * len(norms)  # ``shares``: see stats.copies
        if grads is not None:
            parts.append(grads.norms)
            each.append(grads.plan.shares)
        device = parts[0].device if parts else torch.device("cpu")
        squares = [
            p.to(device).square() * s.to(device)
            for p, s in zip(parts, each, strict=True)
            if s is not None
        ]
        packed = torch.cat([*squares, torch.tensor([float(proposal)], device=device)])
        ranks.all_sum(packed)
        *summed, agreed = torch.split(packed, [*(p.numel() for p in parts), 1])
        if grads is not None:
            g2 = summed.pop()
            grads.norms = g2.sqrt()
            grads.total.copy_(g2.sum().sqrt().reshape(1))  # the row holds this very tensor
        return [*(x.sqrt() for x in summed), agreed]

    def _block(
        self,
        pending: Pending,
        u: Tensor,
        w_after: Tensor,
        *,
        preclip: Tensor | None,
        per_layer: bool,
    ) -> tuple[list[str], Tensor] | None:
        """The values of :meth:`finish`, in one ``cat`` at the end."""
        weights, plan, w_before = pending.weights, pending.plan, pending.w_before
        tags: list[str] = []
        head: list[Tensor] = []
        tail: list[Tensor] = []
        if preclip is not None:
            tags.append(schema.GRAD_NORM_PRECLIP)
            head.append(preclip.detach().reshape(1).to(torch.float32))
        if weights:
            # Rows (update, weight before, weight after), each led by its total: one stack, one
            # norm, one cat and one ratio for the global and every per-tensor value at once.
            per = torch.stack([u, w_before, w_after])
            full = torch.cat([torch.linalg.vector_norm(per, dim=1, keepdim=True), per], dim=1)
            ratios = stats.ratio(full[0], full[1])
            tags += [schema.UPDATE_RATIO, schema.UPDATE_RATIO_LOG10, schema.WEIGHT_NORM]
            head += [ratios[:1], ratios[:1].log10(), full[2, :1]]
            tail += [ratios[1:], full[2, 1:]]
        if per_layer:
            if pending.grads is not None:
                tags += pending.grads.plan.grad_tags
                head.append(pending.grads.norms)
            if weights:
                tags += plan.update_tags + plan.weight_tags
                head += tail
        return (tags, torch.cat(head)) if tags else None

    def _plan(self, key: tuple[int, ...], params: list[Tensor]) -> Plan:
        """Foreach groups and tag names for a set of parameters (cached: it rarely changes)."""
        plan = self._plans.get(key)
        if plan is None:
            tensors = [params[i] for i in key]
            names = [self._names.get(id(p)) or fallback_name(self.optimizer, p) for p in tensors]
            local = [stats.local(t) for t in tensors]
            shares = None
            if self.world:
                shares = torch.tensor([1.0 / stats.copies(t, self.world) for t in tensors])
                shares = shares.to(local[0].device) if local else shares
            plan = self._plans[key] = Plan(stats.group_by_device_dtype(local), names, shares)
        return plan


def all_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def fallback_name(optimizer: torch.optim.Optimizer, param: Tensor) -> str:
    """Name of a parameter the model does not own: its place in the optimizer."""
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if p is param:
                return f"group{gi}.param{pi}"
    return "unknown"


def param_names(model: torch.nn.Module) -> dict[int, str]:
    """Parameter names without the wrappers' prefixes (DDP ``module.``, compile ``_orig_mod.``)."""
    inner = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module) and isinstance(
        inner, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel
    ):
        inner = inner.module
    inner = getattr(inner, "_orig_mod", inner)
    return {id(p): name for name, p in inner.named_parameters()}
