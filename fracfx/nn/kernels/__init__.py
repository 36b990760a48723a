"""Fused quantizer kernels: C++ custom ops in the `fracfx` torch.library namespace.

    torch.ops.fracfx.minmax(x) -> (lo, hi)                       per-tensor range, one pass
    torch.ops.fracfx.row_minmax(x, rows) -> (lo, hi)             per-row ranges (channels, samples)
    torch.ops.fracfx.fake_quant(x, lo, s, qmax, row_qmax, counter, seed)
                                                 docs/method.md fq per tensor or per row; with a
                                                 counter, Philox stochastic rounding (philox.py)
    torch.ops.fracfx.rounding_noise(numel, counter, seed)   the noise alone (tests)
    torch.ops.fracfx.mixed_act_dots(x, g, lo, scales, qmaxes, clamp)
                                                 per-sample dot products of DFQ's mask gradient

Built once with torch.utils.cpp_extension (needs a C++ compiler and ninja) into a cache folder
(FRACFX_KERNELS_DIR, default ~/.cache/fracfx/kernels), keyed by the source, torch version and the
CPU's vector ISA; `python -m fracfx.nn.kernels --build` (scripts/setup.sh) builds ahead of time.
Where the build or the load fails, or FRACFX_KERNELS=0, `available()` is False, the quantizers use
their eager torch code, and one warning says why. Each op has a fake (meta) implementation, so
torch.compile traces through them without graph breaks.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("quant_kernels.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "reason": None, "warned": False}


def cache_dir() -> Path:
    root = os.environ.get("FRACFX_KERNELS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "fracfx" / "kernels"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_flags() -> tuple[str, list[str]]:
    """(tag, compiler flags) for the vector ISA this CPU has (checked now, not at some earlier build)."""
    flags = _cpu_flags()
    forced = os.environ.get("FRACFX_KERNELS_ISA")  # tests build the narrower variants on a wider CPU
    if forced not in (None, "", "avx512", "avx2", "base"):
        raise ValueError(f"FRACFX_KERNELS_ISA={forced!r}: choose avx512, avx2 or base")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"} <= flags and forced in (None, "", "avx512"):
        return "avx512", ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mprefer-vector-width=512"]
    if {"avx2", "fma"} <= flags and forced in (None, "", "avx512", "avx2"):
        return "avx2", ["-mavx2", "-mfma"]
    return "base", []


BASE_CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]


def build_key() -> tuple[str, list[str]]:
    tag, isa = isa_flags()
    cflags = BASE_CFLAGS + isa
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(cflags).encode())
    return f"fracfx_kernels_{tag}_{digest.hexdigest()[:12]}", cflags


def _build(verbose: bool = False) -> Path:
    from torch.utils import cpp_extension

    name, cflags = build_key()
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=["-fopenmp"], build_directory=str(folder),
                       is_python_module=False, verbose=verbose)
    return folder / f"{name}.so"


def load(build: bool = True, verbose: bool = False) -> bool:
    """Load the kernels (building them first if needed and `build`); True if the ops are usable."""
    with _lock:
        if _state["loaded"] is not None:
            return bool(_state["loaded"])
        if os.environ.get("FRACFX_KERNELS", "1") == "0":
            _state.update(loaded=False, reason="FRACFX_KERNELS=0")
            return False
        try:
            name, _ = build_key()
            library = cache_dir() / name / f"{name}.so"
            if library.exists():
                try:
                    torch.ops.load_library(str(library))
                except OSError:  # half-written by a build in another process (a data-parallel rank)?
                    if not build:
                        raise
                    _build(verbose)  # cpp_extension waits on that build's lock, then loads
            elif build:
                _build(verbose)  # cpp_extension.load loads the library too
            else:
                raise FileNotFoundError(f"{library} is not built (python -m fracfx.nn.kernels --build)")
            torch.ops.fracfx.fake_quant  # noqa: B018  (raises if the library did not register)
            _register_fakes()
            _state.update(loaded=True)
        except Exception as error:  # no compiler, no ninja, a failed build: eager fallback
            _state.update(loaded=False, reason=f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}")
        return bool(_state["loaded"])


def available() -> bool:
    """True if the fused CPU kernels are loaded; on the first False, warns once with the reason."""
    loaded = _state["loaded"]
    if loaded is None:
        loaded = load()
    if not loaded and not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"fracfx: fused quantizer kernels unavailable ({_state['reason']}); using the slower eager torch quantizers",
                      RuntimeWarning, stacklevel=2)
    return bool(loaded)


def unavailable_reason() -> str | None:
    return None if _state["loaded"] else _state["reason"]


def _register_fakes() -> None:
    @torch.library.register_fake("fracfx::minmax")
    def _(x):
        return x.new_empty(()), x.new_empty(())

    @torch.library.register_fake("fracfx::row_minmax")
    def _(x, rows):
        return x.new_empty((rows,)), x.new_empty((rows,))

    @torch.library.register_fake("fracfx::fake_quant")
    def _(x, lo, s, qmax, row_qmax=None, counter=None, seed=0):
        # as the kernel: channels-last where x is channels-last (and not contiguous), else contiguous
        if not x.is_contiguous() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.empty_like(x, memory_format=torch.channels_last)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fracfx::mixed_act_dots")
    def _(x, g, lo, scales, qmaxes, clamp):
        return x.new_empty((x.shape[0], scales.shape[0] + 2))

    @torch.library.register_fake("fracfx::rounding_noise")
    def _(numel, counter, seed):
        return torch.empty((numel,), dtype=torch.float32, device=counter.device)
