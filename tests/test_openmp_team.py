"""qmatmul on torch's OpenMP team (`openmp=True`, rust/core/src/openmp.rs): the same bits as the
Rust pool at every thread count, for the row, GEMM and bf16 GEMM paths; no deadlock from several
Python threads at once or from inside an OpenMP region; the pool when nothing is attached; and
QuantLinear's switch (FERROQUANT_OPENMP)."""

from __future__ import annotations

import ctypes
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ferroquant as fq
from ferroquant import _native, config
from ferroquant.nn import QuantLinear
from ferroquant.nn import openmp as nn_openmp

# torch's Linux wheels run ATen on OpenMP (libgomp); elsewhere there is no team to test.
pytestmark = pytest.mark.skipif(
    sys.platform != "linux"
    or "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="torch's ATen backend is not OpenMP here",
)

N, K = 640, 512


@pytest.fixture(autouse=True)
def _two_threads():
    before = _native.num_threads()
    fq.set_num_threads(2)
    assert _native.openmp_attach(torch._C.__file__)
    yield
    fq.set_num_threads(before)


def _weights(qtype: str, seed: int = 0, n: int = N, k: int = K):
    rng = np.random.default_rng(seed)
    q = fq.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    stats = None if q.stats is None else np.ascontiguousarray(q.stats).reshape(-1)
    return (np.ascontiguousarray(q.data).reshape(-1), q.qtype, n, k, q.block_size, stats,
            q.scale_mode)  # fmt: skip


def _x(m: int, seed: int = 1, k: int = K) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)


def _call(x: np.ndarray, w: tuple, openmp: bool) -> np.ndarray:
    return _native.qmatmul(x, *w, openmp=openmp)


# q8_0: row kernels at M = 1, the 32-weight GEMM above; q4_k: K-quant tiles; nf4 / int8: the
# bf16 GEMM from qmatmul_bf16_min_m() rows.
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k", "nf4", "int8"])
@pytest.mark.parametrize("m", [1, 3, 16, 70])
def test_team_matches_the_pool_bit_for_bit(qtype, m):
    w = _weights(qtype)
    x = _x(m)
    pool = _call(x, w, openmp=False)
    for threads in (1, 2, 3):
        fq.set_num_threads(threads)
        before = _native.openmp_regions()
        team = _call(x, w, openmp=True)
        assert team.tobytes() == pool.tobytes(), (qtype, m, threads)
        # one thread runs serially; more run (at least the GEMM) on the team
        assert (_native.openmp_regions() > before) == (threads > 1)


# M = 1 on 2+ threads: a contiguous run of tasks a thread (the default, parallel/runs.rs) or
# tasks claimed one by one (FERROQUANT_M1_RUNS=0): one thread's bits either way, on the team
# and on the pool, with more tasks than threads and runs of unequal length (N = 1000).
@pytest.mark.parametrize("qtype", ["q4_0", "q4_k", "nf4", "int8", "fp8_e4m3", "int4_g64"])
def test_m1_splits_give_one_threads_bits(qtype, monkeypatch):
    w = _weights(qtype, n=1000, k=2048)
    x = _x(1, k=2048)
    fq.set_num_threads(1)
    want = _call(x, w, openmp=False)
    for runs in ("1", "0"):
        monkeypatch.setenv("FERROQUANT_M1_RUNS", runs)
        for threads in (2, 3, 5):
            fq.set_num_threads(threads)
            assert _call(x, w, openmp=False).tobytes() == want.tobytes(), (runs, threads)
            before = _native.openmp_regions()
            assert _call(x, w, openmp=True).tobytes() == want.tobytes(), (runs, threads)
            assert _native.openmp_regions() > before


# M x K >= 2^17 (and M >= 4): the activations are quantized in parallel too (plan.rs: q8_0
# blocks with their scales and sums, q8_1, q8_K, q16 rows; panels.rs: the tile interleave).
@pytest.mark.parametrize(
    ("qtype", "m", "k"),
    [("q8_0", 80, 2048), ("q4_1", 80, 2048), ("q5_0", 6, 32768), ("q4_k", 80, 2048),
     ("q6_k", 6, 32768), ("int8", 4, 32768), ("nf4", 4, 32768)],
)  # fmt: skip
def test_team_quantizes_activations_as_the_pool(qtype, m, k):
    w = _weights(qtype, n=96, k=k)
    x = _x(m, k=k)
    pool = _call(x, w, openmp=False)
    before = _native.openmp_regions()
    assert _call(x, w, openmp=True).tobytes() == pool.tobytes()
    assert _native.openmp_regions() > before


