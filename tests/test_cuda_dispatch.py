"""The CUDA op's Python side, without a GPU: validation of every bad argument before a launch
(meta tensors and stand-ins with a CUDA device), the fallback decoders against the Rust
reference, the dispatch between kernels and fallback (fakes for the kernels and the device),
and QuantLinear's one GPU copy of a ggml weight (the split layout, on meta/CPU)."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest

import ferroquant as fq

torch = pytest.importorskip("torch")

from ferroquant.cuda import checks, fallback  # noqa: E402
from ferroquant.cuda import nvrtc as fqcuda  # noqa: E402
from ferroquant.cuda import qmatmul as cuda_ops  # noqa: E402
from ferroquant.nn import QuantLinear  # noqa: E402
from ferroquant.nn import linear as linear_mod  # noqa: E402

QuantizeError = fq.QuantizeError
CUDA0 = torch.device("cuda", 0)


def fake(shape, dtype, device=CUDA0, contiguous=True):
    """A stand-in for a CUDA tensor: the attributes validation reads, no storage."""
    numel = int(np.prod(shape)) if shape else 1
    return types.SimpleNamespace(
        shape=tuple(shape), dtype=dtype, device=device, numel=lambda: numel,
        is_contiguous=lambda: contiguous, data_ptr=lambda: 0,
    )  # fmt: skip


def _good(qtype, n=8, k=256, block_size=64, mode=""):
    nbytes, nstats = checks.expected_sizes(qtype, n, k, block_size, mode)
    return (fake((3, k), torch.bfloat16), fake((nbytes,), torch.uint8),
            fake((nstats,), torch.float32), qtype, n, k, block_size, mode)  # fmt: skip


# ---- sizes: the same facts as ferroquant.quantize ----------------------------------------------


@pytest.mark.parametrize("qtype", [q.name for q in fq.qtypes()])
def test_expected_sizes_match_quantize(qtype):
    rng = np.random.default_rng(0)
    modes = ["row", "tensor", "block"] if qtype in ("int8", "fp8_e4m3", "fp8_e5m2") else [None]
    for mode in modes:
        opts = {} if mode is None else {"scale_mode": mode}
        if mode == "block":
            opts["block_size"] = 64
        w = rng.standard_normal((3, 512)).astype(np.float32)
        qt = fq.quantize(w, qtype, **opts)
        got = checks.expected_sizes(qtype, 3, 512, qt.block_size, qt.scale_mode or "")
        nstats = 0 if qt.stats is None else np.asarray(qt.stats).size
        assert got == (np.asarray(qt.data).size, nstats), (qtype, mode)


# ---- validation: every bad case named ---------------------------------------------------------


def test_valid_arguments_pass():
    for qtype, bs, mode in (("q4_k", 256, ""), ("nf4", 64, ""), ("int8", 64, "block"),
                            ("int8", 256, "row"), ("q3_k", 256, "")):  # fmt: skip
        checks.validate(*_good(qtype, block_size=bs, mode=mode))
    # the split layout has the same byte count
    x, data, stats, _, n, k, bs, mode = _good("q4_k", block_size=256)
    checks.validate(x, data, stats, "q4_k+split", n, k, bs, mode)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(qtype="q9_9"), "unknown qtype"),
        (lambda a: a.update(x=fake((3, 255), torch.bfloat16)), "last dimension"),
        (lambda a: a.update(x=fake((), torch.bfloat16)), "last dimension"),
        (lambda a: a.update(x=fake((3, 256), torch.int32)), "floating-point"),
        (lambda a: a.update(data=fake((999,), torch.uint8)), "has 999 bytes"),
        (lambda a: a.update(data=fake((a["data"].numel(),), torch.int8)), "uint8"),
        (lambda a: a.update(stats=fake((5,), torch.float32)), "has 5 statistics"),
        (lambda a: a.update(stats=fake((a["stats"].numel(),), torch.int32)), "floating point"),
        (lambda a: a.update(block_size=48), "multiple of the block size"),
        (lambda a: a.update(block_size=0), "block_size must be positive"),
        (lambda a: a.update(n=0), "must be positive"),
        (lambda a: a.update(x=fake((3, 256), torch.bfloat16, torch.device("cpu"))),
         "expected a cuda"),
        (lambda a: a.update(data=fake((a["data"].numel(),), torch.uint8, torch.device("cuda", 1))),
         "weight data is on cuda:1"),
        (lambda a: a.update(stats=fake((a["stats"].numel(),), torch.float32, torch.device("cpu"))),
         "statistics is on cpu"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(change, match):
    x, data, stats, qtype, n, k, bs, mode = _good("nf4")
    args = dict(x=x, data=data, stats=stats, qtype=qtype, n=n, k=k, block_size=bs, scale_mode=mode)
    change(args)
    with pytest.raises(QuantizeError, match=match):
        checks.validate(**args)


def test_bad_int8_and_ggml_arguments():
    x, data, stats, _, n, k, _, _ = _good("int8", mode="row")
    with pytest.raises(QuantizeError, match="scale_mode must be"):
        checks.validate(x, data, stats, "int8", n, k, 64, "column")
    x, data, stats, _, n, k, bs, mode = _good("q4_k", k=512, block_size=256)
    with pytest.raises(QuantizeError, match="multiple of its block size 256"):
        checks.validate(fake((1, 500), torch.bfloat16), data, stats, "q4_k", n, 500, bs, mode)
    with pytest.raises(QuantizeError, match="has 10 bytes"):
        checks.validate(x, fake((10,), torch.uint8), stats, "q4_k+split", n, k, bs, mode)


def test_meta_tensors_validate_like_real_ones():
    """Real tensors on the meta device, validated for a meta device (the op's own check runs
    with device_type='cuda')."""
    n, k = 16, 256
    data = torch.empty(n * k // 2, dtype=torch.uint8, device="meta")
    stats = torch.empty(n * k // 64, dtype=torch.float32, device="meta")
    x = torch.empty(2, k, dtype=torch.float16, device="meta")
    checks.validate(x, data, stats, "nf4", n, k, 64, "", device_type="meta")
    with pytest.raises(QuantizeError, match="expected a cuda"):
        checks.validate(x, data, stats, "nf4", n, k, 64, "")
    with pytest.raises(QuantizeError, match="statistics"):
        checks.validate(x, data, stats[:-1], "nf4", n, k, 64, "", device_type="meta")


def test_the_public_entry_points_validate_first(monkeypatch):
    """qmatmul_cuda, dequantize and the op's CUDA kernel reject bad arguments before touching a
    program (none can load here)."""

    def no_program(*a, **k):
        raise AssertionError("a program was loaded for invalid arguments")

    monkeypatch.setattr(cuda_ops._cuda, "program", no_program)
    x = torch.empty(2, 256, dtype=torch.bfloat16, device="meta")
    data = torch.empty(10, dtype=torch.uint8, device="meta")
    stats = torch.empty(0, device="meta")
    for call in (
        lambda: cuda_ops.qmatmul_cuda(x, data, stats, "q4_k", 4, 256, 256, ""),
        lambda: cuda_ops.cuda_op(x, data, stats, "q4_k", 4, 256, 256, ""),
        lambda: cuda_ops.dequantize(data, stats, "q4_k", 4, 256, 256, ""),
    ):
        with pytest.raises(QuantizeError):
            call()


def test_out_is_checked():
    out = torch.empty(3, 5, dtype=torch.bfloat16)
    checks.validate_out(out, 3, 5, torch.bfloat16, out.device)
    for bad in (torch.empty(3, 6, dtype=torch.bfloat16), torch.empty(3, 5),
                torch.empty(5, 3, dtype=torch.bfloat16).t()):  # fmt: skip
        with pytest.raises(QuantizeError, match="out must be"):
            checks.validate_out(bad, 3, 5, torch.bfloat16, out.device)


# ---- the fallback: decoders bit-exact with the reference, dispatch with fakes -----------------


@pytest.mark.parametrize("qtype", [q.name for q in fq.qtypes()])
def test_fallback_dequantize_equals_reference(qtype):
    rng = np.random.default_rng(3)
    modes = ["row", "tensor", "block"] if qtype in ("int8", "fp8_e4m3", "fp8_e5m2") else [None]
    for mode in modes:
        opts = {} if mode is None else {"scale_mode": mode}
        if mode == "block":
            opts["block_size"] = 128
        w = (rng.standard_normal((5, 512)) * 0.2).astype(np.float32)
        w[0, :7] = 0.0
        qt = fq.quantize(w, qtype, **opts)
        want = fq.dequantize(qt)
        data = torch.from_numpy(np.array(qt.data).reshape(-1))
        stats = torch.from_numpy(np.asarray(qt.stats, dtype=np.float32).reshape(-1))
        got = fallback.dequantize(data, stats, qtype, 5, 512, qt.block_size, qt.scale_mode or "")
        got = got.numpy()
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (qtype, mode)


def test_fallback_keeps_one_dense_copy_per_weight(monkeypatch):
    """A format without a torch decoder is dequantized by the reference once per weight (and
    again after an in-place change), not once per call."""
    qt = fq.quantize(np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32), "q3_k")
    data = torch.from_numpy(np.array(qt.data).reshape(-1))
    stats = torch.zeros(0)
    calls = []
    real = fq.tensor.dequantize

    def counting(q):
        calls.append(q.qtype)
        return real(q)

    monkeypatch.setattr(fq.tensor, "dequantize", counting)
    x = torch.randn(2, 256)
    y1 = fallback.qmatmul(x, data, stats, "q3_k", 4, 256, 256, "")
    y2 = fallback.qmatmul(x, data, stats, "q3_k", 4, 256, 256, "")
    assert calls == ["q3_k"] and torch.equal(y1, y2)
    data[0] ^= 1
    fallback.qmatmul(x, data, stats, "q3_k", 4, 256, 256, "")
    assert calls == ["q3_k", "q3_k"]


class _Recorder:
    """Fakes for the two ways out of cuda_op: the kernels and the fallback."""

    def __init__(self, monkeypatch, kernel_error=None):
        self.kernel, self.fallback = [], []
        self.error = kernel_error

        def kernels(x, data, stats, qtype, split, *rest):
            if self.error is not None:
                raise self.error
            self.kernel.append((qtype, split))
            return "kernel"

        def fb(x, data, stats, qtype, *rest):
            self.fallback.append(qtype)
            return "fallback"

        monkeypatch.setattr(cuda_ops, "_qmatmul_cuda", kernels)
        monkeypatch.setattr(cuda_ops.fallback, "qmatmul", fb)
        monkeypatch.setattr(cuda_ops, "validate", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "device", lambda d: _Null())
        monkeypatch.setattr(cuda_ops, "_device_refusal", {})
        monkeypatch.setattr(fallback, "_warned", set())


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _call(qtype, dtype=torch.bfloat16, k=256, bs=64, mode="", device=CUDA0):
    x = types.SimpleNamespace(dtype=dtype, device=device, shape=(1, k))
    nbytes, nstats = checks.expected_sizes(*checks.base_qtype(qtype)[:1], 8, k, bs, mode)
    data = torch.zeros(nbytes, dtype=torch.uint8)
    return cuda_ops.cuda_op(x, data, torch.zeros(nstats), qtype, 8, k, bs, mode)


def test_dispatch_kernels_or_fallback(monkeypatch):
    rec = _Recorder(monkeypatch)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _call("q4_k", bs=256) == "kernel"
        assert _call("q4_k+split", bs=256) == "kernel"
        assert _call("nf4", torch.float16) == "kernel"
        assert not seen
        assert _call("q3_k", bs=256) == "fallback"  # no kernel for the format
        assert _call("q3_k", bs=256) == "fallback"
        assert _call("q4_k", torch.float32, bs=256) == "fallback"  # fp32 activations
        assert _call("nf4", bs=48, k=96) == "fallback"  # a block size the kernels do not take
        assert _call("int8", bs=48, k=96, mode="block") == "fallback"
        assert _call("q4_k+split", torch.float32, bs=256) == "fallback"
    assert rec.kernel == [("q4_k", False), ("q4_k", True), ("nf4", False)]
    assert rec.fallback == ["q3_k", "q3_k", "q4_k", "nf4", "int8", "q4_k"]
    messages = [str(w.message) for w in seen]
    assert len(messages) == 4, messages  # once per reason
    assert any("no CUDA kernel for q3_k" in m for m in messages)
    assert any("torch.float32 activations" in m for m in messages)


@pytest.mark.parametrize(
    "error",
    [fqcuda.CudaUnavailable("NVRTC not found"),
     fqcuda.CudaUnavailable("Tesla T4 has compute capability 7.5")],
)  # fmt: skip
def test_unusable_device_falls_back_once_per_device(monkeypatch, error):
    """No NVRTC or an old GPU: forward still computes (fallback), warns once, and the device is
    not asked again on later calls, whatever the format."""
    rec = _Recorder(monkeypatch, kernel_error=error)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _call("q4_k", bs=256) == "fallback"
        rec.error = AssertionError("the kernels were tried again on a refused device")
        assert _call("q6_k", bs=256) == "fallback"
        rec.error = None  # another device is asked on its own
        assert _call("q4_k", bs=256, device=torch.device("cuda", 1)) == "kernel"
    assert len(seen) == 1 and str(error) in str(seen[0].message)


def test_compile_error_falls_back_for_that_format(monkeypatch):
    """NVRTC rejecting one format's program: that format falls back (warned once, not compiled
    again); the other formats keep their kernels."""
    rec = _Recorder(monkeypatch, kernel_error=fqcuda.CudaCompileError("NVRTC failed"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _call("q4_k", bs=256) == "fallback"
        rec.error = None
        assert _call("q4_k", bs=256) == "fallback"  # not compiled again
        assert _call("q6_k", bs=256) == "kernel"
    assert len(seen) == 1 and "q4_k kernels did not compile" in str(seen[0].message)


def test_other_kernel_errors_propagate(monkeypatch):
    _Recorder(monkeypatch, kernel_error=RuntimeError("CUDA driver call failed"))
    with pytest.raises(RuntimeError, match="driver call"):
        _call("q4_k", bs=256)


def test_old_gpu_is_refused_by_check_device(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla V100")
    with pytest.raises(fqcuda.CudaUnavailable, match="V100 has compute capability 7.0"):
        fqcuda.check_device(0)


# ---- one copy of the weights ------------------------------------------------------------------


@pytest.fixture
def split_on(monkeypatch):
    """QuantLinear treats meta and CPU like a GPU: it keeps the kernels' split layout there."""
    monkeypatch.setattr(linear_mod, "KERNEL_LAYOUT_DEVICES", ("cuda", "meta", "cpu"))


