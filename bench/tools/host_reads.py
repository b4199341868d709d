"""Finding the places where a training step would wait for the GPU.

A CUDA kernel launch returns at once; reading a result on the host (`.item()`, `bool()`,
`.cpu()`, a data-dependent shape such as `x[mask]` or `nonzero`) makes the CPU wait until
the GPU has caught up, and the next launches queue behind that wait. `no_host_reads()`
finds those calls on the CPU, where they cost nothing and so go unnoticed;
`cuda_sync_errors()` makes every synchronisation an error on a GPU. Used by
`cslbench check-selector` and by the tests of the training step.
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode


class HostReadError(RuntimeError):
    """A tensor was read on the host inside `no_host_reads()` (on a GPU: a synchronisation)."""


# Conversions to Python values and copies to the host.
_HOST_READS = {
    Tensor.item, Tensor.tolist, Tensor.numpy, Tensor.cpu, Tensor.__array__,
    Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__, Tensor.__complex__,
    torch.equal, Tensor.equal, torch.allclose, Tensor.allclose, torch.is_nonzero, Tensor.is_nonzero,
}
# Outputs whose size depends on the values (the host must learn it before allocating).
_DATA_DEPENDENT = {
    torch.nonzero, Tensor.nonzero, torch.masked_select, Tensor.masked_select,
    torch.unique, Tensor.unique, torch.unique_consecutive, Tensor.unique_consecutive, torch.argwhere, Tensor.argwhere,
    torch.bincount, Tensor.bincount,  # sized from max(input) on CUDA even with minlength
}
_REPEATS = {torch.repeat_interleave, Tensor.repeat_interleave}


def _host_read(func, args, kwargs) -> bool:
    if func in _HOST_READS or func in _DATA_DEPENDENT:
        return True
    if func in _REPEATS:  # a host read when repeats is a tensor and no output_size is given
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return (repeats is None or isinstance(repeats, Tensor)) and kwargs.get("output_size") is None
    if func in (torch.where, Tensor.where) and len(args) + len(kwargs) == 1:  # torch.where(cond) is nonzero
        return True
    if func in (Tensor.__getitem__, Tensor.__setitem__) and len(args) > 1:  # boolean-mask indexing
        parts = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(p, Tensor) and p.dtype == torch.bool for p in parts)
    if func is Tensor.to and args and isinstance(args[0], Tensor) and args[0].device.type != "cpu":  # a copy to the host
        targets = [*args[1:2], kwargs.get("device")]
        return any(str(t) == "cpu" or (isinstance(t, torch.device) and t.type == "cpu") for t in targets if t is not None)
    return False


def _caller() -> str:
    """The innermost frame outside torch and this module: the line that read."""
    here = Path(__file__).resolve()
    torch_dir = Path(torch.__file__).resolve().parent
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename).resolve()
        if path != here and torch_dir not in path.parents:
            return f"{frame.filename}:{frame.lineno} ({frame.line})"
    return "?"


class _NoHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _host_read(func, args, kwargs):
            name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
            raise HostReadError(f"{name} reads a tensor on the host (a GPU synchronisation) at {_caller()}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Raise HostReadError on any host read or data-dependent output shape in the block.

    Sound on the CPU for what passes through torch's Python API: every torch function and
    Tensor method is seen by a TorchFunctionMode (`bool(t)`, `float(t)`, `if t:`, `t.item()`,
    `x[mask]`, `nonzero`, `torch.equal` ...), which a patch of Tensor.item/__bool__ alone
    would miss. Not seen: reads inside C++ kernels (on CUDA some ops synchronise
    internally) and `.to(probs.device)` on the CPU, where it is no copy; on a GPU,
    `cuda_sync_errors` (tests/test_host_sync.py) covers those.
    """
    with _NoHostReads():
        yield


@contextlib.contextmanager
def cuda_sync_errors(device: torch.device) -> Iterator[None]:
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
