"""The thin CUDA shim: compile `cuda_src/*.cu` with NVRTC at first use, cache the result on disk,
launch on PyTorch's current stream with torch tensors.

Importing this module never fails and touches no GPU. The first GPU call raises
`CudaUnavailable` naming what is missing: torch with CUDA, a device, NVRTC (cuda-python from the
registry: `cuda-core` or `cuda-bindings`, plus `nvidia-cuda-nvrtc`), or compute capability 8.0.

NVRTC is called through `cuda.bindings.nvrtc` (a dependency of cuda.core too); modules are loaded
and kernels launched through `cuda.core` when it imports, else through the driver API of
`cuda.bindings` (set FERROQUANT_CUDA_BACKEND=core|bindings to force one). One program is compiled
per weight format (`-DFQ_ONLY_<fmt>`), to a cubin for the device's `sm_XY` (a device newer than
the installed NVRTC knows gets PTX for the newest architecture it knows, which the driver
JIT-compiles), and cached under FERROQUANT_CACHE_DIR (default ~/.cache/ferroquant/cuda), keyed by
sha256 of the sources and headers, the architecture, the full NVRTC version (the library's
version and the installed nvidia-cuda-nvrtc / cuda-bindings package versions) and the compile
options. Each cache file starts with a header holding its key and the sha256 of the code; a file
whose header, key or hash does not match (stale, foreign, truncated) is compiled again and
replaced, never loaded.

The sources are the repository's top-level `cuda/` folder, compiled into the extension
(`ferroquant._native.cuda_sources()`), so a source checkout and an installed wheel see the same
bytes without a file in site-packages/cuda/, which is cuda-python's own namespace package.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import config
from .._atomic import atomic_path

# A folder to read the sources from instead of the copy inside the extension (tests that edit a
# source set it); None: the extension's copy.
SRC_DIR: pathlib.Path | None = None
SOURCE = "qmatmul.cu"
HEADERS = ("ferroquant_blocks.cuh",)
# The weight formats with CUDA kernels: each is one `FQ_ONLY_<format>` program of qmatmul.cu.
# Their block sizes and layouts come from the Rust qtype table (`ferroquant.qtype_info`,
# `_native.block_quant_spans`); a test checks this list against the kernel source and that table.
KERNEL_QTYPES = ("nf4", "int8", "q4_0", "q8_0", "q4_k", "q5_k", "q6_k")


def kernel_format(qtype: str) -> str:
    """The format's name in the kernels: ggml's spelling (K-quants keep the capital K: q4_K)."""
    return qtype[:-2] + "_K" if qtype.endswith("_k") else qtype


# ferroquant qtype name -> the format's name in the kernels.
FORMATS = {q: kernel_format(q) for q in KERNEL_QTYPES}
ACTS = ("bf16", "fp16")
GEMV_M = (1, 2, 4, 8, 16)  # token-count instantiations of the GEMV kernel
GEMV_WARPS = 4  # FQ_GEMV_WARPS in qmatmul.cu
GEMV_ROWS = 2  # FQ_ROWS in qmatmul.cu
DEQUANT_THREADS = 256
MMA_WARPS = 4  # FQ_MMA_WARPS in qmatmul.cu
MMA_NT = 2  # FQ_MMA_NT in qmatmul.cu: 8-row weight tiles per warp
REDUCE_THREADS = 256
MIN_CC = (8, 0)
OPTIONS = ("-std=c++17", "-default-device")


class CudaUnavailable(RuntimeError):
    """The CUDA path cannot run here; the message names what is missing."""


class CudaCompileError(RuntimeError):
    """NVRTC rejected the kernels; the message holds the compiler log."""


def gemv_kernel_name(qtype: str, act: str, mt: int) -> str:
    return f"fq_gemv_{FORMATS[qtype]}_{act}_m{mt}"


def dequant_kernel_name(qtype: str, act: str) -> str:
    return f"fq_dequant_{FORMATS[qtype]}_{act}"


def mma_kernel_name(qtype: str, act: str) -> str:
    return f"fq_mma_{FORMATS[qtype]}_{act}"


def reduce_kernel_name(act: str) -> str:
    return f"fq_reduce_{act}"


def kernel_names(qtype: str) -> list[str]:
    """Every kernel the program of `qtype` defines."""
    names = []
    for act in ACTS:
        names += [gemv_kernel_name(qtype, act, mt) for mt in GEMV_M]
        names += [mma_kernel_name(qtype, act), reduce_kernel_name(act)]
        names.append(dequant_kernel_name(qtype, act))
    return names


# ---- sources, options, cache key ------------------------------------------------------------


def sources() -> dict[str, bytes]:
    """The kernel source and its headers, by file name."""
    if SRC_DIR is None:
        from .. import _native

        files = {name: text.encode() for name, text in _native.cuda_sources()}
    else:
        files = {p.name: p.read_bytes() for p in SRC_DIR.iterdir() if p.is_file()}
    missing = [name for name in (SOURCE, *HEADERS) if name not in files]
    if missing:
        where = SRC_DIR or "ferroquant._native"
        raise CudaUnavailable(f"the CUDA sources {missing} are missing from {where}")
    return {name: files[name] for name in (SOURCE, *HEADERS)}


def normalize_arch(arch: Any) -> int:
    """80, "80", "sm_80", "sm_90a", "compute_90" or (8, 0) -> 80 (90a counts as 90)."""
    if isinstance(arch, tuple):
        return int(arch[0]) * 10 + int(arch[1])
    text = str(arch).lower().removeprefix("sm_").removeprefix("compute_").rstrip("a")
    if not text.isdigit():
        raise ValueError(f"not a CUDA architecture: {arch!r} (expected e.g. 'sm_90' or 90)")
    return int(text)


def compile_options(qtype: str, arch: int, kind: str, variant: Sequence[str] = ()) -> list[str]:
    """NVRTC options; `variant`: tuning macros such as "FQ_ROWS=4", "FQ_UNROLL=2"."""
    target = f"compute_{arch}" if kind == "ptx" else f"sm_{arch}"
    opts = [f"--gpu-architecture={target}", *OPTIONS, f"-DFQ_ONLY_{FORMATS[qtype]}"]
    return opts + [f"-D{v}" for v in variant]


def cache_key(qtype: str, arch: Any, kind: str = "cubin", variant: Sequence[str] = ()) -> str:
    """sha256 of sources + headers, architecture, full NVRTC version, kind and compile options."""
    arch_n = normalize_arch(arch)
    h = hashlib.sha256()
    for name, data in sorted(sources().items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    opts = compile_options(qtype, arch_n, kind, variant)
    fields = [f"sm_{arch_n}", kind, nvrtc_full_version(), *opts]
    h.update("\0".join(fields).encode())
    return h.hexdigest()


CACHE_MAGIC = b"ferroquant-cuda-cache 1\n"


def pack_cached(key: str, code: bytes) -> bytes:
    """A cache file: magic, then one line `<key> <sha256 of code> <length>`, then the code."""
    line = f"{key} {hashlib.sha256(code).hexdigest()} {len(code)}\n".encode()
    return CACHE_MAGIC + line + code


def unpack_cached(key: str, blob: bytes) -> bytes | None:
    """The code of a cache file written by `pack_cached` for `key`, or None when the file is
    not one (an old format, another key, a wrong length or hash: stale, foreign or torn)."""
    if not blob.startswith(CACHE_MAGIC):
        return None
    rest = blob[len(CACHE_MAGIC) :]
    head, sep, code = rest.partition(b"\n")
    fields = head.decode(errors="replace").split(" ")
    if not sep or len(fields) != 3 or fields[0] != key or not fields[2].isdigit():
        return None
    if int(fields[2]) != len(code) or hashlib.sha256(code).hexdigest() != fields[1]:
        return None
    return code


def cache_dir() -> pathlib.Path:
    return config.cuda_cache_dir()


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ---- NVRTC ----------------------------------------------------------------------------------


def _backend_name() -> str:
    """'core' (cuda.core) or 'bindings' (cuda.bindings), or CudaUnavailable."""
    forced = config.cuda_backend()
    errors = []
    for name in ("core", "bindings") if not forced else (forced,):
        try:
            if name == "core":
                _core()
                from cuda.bindings import nvrtc  # noqa: F401
            elif name == "bindings":
                from cuda.bindings import driver, nvrtc  # noqa: F401
            else:
                raise ImportError(f"FERROQUANT_CUDA_BACKEND={forced!r}: use 'core' or 'bindings'")
            return name
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise CudaUnavailable(
        "NVRTC not found: install cuda-python from the registry "
        "(pip install cuda-core cuda-bindings nvidia-cuda-nvrtc); " + "; ".join(errors)
    )


def _core() -> Any:
    """The cuda.core module (1.x exports at the top level, 0.x under .experimental)."""
    try:
        import cuda.core as core

        core.Program  # noqa: B018
        return core
    except (ImportError, AttributeError):
        from cuda.core import experimental as core

        return core


def nvrtc_version() -> tuple[int, int]:
    try:
        from cuda.bindings import nvrtc  # a dependency of cuda.core too
    except ImportError as e:
        raise CudaUnavailable(
            "NVRTC not found: pip install cuda-bindings nvidia-cuda-nvrtc (cuda-python)"
        ) from e

    res = nvrtc.nvrtcVersion()
    if int(res[0]) != 0:
        raise CudaUnavailable(f"NVRTC is installed but does not load: {res[0]!r}")
    return int(res[1]), int(res[2])


def nvrtc_full_version() -> str:
    """The NVRTC library's version and the installed packages that ship or wrap it, e.g.
    "13.2 nvidia-cuda-nvrtc=13.2.86 cuda-bindings=13.5.0": two builds of one minor version
    (a patched compiler) get different cache keys."""
    import importlib.metadata as md

    parts = [".".join(map(str, nvrtc_version()))]
    found = []
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-cuda-nvrtc") or name == "cuda-bindings":
            found.append(f"{name}={dist.version}")
    return " ".join(parts + sorted(set(found)))


def supported_archs() -> list[int]:
    """The architectures the installed NVRTC compiles for (nvrtcGetSupportedArchs)."""
    from cuda.bindings import nvrtc

    res = nvrtc.nvrtcGetSupportedArchs()
    if int(res[0]) != 0:
        raise CudaUnavailable(f"NVRTC does not list its architectures: {res[0]!r}")
    return sorted(int(a) for a in res[1])


def compile_target(arch: int, known: Sequence[int]) -> tuple[str, int]:
    """(kind, architecture) to build for a device of `arch`: a cubin when NVRTC knows `arch`;
    PTX for the newest architecture it knows when the device is newer (the driver JIT-compiles
    PTX forward); CudaUnavailable for a device older than sm_80."""
    if arch < MIN_CC[0] * 10 + MIN_CC[1]:
        raise CudaUnavailable(f"sm_{arch} is older than sm_80, the oldest the kernels support")
    if arch in known:
        return "cubin", arch
    older = [a for a in known if a <= arch and a >= 80]
    if not older:
        raise CudaUnavailable(f"this NVRTC knows none of sm_80 .. sm_{arch} (it knows {known})")
    return "ptx", max(older)


def _nvrtc_check(res: Any, what: str) -> Any:
    err = res[0]
    if int(err) != 0:
        raise CudaCompileError(f"{what} failed: {err!r}")
    return res[1:] if len(res) > 2 else (res[1] if len(res) == 2 else None)


def _compile(qtype: str, arch: int, kind: str, variant: Sequence[str] = ()) -> bytes:
    from cuda.bindings import nvrtc

    files = sources()
    hdr_names = [h.encode() for h in HEADERS]
    prog = _nvrtc_check(
        nvrtc.nvrtcCreateProgram(
            files[SOURCE], SOURCE.encode(), len(HEADERS), [files[h] for h in HEADERS], hdr_names
        ),
        "nvrtcCreateProgram",
    )
    try:
        opts = [o.encode() for o in compile_options(qtype, arch, kind, variant)]
        res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(res[0]) != 0:
            size = _nvrtc_check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise CudaCompileError(
                f"NVRTC failed to compile {SOURCE} ({qtype}, sm_{arch}):\n"
                + log.decode(errors="replace").rstrip("\0 ")
            )
        if kind == "ptx":
            size = _nvrtc_check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            out = b" " * size
            _nvrtc_check(nvrtc.nvrtcGetPTX(prog, out), "nvrtcGetPTX")
        else:
            size = _nvrtc_check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            out = b" " * size
            _nvrtc_check(nvrtc.nvrtcGetCUBIN(prog, out), "nvrtcGetCUBIN")
        return out
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_program(
    qtype: str, arch: Any, kind: str = "cubin", use_cache: bool = True, variant: Sequence[str] = ()
) -> bytes:
    """PTX or cubin of `qtype`'s kernels for `arch`, from the disk cache when present."""
    if qtype not in FORMATS:
        raise ValueError(f"no CUDA kernels for {qtype!r}; have {sorted(FORMATS)}")
    arch_n = normalize_arch(arch)
    key = cache_key(qtype, arch_n, kind, variant)
    path = cache_dir() / f"{qtype}-sm_{arch_n}-{key}.{kind}"
    if use_cache:
        try:
            code = unpack_cached(key, path.read_bytes())
        except OSError:
            code = None  # absent or unreadable
        if code is not None:
            return code
    code = _compile(qtype, arch_n, kind, variant)
    if use_cache:
        try:
            _atomic_write(path, pack_cached(key, code))
        except OSError:
            pass  # a read-only home: compile again next time
    return code


