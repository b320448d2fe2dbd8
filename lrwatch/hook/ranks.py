"""Which rank this process is, and rank 0's view handed to every rank.

Under DDP only rank 0 writes event files and reads the control file; the other ranks receive
what rank 0 read, so every rank applies the same action at the same step.

Why the exit guard: a gloo (or NCCL) worker thread releases the tensors of a finished
collective on its own thread, and releasing a tensor that Python has seen needs the GIL. If the
interpreter starts finalising before that thread got the GIL, libtorch aborts the process
("terminate called without an active exception", SIGABRT in ``ProcessGroupGloo::runLoop``).
A script whose last control-file check falls within a few milliseconds of its exit hit this in
about one run in eight here. Sleeping briefly in an ``atexit`` handler, which runs while the
interpreter is still whole, lets the worker thread finish; it is registered only by processes
that ran such a broadcast.
"""

from __future__ import annotations

import atexit
import functools
import time
from typing import Any

EXIT_GRACE_S = 0.05


def rank() -> int:
    """This process's rank in the default process group; 0 when not distributed."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def from_rank0(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank (a collective: every rank must call it)."""
    import torch.distributed as dist

    payload = [value if dist.get_rank() == 0 else None]
    _guard_exit()
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def gathered(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (a collective: every rank must call
    it)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    _guard_exit()
    dist.all_gather_object(out, value)
    return out


@functools.cache
def _guard_exit() -> None:
    """Register the exit grace once per process (cached: later calls do nothing)."""
    atexit.register(time.sleep, EXIT_GRACE_S)


def world() -> int:
    """Number of ranks in the default process group; 1 when not distributed."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sharded(params: list[Any]) -> bool:
    """True when some parameter is a DTensor in a distributed run (FSDP2, HSDP, tensor parallel).

    Then every rank must measure: a sharded norm is a sum over ranks.
    """
    return distributed() and any(hasattr(p, "device_mesh") for p in params)


def flat_sharded(params: list[Any]) -> bool:
    """True for FSDP1's flat parameters in a process group (``FullyShardedDataParallel``).

    There each rank holds a slice of many parameters flattened into one, as a plain tensor:
    nothing says which values a slice holds or which ranks hold the same ones, so lrwatch
    would measure rank 0's slice as if it were the whole model. FSDP1 marks what it
    flattened (the flat parameters, and the original ones with ``use_orig_params``).
    """
    import torch.distributed as dist

    return (
        dist.is_available()
        and dist.is_initialized()
        and any(getattr(p, "_fsdp_flattened", False) for p in params)
    )


def all_sum(packed: Any) -> None:
    """Sum ``packed`` over every rank, in place: the one collective of a sharded logging step."""
    import torch.distributed as dist

    _guard_exit()
    dist.all_reduce(packed)


class LateRead:
    """One small reduced tensor, read on the host a step after its collective was issued.

    Reading it at once (``.item()``) would make the host wait for the device to finish the
    step; a step later the copy started here is long done, so :meth:`value` waits for that
    copy alone (a device event), not for the work queued since. On CPU it is the tensor.
    """

    def __init__(self, tensor: Any) -> None:
        import torch

        self._event: Any = None
        if tensor.device.type == "cpu":
            self._host = tensor
        else:  # untested here (CPU-only CI): the device-generic event API of torch >= 2.4
            self._host = tensor.to("cpu", non_blocking=True)
            self._event = torch.Event(device=tensor.device)
            self._event.record()

    def value(self) -> float:
        if self._event is not None:
            self._event.synchronize()
        return float(self._host.item())