@pytest.mark.parametrize("qtype", sorted(cuda_ops.GGML_SPLIT) + ["nf4", "int8", "q3_k"])
def test_gpu_module_holds_the_format_bytes_once(split_on, qtype):
    """After a move (meta stands in for the GPU), the buffers a QuantLinear holds add up to the
    qtype's size: the split copy replaced the reference bytes instead of joining them."""
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(512, 24, bias=False), qtype)
    want = sum(b.numel() * b.element_size() for b in q.buffers())
    n, k = 24, 512
    nbytes, nstats = checks.expected_sizes(qtype, n, k, q.block_size, q.scale_mode or "")
    assert want == nbytes + 4 * nstats
    m = q.to("meta")
    assert m.kernel_layout == (qtype in cuda_ops.GGML_SPLIT)
    held = sum(b.numel() * b.element_size() for b in m.buffers())
    assert held == nbytes + 4 * nstats
    assert all(b.device.type == "meta" for b in m.buffers())


@pytest.mark.parametrize("qtype", sorted(cuda_ops.GGML_SPLIT))
def test_split_module_computes_and_saves_the_reference(split_on, qtype):
    """A module in the split layout (on the CPU here): same outputs as the reference layout,
    state dict and qtensor in the reference layout, and back to it when moved off the GPU."""
    torch.manual_seed(1)
    ref = QuantLinear.from_linear(torch.nn.Linear(256, 12), qtype)
    x = torch.randn(3, 256)
    want = ref(x)
    want_sd = {k: v.clone() if torch.is_tensor(v) else v for k, v in ref.state_dict().items()}
    q = QuantLinear.from_linear(torch.nn.Linear(256, 12), qtype)
    q.load_state_dict(want_sd)
    q = q.to("cpu")  # _apply: the split layout (cpu counts as a GPU here)
    assert q.kernel_layout
    assert not torch.equal(q.qweight, want_sd["qweight"])
    assert q.qweight.numel() == want_sd["qweight"].numel()
    assert torch.equal(q(x), want)
    if qtype == "q4_k":  # the op with the split qtype traces without a graph break
        compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), want)
    sd = q.state_dict()
    assert torch.equal(sd["qweight"], want_sd["qweight"])
    assert np.array_equal(q.qtensor().data, np.asarray(ref.qtensor().data))
    q2 = QuantLinear(256, 12, qtype="q8_0")
    q2.load_state_dict(sd)
    assert q2.kernel_layout and torch.equal(q2(x), want)
    linear_mod.KERNEL_LAYOUT_DEVICES = ("cuda",)
    q2.use_kernel_layout(False)
    assert not q2.kernel_layout and torch.equal(q2.qweight, want_sd["qweight"])