def compile_all_ptx(arch: Any, qtypes: Sequence[str] | None = None) -> dict[str, bytes]:
    """Compile every kernel instantiation to PTX for `arch` (no GPU needed), bypassing the cache.
    Raises CudaCompileError with NVRTC's log on failure."""
    wanted = list(qtypes or FORMATS)
    with ThreadPoolExecutor(max_workers=max(1, min(len(wanted), os.cpu_count() or 1))) as pool:
        codes = list(pool.map(lambda q: compile_program(q, arch, "ptx", use_cache=False), wanted))
    return dict(zip(wanted, codes, strict=True))


# ---- device, modules, launch ----------------------------------------------------------------


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise CudaUnavailable("PyTorch is not installed (pip install torch)") from e
    return torch


def check_device(device: Any = None) -> tuple[int, tuple[int, int]]:
    """(device index, compute capability) of a usable CUDA device, else CudaUnavailable."""
    torch = _torch()
    if torch.version.cuda is None:
        raise CudaUnavailable(f"this PyTorch ({torch.__version__}) was built without CUDA")
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise CudaUnavailable("no CUDA device (torch.cuda.is_available() is False)")
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int):
        index = device
    else:
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
    cc = torch.cuda.get_device_capability(index)
    if cc < MIN_CC:
        name = torch.cuda.get_device_name(index)
        raise CudaUnavailable(
            f"{name} has compute capability {cc[0]}.{cc[1]}; ferroquant's CUDA kernels need "
            f"{MIN_CC[0]}.{MIN_CC[1]} (sm_80) or newer"
        )
    _backend_name()  # NVRTC present?
    return index, cc


