"""What the monitor measures around a step: gradient, weight and update norms, and the checks.

A logging step is a two-point quantity (cockpit's ``update_size``): :meth:`Measurer.start` takes
the weights' norms and a snapshot before the step, :meth:`Measurer.finish` the update and the
weights after it, and returns one block of values with their tags. Every other step only keeps
the tensors whose finiteness decides the non-finite flag (:meth:`Measurer.grad_checks`). It is
apart from the monitor because it is the part that costs: its few batched kernels (no
``.item()``) are what ``bench/hook_overhead.py`` measures, while the monitor is wiring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrwatch import ranks, schema, stats

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
class Pending:
    """A logging step between its pre- and post-hook; ``cost`` adds up its seconds of work."""

    params: list[Tensor]
    weights: list[Tensor]  # the parameters the step may move
    plan: Plan
    w_before: Tensor
    snapshot: list[Tensor]
    cost: float = 0.0
    g_plan: Plan | None = None
    g: Tensor | None = None  # per-tensor gradient norms
    g_total: Tensor | None = None
    grads: list[Tensor | None] | None = None  # read by start, reused by the same pre-hook
    agreed: Tensor | None = None  # sharded: rank 0's proposed cadence, after the all-reduce


class Measurer:
    """The norms of one model's parameters under one optimizer.

    Args:
        full_check: check every gradient each step rather than the small ones (``nonfinite``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        full_check: bool,
        world: int = 0,
    ) -> None:
        self.optimizer = optimizer
        self.world = world  # > 0: sharded, every rank measures and the norms are summed
        self.buffers: list[Tensor] | None = None  # a snapshot kept for the next logging step
        self._full_check = full_check
        self._names = param_names(model)
        self._plans: dict[tuple[int, ...], Plan] = {}
        self._n_params = -1
        self._sentinels: list[Tensor] = []

    def start(self, *, closure_step: bool) -> Pending:
        """Weights before the step: their norms and a snapshot (dropped or reused after).

        With a closure the gradients do not exist yet: every trainable parameter may move.
        """
        params = all_params(self.optimizer)
        grads = [p.grad for p in params]
        moving = tuple(
            i
            for i, (p, g) in enumerate(zip(params, grads, strict=True))
            if g is not None or (closure_step and p.requires_grad)
        )
        plan = self._plan(moving, params)
        weights = [stats.local(params[i]) for i in moving]  # a shard's snapshot is the shard
        with torch.no_grad():  # weights require grad: no autograd node per norm
            return Pending(
                params,
                weights,
                plan,
                stats.foreach_norms(weights, plan.groups),
                stats.snapshot(weights, self.buffers),
                grads=None if closure_step else grads,  # a closure makes the grads in step()
            )

    def grad_checks(self, pending: Pending | None) -> list[Tensor]:
        """Tensors whose finiteness is this step's flag (no sync).

        On a logging step the total gradient norm (a full check); otherwise the norms of the
        checked gradients (see ``nonfinite``).
        """
        with torch.no_grad():  # a grad of a grad (create_graph=True) would build a graph
            if pending is not None:
                return self._grad_norms(pending)
            grads = [stats.local(p.grad) for p in self._check_params() if p.grad is not None]
            return [torch.stack(torch._foreach_norm(grads))] if grads else []

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
        for the cadence (see :class:`lrwatch.cadence.Cadence`).
        """
        with torch.no_grad():  # the weights require grad: keep autograd out of every op
            u, w_after = self._after(pending)
            if self.world:
                u, w_after = self._reduce(pending, u, w_after, proposal)
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

    def _reduce(
        self, pending: Pending, u: Tensor, w_after: Tensor, proposal: int
    ) -> tuple[Tensor, Tensor]:
        """Global norms from local ones: squared, shared out, summed in ONE all-reduce.

        Every rank calls this at the same steps with vectors of the same length (the same
        parameters have gradients everywhere), so the collective always matches.
        """
        g, g_plan = pending.g, pending.g_plan
        parts = [u, pending.w_before, w_after]
        shares = [pending.plan.shares] * 3
        if g is not None and g_plan is not None:
            parts.append(g)
            shares.append(g_plan.shares)
        device = parts[0].device
        squares = [
            p.to(device).square() * s.to(device)
            for p, s in zip(parts, shares, strict=True)
            if s is not None
        ]
        slot = torch.tensor([float(proposal)], device=device)
        packed = torch.cat([*squares, slot])
        ranks.all_sum(packed)
        sizes = [p.numel() for p in parts]
        *norms, pending.agreed = torch.split(packed, [*sizes, 1])
        u, pending.w_before, w_after = (n.sqrt() for n in norms[:3])
        if g is not None and pending.g_total is not None:
            pending.g = norms[3].sqrt()
            pending.g_total.copy_(norms[3].sum().sqrt())  # the row's non-finite check reads it
        return u, w_after

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
        if pending.g_total is not None:
            tags.append(schema.GRAD_NORM)
            head.append(pending.g_total)
        if preclip is not None:
            tags.append(schema.GRAD_NORM_PRECLIP)
            head.append(preclip.detach().reshape(1).to(torch.float32))
        if weights:
            # Rows (update, weight before, weight after), each led by its total: one stack, one
            # norm, one cat and one ratio for the global and every per-tensor value at once.
            per = torch.stack([u, w_before, w_after])
            full = torch.cat([torch.linalg.vector_norm(per, dim=1, keepdim=True), per], dim=1)
            ratios = stats.ratio(full[0], full[1])
            tags += [schema.UPDATE_RATIO, schema.WEIGHT_NORM]
            head += [ratios[:1], full[2, :1]]
            tail += [ratios[1:], full[2, 1:]]
        if per_layer:
            if pending.g is not None and pending.g_plan is not None:
                tags += pending.g_plan.grad_tags
                head.append(pending.g)
            if weights:
                tags += plan.update_tags + plan.weight_tags
                head += tail
        return (tags, torch.cat(head)) if tags else None

    def _grad_norms(self, pending: Pending) -> list[Tensor]:
        """Per-tensor norms of the gradients stepped with; their total is the full check."""
        params = pending.params
        every = pending.grads if pending.grads is not None else [p.grad for p in params]
        pending.grads = None
        with_grad = tuple(i for i, g in enumerate(every) if g is not None)
        if not with_grad:
            return []
        plan = pending.g_plan = self._plan(with_grad, params)
        grads = [stats.local(g) for g in every if g is not None]
        pending.g = stats.foreach_norms(grads, plan.groups)
        if self.world:  # local norms: the total exists once finish has summed them over ranks
            pending.g_total = torch.zeros(1, device=pending.g.device)
        else:
            pending.g_total = stats.total_norm(pending.g).reshape(1)
        return [pending.g_total]

    def _check_params(self) -> list[Tensor]:
        """Parameters whose gradients are checked every step (see ``nonfinite``)."""
        n = sum(len(g["params"]) for g in self.optimizer.param_groups)
        if n != self._n_params:
            params = all_params(self.optimizer)
            small = [p for p in params if p.dim() <= 1]
            if self._full_check:
                self._sentinels = params
            else:
                self._sentinels = small or sorted(params, key=lambda p: p.numel())[:1]
            self._n_params = n
        return self._sentinels

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