# ---- the prepared GPU script --------------------------------------------------------------------


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benches" / "gpu_qmatmul.py"
    spec = importlib.util.spec_from_file_location("gpu_qmatmul", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bench_imports_parses_and_reports():
    """benches/gpu_qmatmul.py imports with the CPU-side packages, parses its options, covers
    every kernel format, and its report pieces work on synthetic rows (markdown table with eager
    and graph times, the suggested M = 2..16 default). --dry-run itself (every kernel compiled
    with NVRTC) is test_every_kernel_compiles_to_ptx's work plus the CPU-side inputs."""
    bench = _bench()
    args = bench.build_parser().parse_args(["--dry-run", "--arch", "sm_80"])
    assert args.dry_run and args.arch == "sm_80"
    bases = {f.split("_")[0] if f.startswith(("int8", "nf4")) else f for f in bench.FORMATS}
    assert bases == set(fqcuda.FORMATS)
    rows = []
    for m in bench.MMA_TIME_M:
        for fmt in ("q4_k", "nf4", "q8_0"):
            gemv = 10.0 + m
            mma = 12.0 if m >= 8 else 30.0  # the tensor cores win from M = 8
            rows.append(
                {
                    "K": 4096,
                    "N": 4096,
                    "M": m,
                    "backend": f"ferroquant {fmt}",
                    "time_us": gemv,
                    "eager_us": 20.0,
                    "GB_s": 1.0,
                    "pct_copy_bw": 1.0,
                }
            )
            rows.append({"K": 4096, "N": 4096, "M": m, "backend": f"ferroquant {fmt} mma",
                         "time_us": mma, "GB_s": 1.0, "pct_copy_bw": 1.0})  # fmt: skip
    assert bench.suggest_mma_min_m(rows) == 8
    assert bench.suggest_mma_min_m([r for r in rows if "mma" not in r["backend"]]) is None
    text = bench.table(rows, 3000.0)
    assert "| 4096x4096 | 8 | ferroquant q4_k mma | 12.0 | - |" in text
    assert "| eager us |" in text
    report = {"ferroquant": "x", "date": "2026-12-06 04:00 UTC", "device": "NVIDIA H100"}
    assert "card: NVIDIA H100; date: 2026-12-06" in bench.header(report)


def test_gpu_bench_tolerance_covers_the_gemv_order():
    """The bench's GEMV bound holds for the emulated kernel order's worst case sizes: it grows
    with K/32 and the run length, and with the K-quants' mins."""
    bench = _bench()
    x = np.ones((1, 256))
    w = np.full((2, 256), 0.5)
    base = bench.tolerance(x, w, x @ w.T, 256, torch.bfloat16, False)
    with_mins = bench.tolerance(x, w, x @ w.T, 256, torch.bfloat16, False, np.full((2, 256), 0.25))
    assert np.all(with_mins > base) and np.all(base > 0)


@pytest.mark.parametrize("qtype", sorted(fallback.DECODED))
def test_fallback_stays_on_the_device(qtype):
    """The torch decoders on meta tensors: any copy through host memory (.cpu(), .numpy(), a
    table made on the CPU per call) would fail there, so the fallback's per-call work is all
    on the weight's device."""
    n, k, bs = 8, 512, 64
    mode = "row" if qtype in ("int8", "fp8_e4m3", "fp8_e5m2") else ""
    nbytes, nstats = checks.expected_sizes(qtype, n, k, bs, mode)
    data = torch.empty(nbytes, dtype=torch.uint8, device="meta")
    stats = torch.empty(nstats, dtype=torch.float32, device="meta")
    x = torch.empty(3, k, dtype=torch.bfloat16, device="meta")
    y = fallback.qmatmul(x, data, stats, qtype, n, k, bs, mode)
    assert y.device.type == "meta" and y.shape == (3, n) and y.dtype == torch.bfloat16
