"""Every FERROQUANT_* environment switch the Python package reads, read here and nowhere else.

The Rust core reads its own switches (FERROQUANT_NUM_THREADS, FERROQUANT_FORCE_SCALAR,
FERROQUANT_RUNTIME_PACK, FERROQUANT_MAX_ISA, FERROQUANT_AVX2_GEMM, FERROQUANT_NEON_GEMM) in one
module of its own;
`describe()` lists both sets for `ferroquant doctor`. docs/configuration.md documents each one."""

from __future__ import annotations

import os
import pathlib

# name -> what it does, for the Rust core's switches (read there, listed here for `doctor`).
RUST_SWITCHES = {
    "FERROQUANT_NUM_THREADS": "threads of the Rust core's pool (default: all cores)",
    "FERROQUANT_FORCE_SCALAR": "1: run the scalar references instead of the SIMD kernels",
    "FERROQUANT_RUNTIME_PACK": "0: the native runtime keeps weights as stored (no VNNI panels)",
    "FERROQUANT_MAX_ISA": (
        "avx2 / avxvnni: cap the x86-64 kernels below AVX-512; avx512: no AMX; "
        "aarch64: neon (no sdot / smmla) or dotprod (no smmla)"
    ),
    "FERROQUANT_AVX2_GEMM": "0: no AVX2 GEMM for the 32-weight formats (the row kernels run)",
    "FERROQUANT_NEON_GEMM": "0: no aarch64 GEMM for the 32-weight formats (the row kernels run)",
}
PYTHON_SWITCHES = {
    "FERROQUANT_CACHE_DIR": "folder of compiled CUDA kernels (default ~/.cache/ferroquant/cuda)",
    "FERROQUANT_CUDA_BACKEND": "core | bindings: force the cuda-python layer that launches kernels",
    "FERROQUANT_CUDA_MMA_MIN_M": "token count from which M <= 16 uses the tensor-core kernel",
    "FERROQUANT_OPENMP": "off: QuantLinear's CPU calls keep the Rust pool, not torch's OpenMP team",
}


def _get(name: str) -> str:
    return os.environ.get(name, "")


def cuda_cache_dir() -> pathlib.Path:
    """FERROQUANT_CACHE_DIR, default ~/.cache/ferroquant/cuda."""
    raw = _get("FERROQUANT_CACHE_DIR")
    return pathlib.Path(raw) if raw else pathlib.Path.home() / ".cache" / "ferroquant" / "cuda"


def cuda_backend() -> str:
    """FERROQUANT_CUDA_BACKEND: '' (choose), 'core' or 'bindings' (checked by the shim)."""
    return _get("FERROQUANT_CUDA_BACKEND")


def cuda_mma_min_m() -> int | None:
    """FERROQUANT_CUDA_MMA_MIN_M as an int, None when unset or empty."""
    raw = _get("FERROQUANT_CUDA_MMA_MIN_M")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"FERROQUANT_CUDA_MMA_MIN_M must be an integer, got {raw!r}") from None


def openmp() -> bool:
    """FERROQUANT_OPENMP: False for 'off' / '0'; True (the default) for unset, '', 'auto', 'on'
    or '1': QuantLinear's CPU calls run on torch's OpenMP team when torch has one."""
    raw = _get("FERROQUANT_OPENMP").strip().lower()
    if raw in ("", "auto", "on", "1"):
        return True
    if raw in ("off", "0"):
        return False
    raise ValueError(f"FERROQUANT_OPENMP must be auto, on, off, 1 or 0, got {raw!r}")


def describe() -> dict[str, str]:
    """Each switch with its current value, or '(unset)'."""
    names = sorted({**RUST_SWITCHES, **PYTHON_SWITCHES})
    return {name: os.environ.get(name, "(unset)") for name in names}
