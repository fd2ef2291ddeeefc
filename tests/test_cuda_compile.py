"""The CUDA groundwork that runs without a GPU: NVRTC compiles every kernel instantiation to PTX
for sm_80 and sm_90 (which also checks the header's static_asserts), the header's block sizes
equal the Rust core's, the shim's errors without a GPU, the disk-cache key, and the reversible
split layout of the ggml formats. Correctness and speed on a GPU: benches/gpu_qmatmul.py."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

import ferroquant as fq
from ferroquant import _native

peers_torch = pytest.importorskip("torch")

from ferroquant import cuda as fqcuda  # noqa: E402
from ferroquant import cuda_ops  # noqa: E402

import peers  # noqa: E402

HEADER = fqcuda.SRC_DIR / "ferroquant_blocks.cuh"


def _nvrtc_or_fail():
    peers.require("cuda.bindings.nvrtc")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_to_ptx(arch):
    _nvrtc_or_fail()
    ptx = fqcuda.compile_all_ptx(arch)
    assert set(ptx) == set(fqcuda.FORMATS)
    target = f".target sm_{arch[3:]}"
    for qtype, code in ptx.items():
        text = code.decode(errors="replace")
        assert target in text, (qtype, arch)
        entries = set(re.findall(r"\.entry\s+(\w+)", text))
        assert entries == set(fqcuda.kernel_names(qtype)), (qtype, entries)


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
    shutil.copytree(fqcuda.SRC_DIR, src)
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
    src = tmp_path / "src"
    shutil.copytree(fqcuda.SRC_DIR, src)
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
    assert len(files) == 1 and files[0].read_bytes() == first
    assert fqcuda.cache_key("q8_0", "sm_80", "ptx") in files[0].name

    def no_compile(*args):
        raise AssertionError("compiled again despite a cached result")

    monkeypatch.setattr(fqcuda, "_compile", no_compile)
    assert fqcuda.compile_program("q8_0", "sm_80", "ptx") == first


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
    ref = x @ q.dequantized_weight().T + q.bias
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


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
