"""The CUDA groundwork that runs without a GPU: NVRTC compiles every kernel instantiation to PTX
for sm_80 and sm_90 (which also checks the header's static_asserts), the header's block sizes
equal the Rust core's, the shim's errors without a GPU, the disk-cache key, and the reversible
split layout of the ggml formats. Correctness and speed on a GPU: benches/gpu_qmatmul.py."""

from __future__ import annotations

import functools
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import ferroquant as fq
from ferroquant import _native

peers_torch = pytest.importorskip("torch")

from ferroquant.cuda import checks  # noqa: E402
from ferroquant.cuda import nvrtc as fqcuda  # noqa: E402
from ferroquant.cuda import qmatmul as cuda_ops  # noqa: E402

import peers  # noqa: E402

CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda"  # the repository's kernel sources
HEADER = CUDA_DIR / "ferroquant_blocks.cuh"


def _nvrtc_or_fail():
    peers.require("cuda.bindings.nvrtc")


_PTX: dict[str, dict[str, bytes]] = {}


def _ptx(arch: str) -> dict[str, bytes]:
    """Every format's PTX for `arch`, compiled once per test session."""
    _nvrtc_or_fail()
    if arch not in _PTX:
        _PTX[arch] = fqcuda.compile_all_ptx(arch)
    return _PTX[arch]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_to_ptx(arch):
    ptx = _ptx(arch)
    assert set(ptx) == set(fqcuda.FORMATS)
    target = f".target sm_{arch[3:]}"
    for qtype, code in ptx.items():
        text = code.decode(errors="replace")
        assert target in text, (qtype, arch)
        entries = set(re.findall(r"\.entry\s+(\w+)", text))
        assert entries == set(fqcuda.kernel_names(qtype)), (qtype, entries)


def _loops(ptx: str, name: str) -> list[list[str]]:
    """The instructions of each loop of kernel `name` (a label up to the branch back to it)."""
    m = re.search(r"\.entry\s+" + name + r"\s*\(.*?\n}\n", ptx, re.S)
    assert m, name
    lines = [ln.strip() for ln in m.group(0).split("\n")]
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.fullmatch(r"\$L__\w+:", ln)}
    loops = []
    for i, ln in enumerate(lines):
        b = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", ln)
        if b and labels.get(b.group(1), i) < i:
            body = lines[labels[b.group(1)] : i + 1]
            loops.append([x for x in body if x and not x.startswith(("$", "//"))])
    return loops


def _opcode(ins: str) -> str:
    parts = ins.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_gemv_inner_loop_keeps_weight_loads_in_flight(arch):
    """The PTX of every GEMV kernel: its main loop issues at least FQ_UNROLL x FQ_ROWS (4)
    independent 16-byte streaming weight loads before the first FMA that consumes weights
    (Little's law at HBM latency needs several per lane), and no loop divides (the statistics
    index is a shift; only 32-bit constant divisions, which compile to multiplies, remain)."""
    ptx = _ptx(arch)
    for qtype, code in ptx.items():
        text = code.decode()
        for name in fqcuda.kernel_names(qtype):
            if not name.startswith("fq_gemv_"):
                continue
            loops = _loops(text, name)
            main = max(loops, key=len)
            ops = [_opcode(i) for i in main]
            first_fma = next(i for i, o in enumerate(ops) if o.startswith("fma.rn.f32"))
            ahead = [o for o in ops[:first_fma] if re.match(r"ld\.global\.cs\.v4", o)]
            assert len(ahead) >= 4, (name, arch, len(ahead))
            for loop in loops:
                divs = [o for o in map(_opcode, loop) if re.match(r"(div|rem)\.", o)]
                assert not divs, (name, arch, divs)


def _entry_params(ptx: str, name: str) -> list[str]:
    """PTX types of kernel `name`'s parameters, in order."""
    m = re.search(r"\.entry\s+" + name + r"\s*\((.*?)\)", ptx, re.S)
    assert m, name
    return re.findall(r"\.param\s+\.(\w+)\s+\w+", m.group(1))


class _RecordingProgram:
    rows = fqcuda.GEMV_ROWS
    mma_tiles = fqcuda.MMA_NT
    sms = 132

    def __init__(self):
        self.launches = []

    def launch(self, name, grid, block, args):
        self.launches.append((name, grid, block, args))


