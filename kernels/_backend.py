"""Backend selection shared by every operator.

``reference`` is the readable specification (often a plain loop), ``torch`` the vectorised/chunked path that runs
anywhere, ``triton`` the GPU kernel, ``cpu`` a fused C kernel for CPU tensors, compiled at first use with the
machine's C compiler (kernels/_cpu.py). ``auto`` picks Triton only for CUDA tensors when Triton is installed (and
the operator has a Triton kernel), the fused CPU kernel for CPU tensors when the operator has one and it builds,
the torch path otherwise. Triton kernels also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how their parity tests run on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from kernels import _cpu

BACKENDS = ("auto", "reference", "torch", "triton", "cpu")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor, has_triton: bool = False, has_cpu: bool = False) -> str:
    """Map ``auto`` to a concrete backend; reject unknown names and impossible requests with a clear message."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if backend == "auto":
        if on_cuda:
            return "triton" if has_triton and triton_available() else "torch"
        return "cpu" if has_cpu and _cpu.cpu_kernels() is not None else "torch"
    if backend == "cpu":
        if not has_cpu:
            raise ValueError("this operator has no fused CPU kernel; use backend='torch' or 'auto'")
        if on_cuda:
            raise ValueError("backend='cpu' needs CPU tensors")
        if _cpu.cpu_kernels() is None:
            raise ValueError(f"backend='cpu' is unavailable: {_cpu.cpu_unavailable_reason}")
    if backend == "triton":
        if not has_triton:
            raise ValueError("this operator has no Triton kernel; use backend='torch' or 'auto'")
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install -e '.[triton]')")
        if not on_cuda and not triton_interpreted():
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return backend


def fp32_under_autocast(fn):
    """Run a kernel with autocast switched off: its internal matmuls and reductions stay in fp32 (model-specs §3a
    pitfall: scan and exp in fp32) when a model trains under ``torch.autocast`` (``precision=bf16``), which would
    otherwise run them in bf16. Inputs keep their dtypes; each kernel casts to fp32 itself and returns its
    documented dtype."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper
