"""Which implementation of the per-pixel selection kernels runs: eager, compiled, or Triton.

Selection reads a (B, K, H, W) probability tensor that is K times larger than anything it
writes, so its cost is how many times it reads that tensor and the maps derived from it.
Eager PyTorch runs one kernel per operation; `torch.compile` (inductor: C++ on the CPU,
Triton on a GPU) fuses them into a few passes. Measured on 2 CPU threads at
(16, 21, 256, 256): the class moments take 50 ms eager and 16.5 ms compiled; compiling
costs about 25 s per input shape in a fresh process (cached on disk after that), which pays
back only on large inputs. Chosen by `CSLBENCH_KERNELS`:

- `auto` (default): compile on the CPU for inputs of at least 2**22 elements, eager below
  and on CUDA (the CUDA choice waits for a measurement on a GPU: `make gpu-check`);
- `eager`: never compile;
- `compile`: compile at every size and on every device;
- `triton`: CSL's class moments through the one-pass Triton kernel (bench/contract/triton_moments.py)
  where Triton can run (CUDA, or its interpreter with TRITON_INTERPRET=1), else as `auto`.

A compilation that fails (no C++ compiler, an unsupported op) warns once and falls back to
eager for the rest of the process: the numbers are the same either way, only the time is not.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

MODES = ("auto", "eager", "compile", "triton")
AUTO_MIN_NUMEL = 2**22


def kernel_mode() -> str:
    mode = os.environ.get("CSLBENCH_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"CSLBENCH_KERNELS={mode!r} is not one of {list(MODES)}")
    return mode


def should_compile(example: torch.Tensor) -> bool:
    mode = kernel_mode()
    if mode == "eager":
        return False
    if mode == "compile":
        return True
    return example.device.type == "cpu" and example.numel() >= AUTO_MIN_NUMEL


class MaybeCompiled:
    """`fn` as is, or compiled when `should_compile(first argument)`."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.failed = False
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def compiled(self) -> Callable:
        return torch.compile(self.fn, dynamic=False)

    def __call__(self, *args, **kwargs):
        return self.for_input(args[0])(*args, **kwargs)

    def for_input(self, example: torch.Tensor) -> Callable:
        """The implementation to use for an input like `example` (the tensor whose size
        decides, when it is not the first argument)."""
        if self.failed or not should_compile(example):
            return self.fn
        return self._compiled_or_eager

    def _compiled_or_eager(self, *args, **kwargs):
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # the compiler, not the computation: eager gives the same numbers
            self.failed = True
            warnings.warn(
                f"torch.compile of {self.fn.__qualname__} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                "running it eagerly from now on (same results, slower; CSLBENCH_KERNELS=eager silences this)",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.fn(*args, **kwargs)


def maybe_compiled(fn: Callable) -> MaybeCompiled:
    return MaybeCompiled(fn)
