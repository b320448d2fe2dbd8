"""Device-side statistics of parameters and gradients, batched and free of host syncs.

Everything here is plain torch on the tensors' own device. Norms are computed with one
``torch._foreach_norm`` per (device, dtype) group, the way ``torch.nn.utils.clip_grad_norm_``
does it, and results stay tensors: no ``.item()``, no ``if`` on a tensor's value, so a CUDA
stream is never drained. The caller decides when (and on which thread) values reach the host.

The dominant cost is memory traffic, one pass per quantity over every element (see
``bench/hook_overhead.py``); Python overhead is one call per group, not per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def group_by_device_dtype(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in first-seen order.

    A foreach kernel needs one device and one dtype; mixed models (CPU offload, bf16 with fp32
    norms) are split here once rather than per call.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def foreach_norms(tensors: Sequence[Tensor], groups: list[list[int]] | None = None) -> Tensor:
    """The L2 norm of each tensor as one float32 vector, in the order of ``tensors``.

    The vector lives on the first tensor's device. ``groups`` (from
    :func:`group_by_device_dtype`) may be passed to skip the grouping on hot paths.
    """
    if not tensors:
        return torch.zeros(0)
    if groups is None:
        groups = group_by_device_dtype(tensors)
    device = tensors[0].device
    if len(groups) == 1:  # the common case: no regrouping, one kernel and one stack
        norms = torch.stack(torch._foreach_norm(list(tensors)))
        return norms if norms.dtype == torch.float32 else norms.to(torch.float32)
    parts = [
        torch.stack(torch._foreach_norm([tensors[i] for i in idx])).to(device, torch.float32)
        for idx in groups
    ]
    order = torch.tensor([i for idx in groups for i in idx], device=device)
    return torch.empty(len(tensors), device=device).index_copy_(0, order, torch.cat(parts))


def local(t: Tensor) -> Tensor:
    """A DTensor's own shard (``to_local()``, no collective); any other tensor as it is.

    The norm of a sharded tensor taken whole is an all-reduce that only the ranks measuring it
    would join: norms are taken on local shards and reduced together (:func:`copies`).
    """
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


def copies(t: Tensor, world: int) -> float:
    """How many of ``world`` ranks hold the same local values of ``t``.

    A squared sum divided by this and summed over every rank counts each element once: a plain
    tensor is replicated on every rank; a DTensor is split over its ``Shard`` mesh dimensions
    and replicated over the others (HSDP's replicate dimension, ranks outside a TP mesh).
    """
    mesh = getattr(t, "device_mesh", None)
    if mesh is None:
        return float(world)
    split = 1
    for dim, placement in enumerate(t.placements):  # type: ignore[attr-defined]
        if placement.is_shard():
            split *= mesh.size(dim)
    return world / split


def total_norm(norms: Tensor) -> Tensor:
    """Global L2 norm from per-tensor norms: the number ``clip_grad_norm_`` returns."""
    norm: Tensor = torch.linalg.vector_norm(norms)
    return norm


def snapshot(tensors: Sequence[Tensor], buffers: list[Tensor] | None = None) -> list[Tensor]:
    """Copies of ``tensors`` (the weights before a step), reusing ``buffers`` when they fit.

    Reused buffers avoid allocating (and, on CPU, page-faulting) a model-sized block at every
    logging step; the caller keeps them between logging steps where it can spare the memory
    (:data:`lrwatch.hook.steps.KEEP_BUFFERS_BYTES`), and fresh copies hold nothing in between.
    """
    src = _detached(tensors)
    if not src:  # a step with no gradient at all (the one reading a rollback): nothing moves
        return []
    fits = buffers is not None and len(buffers) == len(src)
    if fits and buffers is not None:
        fits = all(
            b.shape == s.shape and b.dtype == s.dtype and b.device == s.device
            for b, s in zip(buffers, src, strict=True)
        )
    if fits and buffers is not None:
        torch._foreach_copy_(buffers, src)
        return buffers
    return [s.clone() for s in src]


def update_norms(
    before: list[Tensor], after: Sequence[Tensor], groups: list[list[int]] | None = None
) -> Tensor:
    """Per-tensor ``||after - before||``, overwriting ``before`` with the difference.

    In place so that the update costs no second model-sized block.
    """
    if not before:  # foreach ops refuse empty lists
        return torch.zeros(0)
    torch._foreach_sub_(before, _detached(after))
    return foreach_norms(before, groups)


def _detached(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``tensors`` cut from autograd; under ``no_grad`` (the monitor's case) as they are."""
    if torch.is_grad_enabled():
        return [t.detach() for t in tensors]
    return list(tensors)


def ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` elementwise, with 0/0 (a zero tensor that did not move) defined as 0.

    A tensor that was exactly zero and moved (a zero-initialised bias at its first step) gives
    inf; a NaN numerator stays NaN, so a diverged weight is still visible.
    """
    return torch.where(num == 0, num, num / den)
