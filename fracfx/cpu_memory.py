"""Keep freed tensor memory in the process instead of handing it back to the OS (glibc only).

CPU tensors come from malloc. glibc serves blocks above its mmap threshold (128 KiB at first,
raised only as such blocks are freed) with fresh mmap() pages and unmaps them on free, and it
trims the top of the heap back to the OS: every training step then page-faults (and zeroes) its
activations again. Quantized training makes more step-sized temporaries than FP32 (rounding
noise, quantized copies), so it pays this more: measured on the 2-core CI machine, cifar_resnet38
batch 128, the 8/8/8 step / FP32 step ratio drops from about 1.36 to about 1.22 (README,
Benchmarks). The tensors' values are untouched; only where the allocator takes memory from.

    from fracfx.cpu_memory import reuse_freed_memory
    reuse_freed_memory()      # once, before training; `fracfx train|bench|demo` call it
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # glibc malloc.h parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 1 << 30  # give memory back only when over 1 GiB sits free at the heap top


@functools.lru_cache(maxsize=1)
def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if applied.

    Returns False (and changes nothing) where the C library is not glibc. Idempotent.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
