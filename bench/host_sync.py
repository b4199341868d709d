"""Finding the places where a training step would wait for the GPU.

A CUDA kernel launch returns at once; reading a result on the host (`.item()`, `bool()`,
`.cpu()`, a data-dependent shape such as `x[mask]` or `nonzero`) makes the CPU wait until
the GPU has caught up, and the next launches queue behind that wait. One such read per
step costs little; fourteen (what the step had before) leave the GPU idle between them.

`torch.cuda.set_sync_debug_mode("error")` finds them on a GPU. `no_host_reads()` finds
the same calls on the CPU, where they cost nothing and so go unnoticed: it raises on
every operation that would read device memory on the host or whose output shape depends
on tensor values.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor

# Conversions to Python values and copies to the host.
_HOST_READS = {
    Tensor.item, Tensor.tolist, Tensor.numpy, Tensor.cpu,
    Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__, Tensor.__complex__,
}
# Outputs whose size depends on the values (the host must learn it before allocating).
_DATA_DEPENDENT = {
    torch.nonzero, Tensor.nonzero, torch.masked_select, Tensor.masked_select,
    torch.unique, Tensor.unique, torch.unique_consecutive, torch.argwhere,
    # bincount sizes its output from max(input) on CUDA even when minlength is given
    torch.bincount, Tensor.bincount,
}
_REPEATS = {torch.repeat_interleave, Tensor.repeat_interleave}  # a host read when repeats is a tensor


class HostSyncError(RuntimeError):
    """A step read a tensor on the host (on a GPU, a synchronisation)."""


def _is_host_copy(func, args, kwargs) -> bool:
    """`.to("cpu")` of a tensor that is not on the CPU (on the CPU, `.cpu()` is flagged
    instead: written on purpose, it is a copy to the host on a GPU)."""
    if func is not Tensor.to or not isinstance(args[0], Tensor) or args[0].device.type == "cpu":
        return False
    targets = [*args[1:2], kwargs.get("device")]
    return any(str(t) == "cpu" or (isinstance(t, torch.device) and t.type == "cpu") for t in targets if t is not None)


def _tensor_repeats(func, args, kwargs) -> bool:
    if func not in _REPEATS:
        return False
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    return repeats is None or isinstance(repeats, Tensor)


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, Tensor) and p.dtype == torch.bool for p in parts)


class _NoHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func in _HOST_READS
            or func in _DATA_DEPENDENT
            or _is_host_copy(func, args, kwargs)
            or _tensor_repeats(func, args, kwargs)
            or (func in (Tensor.__getitem__, Tensor.__setitem__) and _bool_index(args))
        ):
            name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
            where = "".join(traceback.format_stack(limit=6)[:-1])
            raise HostSyncError(f"{name} reads a tensor on the host (a GPU sync) inside a sync-free region:\n{where}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads():
    """Raise HostSyncError on any host read or data-dependent shape in the block."""
    with _NoHostReads():
        yield


@contextlib.contextmanager
def cuda_sync_errors(device: torch.device):
    """On a CUDA device, make any synchronisation in the block an error."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