class _Program:
    """One format's compiled kernels, loaded on one device."""

    def __init__(
        self, qtype: str, index: int, cc: tuple[int, int], variant: Sequence[str] = ()
    ) -> None:
        torch = _torch()
        self.backend = _backend_name()
        self.index = index
        self.rows = GEMV_ROWS  # FQ_ROWS of this build: the GEMV grid depends on it
        self.mma_tiles = MMA_NT  # FQ_MMA_NT: the mma grid depends on it
        for v in variant:
            if v.startswith("FQ_ROWS="):
                self.rows = int(v.split("=", 1)[1])
            if v.startswith("FQ_MMA_NT="):
                self.mma_tiles = int(v.split("=", 1)[1])
        self.sms = torch.cuda.get_device_properties(index).multi_processor_count
        kind, arch = compile_target(cc[0] * 10 + cc[1], supported_archs())
        code = compile_program(qtype, arch, kind, variant=variant)
        if kind == "ptx":
            code = code.rstrip(b"\0") + b"\0"  # the driver reads PTX as a C string
        with torch.cuda.device(index):
            torch.cuda.current_stream(index)  # makes torch's primary context current
            if self.backend == "core":
                core = _core()
                self.device = core.Device(index)
                self.device.set_current()
                load = core.ObjectCode.from_ptx if kind == "ptx" else core.ObjectCode.from_cubin
                self.module = load(code)
                self.kernels = {n: self.module.get_kernel(n) for n in kernel_names(qtype)}
            else:
                from cuda.bindings import driver

                _drv(driver.cuInit(0), "cuInit")
                ctx = _drv(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
                if int(ctx) == 0:
                    dev = _drv(driver.cuDeviceGet(index), "cuDeviceGet")
                    ctx = _drv(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
                    _drv(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
                import numpy as np

                self._image = np.frombuffer(code, dtype=np.uint8).copy()  # alive while loaded
                self.module = _drv(
                    driver.cuModuleLoadData(self._image.ctypes.data), "cuModuleLoadData"
                )
                self.kernels = {
                    n: _drv(driver.cuModuleGetFunction(self.module, n.encode()), n)
                    for n in kernel_names(qtype)
                }
        self._streams: dict[int, Any] = {}
        # (kernel, grid, block, argument kinds, thread) -> the packed parameter buffer of the
        # driver path (one ctypes holder per argument, refilled per launch) or the core path's
        # LaunchConfig: packing happens once per kernel and shape, not per call
        self._packed: dict[tuple, Any] = {}

    def launch(self, name: str, grid: int, block: int, args: Sequence[tuple[str, int]]) -> None:
        """Launch kernel `name` on torch's current stream; args are (ctype, value) with ctype in
        'ptr', 'i32', 'i64'. Host-side only: no synchronisation, no allocation."""
        torch = _torch()
        stream = torch.cuda.current_stream(self.index)
        kernel = self.kernels[name]
        if self.backend == "core":
            import numpy as np

            core = _core()
            s = self._streams.get(stream.cuda_stream)
            if s is None:
                s = self._streams[stream.cuda_stream] = (self.device.create_stream(stream), stream)
            key = (name, grid, block)
            config_ = self._packed.get(key)
            if config_ is None:
                config_ = self._packed[key] = core.LaunchConfig(grid=grid, block=block)
            conv = {"ptr": int, "i32": np.int32, "i64": np.int64}
            vals = [conv[t](v) for t, v in args]
            core.launch(s[0], config_, kernel, *vals)
        else:
            from cuda.bindings import driver

            key = (name, tuple(t for t, _ in args), threading.get_ident())
            packed = self._packed.get(key)
            if packed is None:
                ctypes_of = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int32, "i64": ctypes.c_int64}
                holders = [ctypes_of[t]() for t, _ in args]
                ptrs = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
                packed = self._packed[key] = (holders, ptrs)
            holders, ptrs = packed
            for h, (_, v) in zip(holders, args, strict=True):
                h.value = v
            _drv(
                driver.cuLaunchKernel(
                    kernel,
                    grid,
                    1,
                    1,
                    block,
                    1,
                    1,
                    0,
                    driver.CUstream(stream.cuda_stream),
                    ctypes.addressof(ptrs),
                    0,
                ),  # fmt: skip
                name,
            )


def _drv(res: Any, what: str) -> Any:
    err = res[0]
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver call {what} failed: {err!r}")
    return res[1] if len(res) == 2 else (res[1:] if len(res) > 2 else None)


_programs: dict[tuple[str, int, str, tuple[str, ...]], _Program] = {}
_lock = threading.Lock()


def program(qtype: str, device: Any = None, variant: Sequence[str] = ()) -> _Program:
    """`qtype`'s kernels loaded on `device` (compiled or read from the cache at first use). Load
    every program a CUDA graph needs before capturing it (a first forward pass does). `variant`:
    tuning macros (see qmatmul.cu), for benchmarks."""
    # Fast path (every launch): no device queries once the program is loaded.
    index = getattr(device, "index", None) if device is not None else None
    if index is None:
        index, _ = check_device(device)
    key = (qtype, index, config.cuda_backend(), tuple(variant))
    prog = _programs.get(key)
    if prog is None:
        with _lock:
            prog = _programs.get(key)
            if prog is None:
                index, cc = check_device(index)
                prog = _programs[key] = _Program(qtype, index, cc, tuple(variant))
    return prog


def precompile(
    qtypes: Sequence[str] | None = None,
    device: Any = None,
    variants: Sequence[Sequence[str]] = ((),),
) -> None:
    """Compile (or read from the cache) and load every format's kernels on `device`, NVRTC
    running in parallel threads; afterwards no call compiles, so graphs can be captured."""
    _, cc = check_device(device)
    jobs = [(q, tuple(v)) for q in (qtypes or FORMATS) for v in variants]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        list(pool.map(lambda j: compile_program(j[0], cc[0] * 10 + cc[1], variant=j[1]), jobs))
    for q, v in jobs:
        program(q, device, v)


def available(device: Any = None) -> bool:
    try:
        check_device(device)
        return True
    except CudaUnavailable:
        return False


def diagnose() -> str:
    """One line saying whether the CUDA path can run here, and if not, why."""
    try:
        index, cc = check_device()
        be = _backend_name()
        v = nvrtc_version()
        return f"CUDA ok: device {index}, sm_{cc[0]}{cc[1]}, NVRTC {v[0]}.{v[1]} via cuda.{be}"
    except CudaUnavailable as e:
        return f"CUDA unavailable: {e}"
