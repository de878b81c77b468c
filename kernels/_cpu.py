"""Build and load the fused C kernels of the ``cpu`` backend (kernels/_cpu_*.c, one library).

The machine's C compiler (``$CC``, default ``cc``) compiles the sources once, with ``-O3 -march=native`` and the
reassociation that lets the loops over the state vectorise, into a shared library cached under
``$RECSYS_KERNEL_CACHE`` (default ``~/.cache/recsys/kernels``). The file name hashes the sources, the flags, the
compiler's version and this CPU's feature flags, so a changed source or another CPU builds afresh and a library
built with ``-march=native`` elsewhere is never loaded here. The library is written to a temporary name and
renamed into place (``kernels.atomic.atomic_file``), so an interrupted build never leaves a file that looks
complete.

No compiler, or a failed build, makes ``cpu_kernels`` return None with the reason in ``cpu_unavailable_reason``:
``auto`` then keeps the torch path, and ``backend="cpu"`` is refused with that reason.

The kernels take fp32 contiguous tensors through ctypes, which releases the GIL during the call; ``row_ranges`` and
``run_ranges`` split the batch rows over ``torch.get_num_threads()`` Python threads so that every core works.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kernels.atomic import atomic_file

HERE = Path(__file__).parent
SOURCES = [HERE / "_cpu_selective_scan.c", HERE / "_cpu_ssd.c"]
HEADERS = [HERE / "_cpu_exp2.h"]
# Not -ffast-math: gcc then links crtfastmath.o into the library, whose loading switches the whole process to
# flush-to-zero (every later float op in Python, torch or numpy would lose subnormals). These flags are the parts
# of it that the loops need (measured: without reassociation the forward runs 2.2× slower); NaN and inf keep
# their meaning.
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros", "-shared", "-fPIC"]
_P, _I = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {  # the exported functions: argument types; each returns int (0 = ok, 1 = out of memory)
    "scan_forward": [_P] * 6 + [_I] * 5,
    "scan_backward": [_P] * 11 + [_I] * 5,
    "ssd_forward": [_P] * 8 + [_I] * 7,
    "ssd_backward": [_P] * 14 + [_I] * 7,
}


def _cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_KERNEL_CACHE") or Path.home() / ".cache" / "recsys" / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [f.read_text() for f in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*texts, *FLAGS, version, _cpu_flags()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"recsys-cpu-kernels-{key}.so"
    if lib.exists():
        return lib
    with atomic_file(lib) as tmp:
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {HERE}/_cpu_*.c: {done.stderr.strip()[-2000:]}")
    return lib


cpu_unavailable_reason: str | None = None


@functools.cache
def cpu_kernels() -> ctypes.CDLL | None:
    """The compiled library with typed functions, or None (reason in ``cpu_unavailable_reason``)."""
    global cpu_unavailable_reason
    try:
        lib = ctypes.CDLL(str(_build(os.environ.get("CC", "cc"))))
    except (OSError, subprocess.SubprocessError, RuntimeError) as err:
        cpu_unavailable_reason = f"the fused CPU kernels could not be built: {err}"
        return None
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recsys-cpu-kernel")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the parent's pool threads


def row_ranges(batch: int) -> list[tuple[int, int]]:
    """Disjoint row ranges covering [0, batch), one per thread (``torch.get_num_threads()``, at most one a row)."""
    workers = max(1, min(torch.get_num_threads(), batch))
    return [(batch * w // workers, batch * (w + 1) // workers) for w in range(workers)]


def run_ranges(name: str, ranges: list[tuple[int, int]], call) -> None:
    """Run ``call(i, b0, b1)`` (a kernel call returning its status) for every range on its own thread; raise
    MemoryError if a kernel could not allocate its scratch memory."""
    if len(ranges) == 1:
        codes = [call(0, *ranges[0])]
    else:
        codes = list(_pool(len(ranges)).map(lambda i: call(i, *ranges[i]), range(len(ranges))))
    if any(codes):
        raise MemoryError(f"{name}: the fused CPU kernel could not allocate its scratch memory")