@settings(max_examples=15, deadline=None)
@given(
    qtype=st.sampled_from(["q8_0", "q4_1", "q6_k", "nf4"]),
    m=st.integers(1, 40),
    threads=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_property_team_equals_pool(qtype, m, threads, seed):
    w = _weights(qtype, seed)
    x = _x(m, seed + 1)
    pool = _call(x, w, openmp=False)
    fq.set_num_threads(threads)
    assert _call(x, w, openmp=True).tobytes() == pool.tobytes()


def test_several_python_threads_at_once():
    w = _weights("q8_0")
    xs = [_x(m, seed) for seed, m in enumerate([1, 9, 64, 33, 128, 2, 17, 50])]
    expected = [_call(x, w, openmp=False) for x in xs]
    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(_call, x, w, True) for x in xs * 3]
        got = [f.result(timeout=120) for f in futures]
    for i, y in enumerate(got):
        assert y.tobytes() == expected[i % len(xs)].tobytes()


def _torch_libgomp() -> str:
    """Path of the libgomp that torch loaded (from this process's mappings)."""
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if "libgomp" in path.rsplit("/", 1)[-1]:
                return path
    raise AssertionError("torch's ATen backend is OpenMP but no libgomp is mapped")


def test_call_from_inside_an_openmp_region():
    """Each member of a 2-thread OpenMP region (torch's runtime) calls qmatmul(openmp=True):
    a nested team would be one thread, so these calls take the pool; no deadlock, same bits."""
    gomp = ctypes.CDLL(_torch_libgomp())  # already loaded: the same library and its state
    gomp.GOMP_parallel.restype = None
    gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    gomp.omp_get_thread_num.restype = ctypes.c_int
    w = _weights("q4_0")
    x = _x(64)
    expected = _call(x, w, openmp=False)
    got: dict[int, np.ndarray] = {}
    lock = threading.Lock()

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def member(_data):
        y = _call(x, w, openmp=True)
        with lock:
            got[gomp.omp_get_thread_num()] = y

    before = _native.openmp_regions()
    gomp.GOMP_parallel(ctypes.cast(member, ctypes.c_void_p), None, 2, 0)
    assert sorted(got) == [0, 1]
    assert _native.openmp_regions() == before  # both took the pool
    for y in got.values():
        assert y.tobytes() == expected.tobytes()


def test_without_a_runtime_the_pool_runs():
    w = _weights("q8_0")
    x = _x(32)
    expected = _call(x, w, openmp=False)
    _native.openmp_detach()
    try:
        assert not _native.openmp_attached()
        before = _native.openmp_regions()
        assert _call(x, w, openmp=True).tobytes() == expected.tobytes()
        assert _native.openmp_regions() == before
        # a library that is not loaded is never loaded by attach
        assert not _native.openmp_attach("libferroquant-not-a-library.so")
        assert not _native.openmp_attached()
    finally:
        assert _native.openmp_attach(torch._C.__file__)


def test_quantlinear_switch(monkeypatch):
    # N = 320: several tasks on every path (with FERROQUANT_GGML_BF16=12 the 48 rows take the
    # bf16 tiles, whose jobs are 144 weight rows: at N = 96 one job, no region)
    lin = QuantLinear.from_linear(nn.Linear(K, 320), "q4_0")
    x = torch.randn(48, K, dtype=torch.bfloat16)
    monkeypatch.setenv("FERROQUANT_OPENMP", "off")
    assert not nn_openmp.torch_team()
    before = _native.openmp_regions()
    pool = lin(x)
    assert _native.openmp_regions() == before
    monkeypatch.setenv("FERROQUANT_OPENMP", "auto")
    assert nn_openmp.torch_team()
    assert torch.equal(lin(x), pool)
    assert _native.openmp_regions() > before
    monkeypatch.setenv("FERROQUANT_OPENMP", "sometimes")
    with pytest.raises(ValueError, match="FERROQUANT_OPENMP"):
        config.openmp()
