"""Process-level settings: memory reuse for CPU runs, deterministic kernels.

glibc hands large freed blocks back to the OS, so the next tensor of that size faults in
fresh pages; on a virtual machine each fault costs microseconds, and for a selector on a
(16, 21, 256, 256) batch that is half of its time (measured: csl 52 ms -> 28 ms). Keeping
freed memory in the process is what PyTorch's CPU tuning guide gets from jemalloc or
tcmalloc; here it is two glibc settings. Called by the CLI and the benchmarks, never on
import, so a library user's process is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed blocks to the OS; True if the setting took effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if sys.platform.startswith("linux"):
        name = ctypes.util.find_library("c")
        if name:
            try:
                libc = ctypes.CDLL(name)
                mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
                trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
                _applied = mmap_ok and trim_ok
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                _applied = False
    return _applied



def use_deterministic_kernels(enabled: bool) -> dict:
    """Ask torch, cuDNN and cuBLAS for deterministic kernels, or leave the fast defaults.

    Ops that have no deterministic CUDA kernel (e.g. the backward of bilinear upsampling)
    then warn rather than stop the run, so even with it a CUDA run may differ in the last
    bits. cuBLAS reads its workspace setting when the process first uses it: set here,
    before the trainer's first CUDA matmul, it does nothing in a process that already used
    cuBLAS (set CUBLAS_WORKSPACE_CONFIG in the environment there).
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False
    return {
        "enabled": enabled,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
