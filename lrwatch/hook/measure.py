"""What the monitor measures around a step: gradient, weight and update norms, and the checks.

A logging step is a two-point quantity (cockpit's ``update_size``): :meth:`Measurer.start` takes
the weights' norms and a snapshot before the step, :meth:`Measurer.finish` the update and the
weights after it, and returns one block of values with their tags. Every step has its gradient
norms, taken where backward ended (:meth:`Measurer.on_backward`), so they are the norms before
any clipping; their total is also the step's non-finite check of every gradient. It is apart
from the monitor because it is the part that costs: its few batched kernels (no ``.item()``)
are what ``bench/hook_overhead.py`` measures, while the monitor is wiring.

Sharded parameters (DTensors: FSDP2, HSDP, tensor parallel) are measured on their local shards;
:meth:`Measurer.pack` and :meth:`Measurer.unpack` are the two sides of the one all-reduce a step
that sums their squares over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lrwatch import schema
from lrwatch.hook import stats

Tensor = torch.Tensor
# A sharded step's all-reduce: runs a packing function (given rank 0's cadence proposal), or
# packs this rank's failure if it raises or is None, then sums the packed vector over the ranks.
Exchange = Callable[[Callable[[int], Tensor] | None], Tensor]


class Plan:
    """How to reduce one set of parameters: foreach groups and the tags of its values."""

    def __init__(
        self,
        groups: list[list[int]],
        names: list[str],
        shares: Tensor | None = None,
        nbytes: int = 0,
    ) -> None:
        self.groups = groups
        self.nbytes = nbytes  # of the (local) tensors: what a snapshot of them holds
        self.dtensor = False  # some tensor is a DTensor, measured on its local shard
        self.shares = shares  # sharded: 1 / copies of each tensor's local values
        self.grad_tags = [schema.per_tensor_tag("grad_norm", n) for n in names]
        self.update_tags = [schema.per_tensor_tag("update_ratio", n) for n in names]
        self.weight_tags = [schema.per_tensor_tag("weight_norm", n) for n in names]


@dataclass(slots=True)
class StepGrads:
    """A step's gradient norms, taken where backward ended (before anyone clipped).

    ``norms`` are per tensor; sharded, they are local until the step's all-reduce sums them,
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
        # Every step, in backward: each gradient is read once, and local shards are asked
        # for only when some parameter is a DTensor.
        found = [p.grad for p in params]
        with_grad = tuple(i for i, g in enumerate(found) if g is not None)
        if not with_grad:
            return None
        plan = self._plan(with_grad, params)
        grads = [g for g in found if g is not None]
        if plan.dtensor:
            grads = [stats.local(g) for g in grads]
        norms = stats.foreach_norms(grads, plan.groups)
        scale = getattr(self._scaler, "_scale", None) if scaled else None
        if isinstance(scale, Tensor):
            norms = norms / scale.to(norms.device)  # a device tensor: no sync
        if self.world:  # local norms: the total exists once the all-reduce has summed them
            return StepGrads(plan, norms, torch.zeros(1, device=norms.device))
        return StepGrads(plan, norms, stats.total_norm(norms).reshape(1))

    def finish(
        self,
        pending: Pending,
        *,
        preclip: Tensor | None,
        per_layer: bool,
        keep_buffers: bool,
        exchange: Exchange | None = None,
    ) -> tuple[list[str], Tensor] | None:
        """After the step: update and weight norms, then one block with every value.

        Few kernels on purpose: on a model of many small tensors the per-op overhead, not the
        arithmetic, is what a logging step costs beyond the floor. Sharded, the local norms
        are summed over the ranks by ``exchange`` (the step's one all-reduce, see
        :meth:`lrwatch.hook.steps.StepMeasure._exchanger`).
        """
        with torch.no_grad():  # the weights require grad: keep autograd out of every op
            if exchange is None:
                u, w_after = self._after(pending)
            else:
                u, w_after = self._after_sharded(pending, exchange)
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

    def _after_sharded(self, pending: Pending, exchange: Exchange) -> tuple[Tensor, Tensor]:
        """:meth:`_after` on local shards, made global by the step's all-reduce."""
        local: list[Tensor] = []

        def build(proposal: int) -> Tensor:
            u, w_after = self._after(pending)
            local[:] = [u, pending.w_before, w_after]
            return self.pack(pending.grads, local, pending.plan.shares, proposal)

        packed = exchange(build)
        u, pending.w_before, w_after = self.unpack(packed, pending.grads, local)
        pending.agreed = packed[-2:-1]
        return u, w_after

    def pack(
        self,
        grads: StepGrads | None,
        norms: list[Tensor],
        shares: Tensor | None = None,
        proposal: int = 0,
    ) -> Tensor:
        """This rank's part of the step's all-reduce: squared norms shared out, then two slots.

        Layout: the squares of ``norms`` (update, weights before and after, on a logging step)
        and of the gradient norms, each divided by the ranks holding the same values
        (``shares``, see :func:`lrwatch.hook.stats.copies`); then rank 0's cadence
        ``proposal``; then the count of ranks whose measuring failed (0 here, see
        :meth:`failed_packet`). Every rank packs at the same steps a vector of the same length
        (the same parameters have gradients everywhere), so the collective always matches.
        """
        parts, each = list(norms), [shares] * len(norms)
        if grads is not None:
            parts.append(grads.norms)
            each.append(grads.plan.shares)
        device = parts[0].device if parts else torch.device("cpu")
        squares = [
            p.to(device).square() * s.to(device)
            for p, s in zip(parts, each, strict=True)
            if s is not None
        ]
        return torch.cat(
            [*squares, torch.tensor([float(proposal), 0.0], device=device, dtype=torch.float32)]
        )

    def unpack(self, packed: Tensor, grads: StepGrads | None, norms: list[Tensor]) -> list[Tensor]:
        """Global norms from the reduced ``packed``; ``grads`` are filled in place.

        ``norms``: the local ones :meth:`pack` took, for their lengths.
        """
        sizes = [t.numel() for t in norms]
        if grads is not None:
            sizes.append(grads.norms.numel())
        *summed, _tail = torch.split(packed, [*sizes, 2])
        if grads is not None:
            g2 = summed.pop()
            grads.norms = g2.sqrt()
            grads.total.copy_(g2.sum().sqrt().reshape(1))  # the row holds this very tensor
        return [x.sqrt() for x in summed]

    def count_grads(self) -> int:
        """How many of the optimizer's parameters have a gradient now."""
        return sum(p.grad is not None for p in all_params(self.optimizer))

    def failed_packet(
        self, *, logging: bool, closure: bool, n_grads: int | None = None
    ) -> Tensor | None:
        """What a rank whose measuring failed contributes: zeros, and 1 in the failure slot.

        Its length is the one :meth:`pack` gives on the other ranks, counted from the
        parameters alone (which have gradients, which may move), so the collective matches
        without any of the work that failed. ``n_grads``: the gradients the step's norms were
        taken of, when that was before now (a rollback drops them in between). None where the
        healthy ranks issue no all-reduce either (no gradients and not a logging step).
        """
        params = all_params(self.optimizer)
        n_grads = self.count_grads() if n_grads is None else n_grads
        moving = sum(p.grad is not None or (closure and p.requires_grad) for p in params)
        if not logging and not n_grads:
            return None
        n = n_grads + (3 * moving if logging else 0)
        device = next((stats.local(p).device for p in params), torch.device("cpu"))
        packed = torch.zeros(n + 2, device=device, dtype=torch.float32)
        packed[-1] = 1.0
        return packed

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
            nbytes = sum(t.numel() * t.element_size() for t in local)
            groups = stats.group_by_device_dtype(local)
            plan = self._plans[key] = Plan(groups, names, shares, nbytes)
            plan.dtensor = any(t is not s for t, s in zip(tensors, local, strict=True))
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