@pytest.mark.parametrize("qtype", sorted(fqcuda.FORMATS))
def test_launch_arguments_match_the_kernels(qtype, monkeypatch):
    """What cuda_ops passes (names, argument kinds, grid) against the compiled kernels' PTX
    signatures, with the launch recorded instead of run (no GPU here)."""
    import contextlib

    torch = peers_torch
    ptx = _ptx("sm_80")[qtype].decode()
    prog = _RecordingProgram()
    monkeypatch.setattr(cuda_ops._cuda, "program", lambda *a, **k: prog)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    # CPU tensors stand in for CUDA ones: validate as for a CPU device
    monkeypatch.setattr(cuda_ops, "validate", functools.partial(checks.validate, device_type="cpu"))
    cuda_ops.clear_cache()
    qk = cuda_ops.GGML_SPLIT.get(qtype, (32,))[0]
    n, k = 37, 3 * max(qk, 64)
    qbits, meta, group = _random_weights(qtype, n, k, seed=3)
    if qtype in cuda_ops.GGML_SPLIT:
        data = cuda_ops.from_split(torch.from_numpy(np.concatenate([qbits, meta])), qtype, n, k)
        stats = torch.zeros(0)
    else:
        data, stats = torch.from_numpy(qbits), torch.from_numpy(np.asarray(meta))
    srs, sshift = _stat(qtype, n, k, group)
    kinds = {"ptr": "u64", "i32": "u32", "i64": "u64"}
    for m, dtype in ((3, torch.bfloat16), (20, torch.float16)):
        prog.launches.clear()
        x = torch.zeros(m, k, dtype=dtype)
        y = cuda_ops.qmatmul_cuda(x, data, stats, qtype, n, k, 64, "row")
        assert y.shape == (m, n) and y.dtype == dtype
        ((name, grid, block, args),) = prog.launches
        act = "bf16" if dtype == torch.bfloat16 else "fp16"
        if m <= cuda_ops.MAX_GEMV_M:
            assert name == fqcuda.gemv_kernel_name(qtype, act, 4)
            assert block == 32 * fqcuda.GEMV_WARPS and grid * fqcuda.GEMV_WARPS * prog.rows >= n
            ks = cuda_ops.gemv_ksplit(n, k, qk, _spb(qtype), prog.rows, prog.sms)
            assert args[2:] == [("ptr", x.data_ptr()), ("ptr", y.data_ptr()), ("i32", m),
                                ("i32", n), ("i32", k), ("i64", srs), ("i32", sshift),
                                ("i32", ks)]  # fmt: skip
        else:
            spb = cuda_ops.GGML_SPLIT[qtype][4] if qtype in cuda_ops.GGML_SPLIT else None
            spb = spb or cuda_ops.FLAT[qtype][1]
            assert name == fqcuda.dequant_kernel_name(qtype, act)
            assert grid * block >= n * (k // qk if qtype in cuda_ops.GGML_SPLIT else k // 32) * spb
        assert [kinds[t] for t, _ in args] == _entry_params(ptx, name)
    # the tensor-core path: the mma kernel, then the split-K reduction when K is sliced
    for sms in (1, 132):
        prog.sms = sms
        cuda_ops.clear_cache()  # launch plans are kept per program, whose SM count is fixed
        prog.launches.clear()
        x = torch.zeros(5, k, dtype=torch.bfloat16)
        y = cuda_ops.qmatmul_cuda(x, data, stats, qtype, n, k, 64, "row", path="mma")
        per, splits = cuda_ops.mma_split(n, k, qk, _spb(qtype), prog.mma_tiles, sms)
        names = [launch[0] for launch in prog.launches]
        want = [fqcuda.mma_kernel_name(qtype, "bf16")]
        want += [fqcuda.reduce_kernel_name("bf16")] if splits > 1 else []
        assert names == want, (sms, names)
        name, grid, block, args = prog.launches[0]
        tiles = -(-n // (8 * prog.mma_tiles))
        assert block == 32 * fqcuda.MMA_WARPS and grid * fqcuda.MMA_WARPS >= tiles * splits
        assert args[-2:] == [("i32", per), ("i32", splits)] and args[5:8] == [
            ("i32", 5), ("i32", n), ("i32", k)]  # fmt: skip
        for name, _, _, args in prog.launches:
            assert [kinds[t] for t, _ in args] == _entry_params(ptx, name)
    with pytest.raises(ValueError, match="at most 16"):
        cuda_ops.qmatmul_cuda(torch.zeros(17, k, dtype=torch.bfloat16), data, stats, qtype, n, k,
                              64, "row", path="mma")  # fmt: skip


def _spb(qtype):
    return (
        cuda_ops.GGML_SPLIT[qtype][4] if qtype in cuda_ops.GGML_SPLIT else cuda_ops.FLAT[qtype][1]
    )


def test_mma_min_m_policy(monkeypatch):
    monkeypatch.delenv("FERROQUANT_CUDA_MMA_MIN_M", raising=False)
    assert [cuda_ops.choose_path(m) for m in (1, 16, 17)] == ["gemv", "gemv", "dequant"]
    monkeypatch.setenv("FERROQUANT_CUDA_MMA_MIN_M", "4")
    assert [cuda_ops.choose_path(m) for m in (1, 3, 4, 16, 17)] == [
        "gemv", "gemv", "mma", "mma", "dequant"]  # fmt: skip
    monkeypatch.setenv("FERROQUANT_CUDA_MMA_MIN_M", "four")
    with pytest.raises(ValueError, match="FERROQUANT_CUDA_MMA_MIN_M"):
        cuda_ops.choose_path(2)


def test_driver_launch_marshals_arguments(monkeypatch):
    """The cuda.bindings launch path hands cuLaunchKernel an array of pointers to the values."""
    import ctypes
    import types

    torch = peers_torch
    driver = peers.require("cuda.bindings.driver")
    seen = {}

    def fake_launch(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        p = (ctypes.c_void_p * 3).from_address(params)
        seen.update(f=f, grid=(gx, gy, gz), block=(bx, by, bz), shmem=shmem, extra=extra)
        seen["vals"] = [
            ctypes.c_void_p.from_address(p[0]).value,
            ctypes.c_int32.from_address(p[1]).value,
            ctypes.c_int64.from_address(p[2]).value,
        ]
        return (driver.CUresult.CUDA_SUCCESS,)

    monkeypatch.setattr(driver, "cuLaunchKernel", fake_launch)
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda i=None: types.SimpleNamespace(cuda_stream=0)
    )
    prog = object.__new__(fqcuda._Program)
    prog.backend, prog.index, prog.kernels, prog._streams = "bindings", 0, {"k": "fn"}, {}
    prog._packed = {}
    prog.launch("k", 5, 128, [("ptr", 0xDEADBEEF0), ("i32", -7), ("i64", 1 << 40)])
    assert seen == {"f": "fn", "grid": (5, 1, 1), "block": (128, 1, 1), "shmem": 0, "extra": 0,
                    "vals": [0xDEADBEEF0, -7, 1 << 40]}  # fmt: skip
    # the packed parameter buffer is made once per kernel and argument kinds, refilled per call
    prog.launch("k", 7, 128, [("ptr", 0x1230), ("i32", 3), ("i64", -5)])
    assert seen["grid"] == (7, 1, 1) and seen["vals"] == [0x1230, 3, -5]
    assert len(prog._packed) == 1


def test_launch_plans_are_cached_per_shape(monkeypatch):
    """A repeated call (a decode step) reuses its launch plan: the grid and split are computed
    once per (format, M, N, K, dtype, path), not per call."""
    import contextlib

    torch = peers_torch
    prog = _RecordingProgram()
    monkeypatch.setattr(cuda_ops._cuda, "program", lambda *a, **k: prog)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(cuda_ops, "validate", functools.partial(checks.validate, device_type="cpu"))
    cuda_ops.clear_cache()
    made = []
    real = cuda_ops.gemv_ksplit
    monkeypatch.setattr(cuda_ops, "gemv_ksplit", lambda *a: made.append(a) or real(*a))
    n, k = 64, 512
    data = torch.zeros(n * k // 32 * 34, dtype=torch.uint8)
    for _ in range(3):
        cuda_ops.qmatmul_cuda(torch.zeros(1, k, dtype=torch.bfloat16), data, torch.zeros(0),
                              "q8_0", n, k, 32, "")  # fmt: skip
    assert len(made) == 1 and len(prog.launches) == 3
    cuda_ops.qmatmul_cuda(torch.zeros(2, k, dtype=torch.bfloat16), data, torch.zeros(0), "q8_0",
                          n, k, 32, "")  # fmt: skip
    assert len(made) == 2


def test_tuning_variants_compile():
    """The knobs benches/gpu_qmatmul.py times (rows per warp, unrolled lane steps) compile."""
    _nvrtc_or_fail()
    ptx = fqcuda.compile_program("q8_0", "sm_90", "ptx", False, ("FQ_ROWS=4", "FQ_UNROLL=2"))
    assert set(re.findall(r"\.entry\s+(\w+)", ptx.decode())) == set(fqcuda.kernel_names("q8_0"))


def test_header_block_sizes_equal_rust():
    pairs = re.findall(
        r"static_assert\(sizeof\((block_\w+)\) == (\d+)", HEADER.read_text(encoding="utf-8")
    )
    header = {name: int(size) for name, size in pairs}
    rust = dict(_native.block_struct_sizes())
    assert header == rust
    # ...and the qtype table agrees for the ggml formats the kernels read.
    for qtype, (qk, bpb, *_rest) in cuda_ops.GGML_SPLIT.items():
        info = fq.qtype_info(qtype)
        assert (info.block_size, info.type_size) == (qk, bpb)
        assert header["block_" + qtype.replace("_k", "_K")] == bpb


def test_compile_error_carries_the_log(tmp_path, monkeypatch):
    _nvrtc_or_fail()
    src = tmp_path / "src"
    shutil.copytree(CUDA_DIR, src)
    hdr = src / "ferroquant_blocks.cuh"
    hdr.write_text(hdr.read_text().replace("sizeof(block_q8_0) == 34", "sizeof(block_q8_0) == 35"))
    monkeypatch.setattr(fqcuda, "SRC_DIR", src)
    with pytest.raises(fqcuda.CudaCompileError, match="block_q8_0 size"):
        fqcuda.compile_program("q8_0", "sm_80", "ptx", use_cache=False)


def test_cache_key_changes_with_source_and_arch(tmp_path, monkeypatch):
    _nvrtc_or_fail()
    k90 = fqcuda.cache_key("q4_k", "sm_90")
    assert k90 == fqcuda.cache_key("q4_k", 90)
    assert k90 != fqcuda.cache_key("q4_k", "sm_80")
    assert k90 != fqcuda.cache_key("q6_k", "sm_90")
    assert k90 != fqcuda.cache_key("q4_k", "sm_90", "ptx")
    assert k90 != fqcuda.cache_key("q4_k", "sm_90", variant=("FQ_ROWS=4",))
    src = tmp_path / "src"
    shutil.copytree(CUDA_DIR, src)
    monkeypatch.setattr(fqcuda, "SRC_DIR", src)
    assert fqcuda.cache_key("q4_k", "sm_90") == k90
    (src / "qmatmul.cu").write_text((src / "qmatmul.cu").read_text() + "\n// edit\n")
    k_src = fqcuda.cache_key("q4_k", "sm_90")
    assert k_src != k90
    hdr = src / "ferroquant_blocks.cuh"
    hdr.write_text(hdr.read_text() + "\n// edit\n")
    assert fqcuda.cache_key("q4_k", "sm_90") not in (k90, k_src)


def test_disk_cache_is_used(tmp_path, monkeypatch):
    _nvrtc_or_fail()
    monkeypatch.setenv("FERROQUANT_CACHE_DIR", str(tmp_path))
    first = fqcuda.compile_program("q8_0", "sm_80", "ptx")
    files = list(tmp_path.iterdir())
    key = fqcuda.cache_key("q8_0", "sm_80", "ptx")
    assert len(files) == 1 and key in files[0].name
    assert fqcuda.unpack_cached(key, files[0].read_bytes()) == first

    def no_compile(*args):
        raise AssertionError("compiled again despite a cached result")

    monkeypatch.setattr(fqcuda, "_compile", no_compile)
    assert fqcuda.compile_program("q8_0", "sm_80", "ptx") == first


def test_stale_or_foreign_cache_files_are_recompiled(tmp_path, monkeypatch):
    """A cache file is loaded only when its header names this key and the code's sha256 and
    length match: a file from an older ferroquant (no header), another key, a flipped byte or a
    torn write is compiled again and replaced."""
    _nvrtc_or_fail()
    monkeypatch.setenv("FERROQUANT_CACHE_DIR", str(tmp_path))
    key = fqcuda.cache_key("q8_0", "sm_80", "ptx")
    real = fqcuda._compile
    calls = []

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(fqcuda, "_compile", counting)
    good = fqcuda.compile_program("q8_0", "sm_80", "ptx")
    (path,) = tmp_path.iterdir()
    blob = path.read_bytes()
    flipped = bytearray(blob)
    flipped[-10] ^= 1
    other = fqcuda.pack_cached("0" * 64, good)
    for bad in (good, bytes(flipped), blob[:-5], other, b"", fqcuda.CACHE_MAGIC + b"x y"):
        path.write_bytes(bad)
        calls.clear()
        assert fqcuda.compile_program("q8_0", "sm_80", "ptx") == good
        assert len(calls) == 1, "a bad cache file was loaded instead of recompiled"
        assert fqcuda.unpack_cached(key, path.read_bytes()) == good  # and replaced
    calls.clear()
    assert fqcuda.compile_program("q8_0", "sm_80", "ptx") == good and not calls


def test_cache_key_holds_the_full_nvrtc_version(monkeypatch):
    """Two NVRTC builds of one minor version (a patch release) get different keys."""
    _nvrtc_or_fail()
    version = fqcuda.nvrtc_full_version()
    assert version.startswith(".".join(map(str, fqcuda.nvrtc_version())))
    key = fqcuda.cache_key("q4_0", "sm_90")
    monkeypatch.setattr(fqcuda, "nvrtc_full_version", lambda: version + " nvidia-cuda-nvrtc=0")
    assert fqcuda.cache_key("q4_0", "sm_90") != key


def test_compile_target_for_new_and_old_devices():
    """A device NVRTC knows gets a cubin; a newer one PTX of the newest known architecture (the
    driver JIT-compiles it); one older than sm_80 is refused (the op then falls back)."""
    known = [75, 80, 86, 89, 90, 100, 120]
    assert fqcuda.compile_target(90, known) == ("cubin", 90)
    assert fqcuda.compile_target(80, known) == ("cubin", 80)
    assert fqcuda.compile_target(130, known) == ("ptx", 120)
    assert fqcuda.compile_target(87, known) == ("ptx", 86)
    for old in (70, 75):
        with pytest.raises(fqcuda.CudaUnavailable, match="older than sm_80"):
            fqcuda.compile_target(old, known)
    with pytest.raises(fqcuda.CudaUnavailable, match="knows none"):
        fqcuda.compile_target(90, [75])
    _nvrtc_or_fail()
    assert {80, 90} <= set(fqcuda.supported_archs())


def test_arch_names():
    assert fqcuda.normalize_arch("sm_90a") == 90
    assert fqcuda.normalize_arch("compute_80") == 80
    assert fqcuda.normalize_arch((8, 6)) == 86
    with pytest.raises(ValueError):
        fqcuda.normalize_arch("hopper")


# ---- no GPU: a clear error, and the CPU path still works --------------------------------------


def _no_gpu_here():
    torch = peers_torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-GPU error cannot be observed")


def test_without_gpu_the_shim_says_what_is_missing():
    _no_gpu_here()
    assert not fqcuda.available()
    for call in (lambda: fqcuda.program("q4_k"), fqcuda.check_device):
        with pytest.raises(fqcuda.CudaUnavailable) as e:
            call()
        assert isinstance(e.value, RuntimeError)
        msg = str(e.value)
        assert "without CUDA" in msg or "no CUDA device" in msg
    assert fqcuda.diagnose().startswith("CUDA unavailable:")


def test_old_gpu_and_missing_nvrtc_are_named(monkeypatch):
    torch = peers_torch
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla T4")
    with pytest.raises(fqcuda.CudaUnavailable, match=r"Tesla T4 has compute capability 7\.5"):
        fqcuda.check_device()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setenv("FERROQUANT_CUDA_BACKEND", "nonesuch")
    with pytest.raises(fqcuda.CudaUnavailable, match="NVRTC not found"):
        fqcuda.check_device()


def test_cpu_path_still_works_without_gpu():
    torch = peers_torch
    from ferroquant.nn import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    q = QuantLinear.from_linear(lin, "q8_0")
    x = torch.randn(3, 64)
    y = q(x)
    # the CPU kernel quantizes activations to q8_0 blocks as ggml does: the exact product of the
    # quantized activations and weights, up to float32 summation order
    xq = torch.from_numpy(fq.dequantize(fq.quantize(x, "q8_0")))
    ref = xq.double() @ q.dequantized_weight().double().T + q.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_cuda_kernel_is_registered():
    torch = peers_torch
    op = torch.ops.ferroquant.qmatmul.default
    assert op.has_kernel_for_dispatch_key("CUDA")


def test_supported_shapes():
    torch = peers_torch
    xb = torch.empty(1, 64, dtype=torch.bfloat16)
    assert cuda_ops.supported(xb, "q4_k", 256, 0, "")
    assert cuda_ops.supported(xb, "nf4", 64, 64, "")
    assert not cuda_ops.supported(xb, "nf4", 48, 16, "")  # K % 32, block < 32
    assert not cuda_ops.supported(xb.float(), "q4_k", 256, 0, "")  # fp32 activations
    assert not cuda_ops.supported(xb, "q3_k", 256, 0, "")  # no kernel


# ---- the split layout of the ggml formats -----------------------------------------------------


@pytest.mark.parametrize("qtype", sorted(cuda_ops.GGML_SPLIT))
@pytest.mark.parametrize("seed", [0, 1])
def test_split_layout_is_a_reversible_permutation(qtype, seed):
    torch = peers_torch
    qk, bpb, off, qb, _ = cuda_ops.GGML_SPLIT[qtype]
    rng = np.random.default_rng(seed)
    n, nb = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    data = torch.from_numpy(rng.integers(0, 256, n * nb * bpb, dtype=np.uint8))
    split = cuda_ops.to_split(data, qtype, n, nb * qk)
    assert split.shape == data.shape and split.dtype == torch.uint8
    assert torch.equal(cuda_ops.from_split(split, qtype, n, nb * qk), data)
    blocks = data.numpy().reshape(n * nb, bpb)
    s = split.numpy()
    # the quant bytes first, block after block, then each block's other bytes in their order
    assert np.array_equal(s[: n * nb * qb].reshape(n * nb, qb), blocks[:, off : off + qb])
    meta = np.concatenate([blocks[:, :off], blocks[:, off + qb :]], axis=1)
    assert np.array_equal(s[n * nb * qb :].reshape(n * nb, bpb - qb), meta)
    assert qb % 16 == 0  # every quant run starts 16-byte aligned


def test_split_layout_of_real_blocks_puts_scales_in_meta():
    """q8_0: the split's quant bytes are the int8 values, its meta the fp16 scales."""
    torch = peers_torch
    from data import make

    w = make("normal", 4, 64, seed=3)
    qt = fq.quantize(w, "q8_0")
    split = cuda_ops.to_split(torch.from_numpy(np.array(qt.data)), "q8_0", 4, 64).numpy()
    qs = split[: 4 * 64].view(np.int8).astype(np.float32).reshape(4, 2, 32)
    d = split[4 * 64 :].view(np.float16).astype(np.float32).reshape(4, 2, 1)
    assert np.array_equal((qs * d).reshape(4, 64), fq.dequantize(qt))


# ---- the traits compiled for the host, against the formats' defining peers -------------------
#
# The format traits (decode + column map) are the part of each kernel that knows the format. They
# are compiled here with the host C++ compiler, unchanged, behind stub CUDA headers, and run in
# the loop qdequant runs on the GPU (every lane step of every block of every row); the result must
# equal the peer's dequantization bit for bit, and every element must be written (NaN-poisoned).

EMU = r"""
// Just enough of CUDA's built-ins for the host build of the traits.
#pragma once
#include <algorithm>
#include <cstring>
#include <math.h>
#define __device__
#define __host__
#define __forceinline__ inline
#define __global__
#define __shared__ static
#define __constant__
#define __launch_bounds__(x)
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
struct float2 { float x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx, blockDim;
inline void __syncthreads() {}
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
using std::min;
inline uint4 __ldcs(const uint4* p) { uint4 v; std::memcpy(&v, p, 16); return v; }
inline uint4 __ldg(const uint4* p) { uint4 v; std::memcpy(&v, p, 16); return v; }
inline uint2 __ldg(const uint2* p) { uint2 v; std::memcpy(&v, p, 8); return v; }
inline unsigned char __ldg(const unsigned char* p) { return *p; }
inline signed char __ldg(const signed char* p) { return *p; }
inline unsigned short __ldg(const unsigned short* p) {
    unsigned short v; std::memcpy(&v, p, 2); return v;
}
inline float __ldg(const float* p) { return *p; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
"""

HARNESS = r"""
#include "qmatmul.cu"
using namespace fq;
template <class F>
static void init_shared(typename F::Shared& sh) {
    blockDim.x = 32;
    for (unsigned t = 0; t < 32; ++t) { threadIdx.x = t; sh.init(); }
}
// qdequant on the host: every lane step of every block of every row.
template <class F>
static void run(const u8* qbits, const u8* meta, float* out, int N, int K, long long srs,
                int sshift) {
    typename F::Shared sh;
    init_shared<F>(sh);
    const Ctx c = {qbits, meta, K, K / F::QK, srs, sshift};
    for (i64 row = 0; row < N; ++row)
        for (int s = 0; s < c.nb * F::SPB; ++s) {
            const int b = s / F::SPB, st = s % F::SPB;
            float w[F::NRUNS][F::RUN];
            decode<F>(c, sh, row, b, st, w);
            for (int r = 0; r < F::NRUNS; ++r)
                for (int i = 0; i < F::RUN; ++i)
                    out[row * K + b * F::QK + F::col(st, r) + i] = w[r][i];
        }
}
// The traits' decoded pieces per element: value v, the run's scale a and min m (for the numpy
// emulation of qgemv), and the traits' facts.
template <class F>
static void pieces(const u8* qbits, const u8* meta, float* v, float* a, float* m, int N, int K,
                   long long srs, int sshift) {
    typename F::Shared sh;
    init_shared<F>(sh);
    const Ctx c = {qbits, meta, K, K / F::QK, srs, sshift};
    for (i64 row = 0; row < N; ++row)
        for (int s = 0; s < c.nb * F::SPB; ++s) {
            const int b = s / F::SPB, st = s % F::SPB;
            typename F::Raw raw;
            F::fetch(c, row, b, st, raw);
            float vv[F::NRUNS][F::RUN], aa[F::NRUNS], mm[F::NRUNS];
            F::values(raw, sh, st, vv, aa, mm);
            for (int r = 0; r < F::NRUNS; ++r)
                for (int i = 0; i < F::RUN; ++i) {
                    const i64 o = row * K + b * F::QK + F::col(st, r) + i;
                    v[o] = vv[r][i], a[o] = aa[r], m[o] = mm[r];
                }
        }
}
template <class F>
static void facts(int* out) {  // QK, SPB, NRUNS, RUN, HAS_MIN, FQ_ROWS, FQ_UNROLL, col(st, r)...
    int i = 0;
    out[i++] = F::QK, out[i++] = F::SPB, out[i++] = F::NRUNS, out[i++] = F::RUN;
    out[i++] = F::HAS_MIN, out[i++] = FQ_ROWS, out[i++] = FQ_UNROLL;
    for (int st = 0; st < F::SPB; ++st)
        for (int r = 0; r < F::NRUNS; ++r) out[i++] = F::col(st, r);
}
// qgemv on the host: each lane's partial sums (qgemv_lane, as on the GPU), the warp's butterfly
// of warp_sum (lane l adds lane l ^ o, o = 16, 8, 4, 2, 1), then the K parts added in order.
template <class F, int MT>
static void gemv(const u8* qbits, const u8* meta, const bf16_t* x, float* y, int M, int N,
                 int K, long long srs, int sshift, int ksplit) {
    typename F::Shared sh;
    init_shared<F>(sh);
    const Ctx c = {qbits, meta, K, K / F::QK, srs, sshift};
    static float lanes[32][FQ_ROWS][MT];
    for (int n0 = 0; n0 < N; n0 += FQ_ROWS) {
        float parts[4][FQ_ROWS][MT];
        for (int part = 0; part < ksplit; ++part) {
            for (int lane = 0; lane < 32; ++lane) {
                threadIdx.x = lane;
                qgemv_lane<F, bf16_t, MT>(c, sh, x, M, N, n0, lane, part, ksplit, lanes[lane]);
            }
            for (int r = 0; r < FQ_ROWS; ++r)
                for (int m = 0; m < MT; ++m) {
                    float v[32], t[32];
                    for (int l = 0; l < 32; ++l) v[l] = lanes[l][r][m];
                    for (int o = 16; o > 0; o >>= 1) {
                        for (int l = 0; l < 32; ++l) t[l] = v[l] + v[l ^ o];
                        for (int l = 0; l < 32; ++l) v[l] = t[l];
                    }
                    parts[part][r][m] = v[0];
                }
        }
        for (int r = 0; r < FQ_ROWS; ++r)
            for (int m = 0; m < M; ++m) {
                float t = parts[0][r][m];
                for (int p = 1; p < ksplit; ++p) t = t + parts[p][r][m];
                if (n0 + r < N) y[i64(m) * N + n0 + r] = t;
            }
    }
}
// bf16 rounding (nearest even) for the fragments' weights; the GPU uses cvt.rn.bf16x2.f32.
static u32 bf16_rne(float f) {
    u32 u; std::memcpy(&u, &f, 4);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
u32 fq::f32x2_to_bf16x2(float lo, float hi) { return bf16_rne(lo) | (bf16_rne(hi) << 16); }
// One element of mma.sync.m16n8k16's A (16 x 16, row-major) or B (16 x 8, column-major) from the
// lanes' fragments, by the PTX ISA's layout: A element (m, k) is in lane 4 (m % 8) + (k % 8) / 2,
// register (m / 8) + 2 (k / 8), half k % 2; B element (k, n) in lane 4 n + (k % 8) / 2, register
// k / 8, half k % 2.
static float half_of(u32 reg, int h) { return bf16_to_f32(h ? reg >> 16 : reg & 0xffffu); }
// qmma on the host: each warp iteration builds every lane's fragments with qmma_fragments (as on
// the GPU), then forms the product the mma instruction computes, lane by lane.
template <class F>
static void mma_host(const u8* qbits, const u8* meta, const bf16_t* x, float* y, int M, int N,
                     int K, long long srs, int sshift, int per) {
    constexpr int NT = FQ_MMA_NT, J = MmaShape<F>::J;
    typename F::Shared sh;
    init_shared<F>(sh);
    const Ctx c = {qbits, meta, K, K / F::QK, srs, sshift};
    const int steps = c.nb * F::SPB;
    for (int i = 0; i < M * N; ++i) y[i] = 0.0f;
    static u32 a[32][J][4], b[32][NT][J][2];
    for (int s_begin = 0; s_begin < steps; s_begin += per) {  // K slices, in order
        const int s_end = std::min(steps, s_begin + per);
        for (int n0 = 0; n0 < N; n0 += 8 * NT) {
            float acc[32][NT][4] = {};
            for (int s0 = s_begin; s0 < s_end; s0 += 4) {
                for (int lane = 0; lane < 32; ++lane) {
                    const int s = s0 + (lane & 3);
                    qmma_fragments<F, bf16_t, NT>(c, sh, x, M, N, n0, s, s < s_end, lane,
                                                  a[lane], b[lane]);
                }
                for (int j = 0; j < J; ++j)
                    for (int i = 0; i < NT; ++i)
                        for (int lane = 0; lane < 32; ++lane)
                            for (int e = 0; e < 4; ++e) {
                                const int m = (lane >> 2) + 8 * (e >> 1);
                                const int n = 2 * (lane & 3) + (e & 1);
                                float sum = 0.0f;
                                for (int k = 0; k < 16; ++k) {
                                    const int la = 4 * (m % 8) + (k % 8) / 2;
                                    const int lb = 4 * n + (k % 8) / 2;
                                    sum += half_of(a[la][j][m / 8 + 2 * (k / 8)], k % 2) *
                                           half_of(b[lb][i][j][k / 8], k % 2);
                                }
                                acc[lane][i][e] += sum;
                            }
            }
            for (int lane = 0; lane < 32; ++lane)
                for (int i = 0; i < NT; ++i)
                    for (int e = 0; e < 4; ++e) {
                        const int m = (lane >> 2) + 8 * (e >> 1);
                        const int n = n0 + 8 * i + 2 * (lane & 3) + (e & 1);
                        if (m < M && n < N) y[i64(m) * N + n] += acc[lane][i][e];
                    }
        }
    }
}
#define FQ_HOST(FMT) extern "C" void mma_##FMT(const u8* q, const u8* m, const bf16_t* x, \
    float* y, int M, int n, int k, long long srs, int ssh, int per) { \
        mma_host<Fmt_##FMT>(q, m, x, y, M, n, k, srs, ssh, per); } \
    extern "C" void dequant_##FMT(const u8* q, const u8* m, float* o, int n, \
    int k, long long srs, int ssh) { run<Fmt_##FMT>(q, m, o, n, k, srs, ssh); } \
    extern "C" void pieces_##FMT(const u8* q, const u8* m, float* v, float* a, float* mn, \
    int n, int k, long long srs, int ssh) { pieces<Fmt_##FMT>(q, m, v, a, mn, n, k, srs, ssh); } \
    extern "C" void facts_##FMT(int* out) { facts<Fmt_##FMT>(out); } \
    extern "C" void gemv_##FMT(const u8* q, const u8* m, const bf16_t* x, float* y, \
    int M, int n, int k, long long srs, int ssh, int ks, int mt) { \
        switch (mt) { \
        case 1: gemv<Fmt_##FMT, 1>(q, m, x, y, M, n, k, srs, ssh, ks); break; \
        case 2: gemv<Fmt_##FMT, 2>(q, m, x, y, M, n, k, srs, ssh, ks); break; \
        case 4: gemv<Fmt_##FMT, 4>(q, m, x, y, M, n, k, srs, ssh, ks); break; \
        case 8: gemv<Fmt_##FMT, 8>(q, m, x, y, M, n, k, srs, ssh, ks); break; \
        default: gemv<Fmt_##FMT, 16>(q, m, x, y, M, n, k, srs, ssh, ks); break; } }
FQ_HOST(nf4) FQ_HOST(int8) FQ_HOST(q4_0) FQ_HOST(q8_0) FQ_HOST(q4_K) FQ_HOST(q5_K) FQ_HOST(q6_K)
"""


@pytest.fixture(scope="module")
def host_traits(tmp_path_factory):
    import ctypes
    import subprocess

    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        if peers.REQUIRE_PEERS:
            pytest.fail("no C++ compiler to build the host copy of the CUDA traits")
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("host_traits")
    (d / "emu.h").write_text(EMU)
    (d / "harness.cpp").write_text(HARNESS)
    lib = d / "libtraits.so"
    cmd = [cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
           "-include", str(d / "emu.h"), f"-I{CUDA_DIR}", "-DFQ_NO_INSTANTIATIONS",
           str(d / "harness.cpp"), "-o", str(lib)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        pytest.fail(f"host build of the CUDA traits failed:\n{res.stderr}")
    return ctypes.CDLL(str(lib))


def _first_diff(got, want):
    i = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))[0]
    return f"element {np.unravel_index(i, got.shape)}: got {got.flat[i]!r}, want {want.flat[i]!r}"


def _stat(qtype, n, k, group):
    """The kernels' (srs, sshift) for statistics shared by `group` consecutive elements."""
    if qtype == "int8":
        mode = "row" if group == k else "tensor" if group == n * k else "block"
        return cuda_ops.stat_index("int8", n, k, group, mode)
    return cuda_ops.stat_index(qtype, n, k, group, "")


def _host_dequant(lib, qtype, qbits, meta, n, k, group=0):
    import ctypes

    out = np.full((n, k), np.nan, dtype=np.float32)
    qbits = np.ascontiguousarray(qbits, dtype=np.uint8)
    meta = np.ascontiguousarray(meta).view(np.uint8)
    fn = getattr(lib, "dequant_" + fqcuda.FORMATS[qtype])
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                           ctypes.c_int]  # fmt: skip
    fn(qbits.ctypes.data, meta.ctypes.data, out.ctypes.data, n, k, *_stat(qtype, n, k, group))
    return out


# (offset of each ggml_half field) for valid random blocks
HALF_FIELDS = {"q4_0": [0], "q8_0": [0], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}


@pytest.mark.parametrize("qtype", sorted(HALF_FIELDS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_host_traits_equal_gguf_dequantize(host_traits, qtype, seed):
    torch = peers_torch
    gguf = peers.require("gguf")
    quants = peers.require("gguf.quants")

    qk, bpb, *_ = cuda_ops.GGML_SPLIT[qtype]
    rng = np.random.default_rng(seed)
    n, nb = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    k = nb * qk
    blocks = rng.integers(0, 256, (n * nb, bpb), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        h = (rng.standard_normal(n * nb) * 2.0 ** rng.integers(-12, 3, n * nb)).astype(np.float16)
        h[::7] = 0.0  # zero scales too
        blocks[:, off : off + 2] = h.view(np.uint8).reshape(-1, 2)
    data = blocks.reshape(-1)
    gtype = getattr(gguf.GGMLQuantizationType, qtype.upper())
    want = quants.dequantize(data.reshape(n, nb * bpb), gtype).astype(np.float32)
    split = cuda_ops.to_split(torch.from_numpy(data), qtype, n, k).numpy()
    nq = n * nb * cuda_ops.GGML_SPLIT[qtype][3]
    got = _host_dequant(host_traits, qtype, split[:nq], split[nq:], n, k)
    assert not np.isnan(got).any(), "an element was never written"
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), _first_diff(got, want)


@pytest.mark.parametrize("block_size", [32, 64, 256])
@pytest.mark.parametrize("seed", [0, 1])
def test_host_traits_nf4_equal_bitsandbytes_code(host_traits, block_size, seed):
    bnbf = peers.require("bitsandbytes.functional")
    code = bnbf.get_4bit_type("nf4", device="cpu").numpy().astype(np.float32)
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 6)), 32 * int(rng.integers(1, 6))  # blocks may straddle rows
    packed = rng.integers(0, 256, n * k // 2, dtype=np.uint8)
    absmax = rng.random(-(-n * k // block_size), dtype=np.float32) * 3
    q = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)  # element 2j: high nibble
    want = (code[q] * absmax[np.arange(n * k) // block_size]).reshape(n, k)
    got = _host_dequant(host_traits, "nf4", packed, absmax, n, k, block_size)
    assert not np.isnan(got).any()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("mode", ["row", "tensor", "block"])
def test_host_traits_int8(host_traits, mode):
    rng = np.random.default_rng(5)
    n, k = 5, 192
    q = rng.integers(-128, 128, (n, k), dtype=np.int8)
    group = {"row": k, "tensor": n * k, "block": 64}[mode]
    scales = rng.random(n * k // group, dtype=np.float32) / 100
    want = (q.astype(np.float32).reshape(-1) * scales[np.arange(n * k) // group]).reshape(n, k)
    got = _host_dequant(host_traits, "int8", q.view(np.uint8), scales, n, k, group)
    assert not np.isnan(got).any()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # the kernels' index (row * srs + col) >> sshift is the element's group, without a division
    srs, sshift = cuda_ops.stat_index("int8", n, k, 64, mode)
    rows, cols = np.divmod(np.arange(n * k, dtype=np.int64), k)
    assert np.array_equal((rows * srs + cols) >> sshift, np.arange(n * k) // group)


def _random_weights(qtype, n, k, seed):
    """(qbits, meta, group, W float32) of random valid weights in the kernels' layout; W from the
    host traits (equal to the peers by the tests above)."""
    torch = peers_torch
    rng = np.random.default_rng(seed)
    if qtype == "nf4":
        qbits = rng.integers(0, 256, n * k // 2, dtype=np.uint8)
        meta, group = rng.random(-(-n * k // 64), dtype=np.float32), 64
    elif qtype == "int8":
        qbits = rng.integers(0, 256, n * k, dtype=np.uint8)
        meta, group = rng.random(n, dtype=np.float32) / 64, k
    else:
        qk, bpb, _, qb, _ = cuda_ops.GGML_SPLIT[qtype]
        blocks = rng.integers(0, 256, (n * k // qk, bpb), dtype=np.uint8)
        for off in HALF_FIELDS[qtype]:
            h = (rng.standard_normal(len(blocks)) * 0.01).astype(np.float16)
            blocks[:, off : off + 2] = h.view(np.uint8).reshape(-1, 2)
        split = cuda_ops.to_split(torch.from_numpy(blocks.reshape(-1)), qtype, n, k).numpy()
        nq = n * k // qk * qb
        qbits, meta, group = split[:nq], split[nq:], 0
    return qbits, meta, group


def _fma32(a, b, c):
    """fmaf(a, b, c) elementwise for float32 arrays: the exact a * b + c rounded once to float32.
    a * b is exact in float64; the float64 sum's error e (TwoSum) is exact too, and only decides
    the float32 rounding when that sum lies exactly halfway between two float32 numbers."""
    a64, b64, c64 = (np.asarray(t, np.float32).astype(np.float64) for t in (a, b, c))
    p = a64 * b64
    s = p + c64
    bb = s - p
    e = (p - (s - bb)) + (c64 - bb)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    other = np.where(
        r64 < s, np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf))
    )
    tie = (s == (r64 + other.astype(np.float64)) / 2) & (e != 0)
    up = np.maximum(r, other)
    down = np.minimum(r, other)
    return np.where(tie, np.where(e > 0, up, down), r).astype(np.float32)


def test_fma32_emulation_rounds_once():
    """The emulation's fmaf against exact rational arithmetic, ties included."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    a = rng.standard_normal(2000).astype(np.float32)
    b = rng.standard_normal(2000).astype(np.float32)
    c = (rng.standard_normal(2000) * 4).astype(np.float32)
    # ties: a * b = 2^-25 exactly halfway past c = 1 (and a little more or less by way of c)
    a[:3], b[:3], c[:3] = 2.0**-13, 2.0**-12, np.float32(1.0)
    a[3], b[3], c[3] = 3 * 2.0**-13, 2.0**-12, np.float32(1.0)
    got = _fma32(a, b, c)
    for i in range(len(a)):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        lo = np.float32(float(exact))  # float() rounds to nearest double; fix below
        cands = [lo, np.nextafter(lo, np.float32(-np.inf)), np.nextafter(lo, np.float32(np.inf))]
        best = min(cands, key=lambda f: (abs(Fraction(float(f)) - exact),
                                         int(np.float32(f).view(np.uint32)) & 1))  # fmt: skip
        assert got[i] == best, (i, a[i], b[i], c[i], got[i], best)


def _emulate_gemv(v, a, mn, x, facts, ksplit):
    """qgemv's arithmetic, operation by operation, in numpy float32: per row, token and lane the
    lane steps in order, per run p = fma chain of v * x, acc = fma(a, p, acc) (and with a min
    acc = fma(-m, sx, acc), sx the float32 sum of the run's x); the warp butterfly; the K parts
    added in order. v, a, mn: [N, K] per element; x: [M, K] float32."""
    qk, spb, nruns, run, has_min = facts[:5]
    cols = np.array(facts[7 : 7 + spb * nruns]).reshape(spb, nruns)
    n, k = v.shape
    m = x.shape[0]
    steps = k // qk * spb
    f32 = np.float32
    total = None
    for part in range(ksplit):
        lanes = np.zeros((32, n, m), f32)
        for lane in range(32):
            acc = np.zeros((n, m), f32)
            for s in range(part * 32 + lane, steps, 32 * ksplit):
                b, st = divmod(s, spb)
                for r in range(nruns):
                    c0 = b * qk + cols[st, r]
                    p = np.zeros((n, m), f32)
                    sx = np.zeros((1, m), f32)
                    for i in range(run):
                        xc = x[None, :, c0 + i]
                        if has_min:
                            sx = (sx + xc).astype(f32)
                        p = _fma32(v[:, c0 + i, None], xc, p)
                    acc = _fma32(a[:, c0, None], p, acc)
                    if has_min:
                        acc = _fma32(-mn[:, c0, None], sx, acc)
            lanes[lane] = acc
        for o in (16, 8, 4, 2, 1):
            lanes = (lanes + lanes[np.arange(32) ^ o]).astype(f32)
        total = lanes[0] if total is None else (total + lanes[0]).astype(f32)
    return total.T


def _host_pieces(lib, qtype, qbits, meta, n, k, group):
    import ctypes

    fmt = fqcuda.FORMATS[qtype]
    v, a, mn = (np.full((n, k), np.nan, dtype=np.float32) for _ in range(3))
    fn = getattr(lib, "pieces_" + fmt)
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 2 + [ctypes.c_longlong, ctypes.c_int]
    meta8 = np.ascontiguousarray(meta).view(np.uint8)
    fn(qbits.ctypes.data, meta8.ctypes.data, v.ctypes.data, a.ctypes.data, mn.ctypes.data, n, k,
       *_stat(qtype, n, k, group))  # fmt: skip
    facts = (ctypes.c_int * 64)()
    getattr(lib, "facts_" + fmt)(facts)
    return v, a, mn, list(facts)


@pytest.mark.parametrize("qtype", sorted(fqcuda.FORMATS))
def test_host_gemv_equals_its_emulation_bit_for_bit(host_traits, qtype):
    """The GEMV kernel compiled for the host (qgemv_lane over 32 lanes, the warp butterfly, the
    K parts of a CTA) gives exactly the bits of the numpy emulation of its arithmetic order, for
    M up to 16, N odd and every K split; the emulation's pieces (value, scale, min of each
    weight) give the reference dequantization bit for bit (a * v - m, rounded as ggml does); and
    the result is x @ W.T within the float32 bound of that order."""
    import ctypes

    torch = peers_torch
    qk = cuda_ops.GGML_SPLIT.get(qtype, (32,))[0]
    n, k = 5, 8 * max(qk, 128)
    qbits, meta, group = _random_weights(qtype, n, k, seed=11)
    w = _host_dequant(host_traits, qtype, qbits, meta, n, k, group)
    v, a, mn, facts = _host_pieces(host_traits, qtype, qbits, meta, n, k, group)
    has_min = facts[4]
    w_pieces = (a * v - mn) if has_min else a * v
    assert np.array_equal(w_pieces.view(np.uint32), w.view(np.uint32)), _first_diff(w_pieces, w)
    fn = getattr(host_traits, "gemv_" + fqcuda.FORMATS[qtype])
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_longlong] + [
        ctypes.c_int] * 3  # fmt: skip
    meta8 = np.ascontiguousarray(meta).view(np.uint8)
    w64 = w.astype(np.float64)
    for m, ksplit in ((1, 1), (1, 4), (3, 2), (16, 1), (13, 4)):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        xb = x.view(torch.int16).numpy()
        x32 = x.float().numpy()
        mt = next(t for t in fqcuda.GEMV_M if t >= m)
        y = np.full((m, n), np.nan, dtype=np.float32)
        fn(qbits.ctypes.data, meta8.ctypes.data, xb.ctypes.data, y.ctypes.data, m, n, k,
           *_stat(qtype, n, k, group), ksplit, mt)  # fmt: skip
        want = _emulate_gemv(v, a, mn, x32, facts, ksplit)
        same = np.array_equal(y.view(np.uint32), want.view(np.uint32))
        assert same, (m, ksplit, _first_diff(y, want))
        x64 = x32.astype(np.float64)
        ref = x64 @ w64.T
        mag = np.abs(x64) @ (np.abs(a * v).astype(np.float64) + np.abs(mn)).T
        tol = (facts[3] + k / 32 + 8) * 2.0**-24 * mag
        assert np.all(np.abs(y - ref) <= tol), (m, ksplit, np.max(np.abs(y - ref) - tol))


@pytest.mark.parametrize("qtype", sorted(fqcuda.FORMATS))
def test_host_mma_fragments_give_the_product(host_traits, qtype):
    """qmma_fragments (the tensor-core kernel's per-lane loads and decode) over a warp, multiplied
    as mma.sync.m16n8k16 lays its fragments out: x @ bf16(W).T within the fp32 bound
    (K + 6) * 2^-24 * sum|x w|, for M up to 16, N not a multiple of the warp's rows, one and
    several K slices."""
    import ctypes

    torch = peers_torch
    qk = cuda_ops.GGML_SPLIT.get(qtype, (32,))[0]
    spb = _spb(qtype)
    n, k = 21, 6 * max(qk, 64)
    qbits, meta, group = _random_weights(qtype, n, k, seed=13)
    w = _host_dequant(host_traits, qtype, qbits, meta, n, k, group)
    w16 = torch.from_numpy(w).to(torch.bfloat16).double().numpy()
    fn = getattr(host_traits, "mma_" + fqcuda.FORMATS[qtype])
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_longlong] + [
        ctypes.c_int] * 2  # fmt: skip
    meta8 = np.ascontiguousarray(meta).view(np.uint8)
    steps = (k // qk) * spb
    for m in (2, 5, 8, 9, 16):
        for per in sorted({steps + (-steps) % 4, 8}):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            xb = x.view(torch.int16).numpy()
            x64 = x.double().numpy()
            y = np.full((m, n), np.nan, dtype=np.float32)
            fn(qbits.ctypes.data, meta8.ctypes.data, xb.ctypes.data, y.ctypes.data, m, n, k,
               *_stat(qtype, n, k, group), per)  # fmt: skip
            ref = x64 @ w16.T
            tol = (k + 6) * 2.0**-24 * (np.abs(x64) @ np.abs(w16).T)
            assert not np.isnan(y).any()
            assert np.all(np.abs(y - ref) <= tol), (m, per, np.max(np.abs(y - ref) - tol))


def test_kernel_formats_come_from_the_qtype_table():
    """The shim's format list matches the kernel source's programs, and every block fact it uses
    (weights and bytes per block, where the quant bytes sit) is the Rust core's."""
    in_source = set(re.findall(r"FQ_ONLY_([A-Za-z0-9_]+)", (CUDA_DIR / "qmatmul.cu").read_text()))
    assert in_source == set(fqcuda.FORMATS.values())
    assert set(cuda_ops.GGML_SPLIT) | set(cuda_ops.FLAT) == set(fqcuda.FORMATS)
    assert not set(cuda_ops.GGML_SPLIT) & set(cuda_ops.FLAT)
    assert set(fqcuda.FORMATS) <= {q.name for q in fq.qtypes()}
    spans = {name: (offset, length) for name, offset, length in _native.block_quant_spans()}
    for qtype, (qk, bpb, off, qb, _lane_steps) in cuda_ops.GGML_SPLIT.items():
        info = fq.qtype_info(qtype)
        assert (qk, bpb) == (info.block_size, info.type_size)
        assert (off, qb) == spans[qtype] and off + qb <= bpb


def test_mma_split_covers_k():
    """The split-K plan: slices of whole warp steps that cover every lane step exactly once."""
    for n, k, qk, spb in ((4096, 14336, 32, 1), (14336, 4096, 256, 8), (37, 96, 32, 2),
                          (11008, 4096, 32, 2)):  # fmt: skip
        per, splits = cuda_ops.mma_split(n, k, qk, spb, fqcuda.MMA_NT, sms=132)
        steps = k // qk * spb
        assert per % 4 == 0 and per * splits >= steps > per * (splits - 1)
        assert splits == 1 or per >= 8
