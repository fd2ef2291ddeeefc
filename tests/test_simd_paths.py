"""Every fast path against the scalar reference: the same quantization in a process with
FERROQUANT_FORCE_SCALAR=1 must give identical bytes for every format."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

import ferroquant as fq

from data import DISTRIBUTIONS, make

SCRIPT = r"""
import sys, numpy as np, ferroquant as fq
sys.path.insert(0, sys.argv[1])
from data import DISTRIBUTIONS, make
out = {}
for q in sys.argv[2].split(","):
    for i, dist in enumerate(DISTRIBUTIONS):
        x = make(dist, 6, 512, seed=100 + i)
        out[f"{q}/{dist}"] = fq.quantize(x, q).data
        w = np.linspace(0.1, 3.0, 512, dtype=np.float32)
        if fq.qtype_info(q).ggml_id is not None and q not in ("f32", "f16", "bf16"):
            out[f"{q}/{dist}/imatrix"] = fq.quantize(x, q, w).data
np.savez(sys.argv[3], **out)
"""


def test_forced_scalar_path_gives_identical_bytes(tmp_path):
    qtypes = [q.name for q in fq.qtypes()]
    path = tmp_path / "scalar.npz"
    env = dict(os.environ, FERROQUANT_FORCE_SCALAR="1")
    tests_dir = os.path.dirname(__file__)
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, tests_dir, ",".join(qtypes), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    scalar = np.load(path)
    w = np.linspace(0.1, 3.0, 512, dtype=np.float32)
    for q in qtypes:
        for i, dist in enumerate(DISTRIBUTIONS):
            x = make(dist, 6, 512, seed=100 + i)
            assert np.array_equal(fq.quantize(x, q).data, scalar[f"{q}/{dist}"]), (q, dist)
            key = f"{q}/{dist}/imatrix"
            if key in scalar:
                assert np.array_equal(fq.quantize(x, q, w).data, scalar[key]), (q, dist)


CAPPED = r"""
import sys, numpy as np, ferroquant as fq
from ferroquant import _native
rng = np.random.default_rng(7)
out = {"level": np.array(_native.kernel_simd_level())}
for q in sys.argv[1].split(","):
    for m, n, k in ((16, 13, 576), (5, 8, 4096), (17, 37, 576)):
        qt = fq.quantize(rng.standard_normal((n, k)).astype(np.float32), q)
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = _native.qmatmul(x, qt.data.reshape(-1), q, n, k, qt.block_size, None, None)
        out[f"{q}/{m}x{n}x{k}"] = np.asarray(y)
np.savez(sys.argv[2], **out)
"""


def test_avx2_gemm_under_isa_cap_matches_references(tmp_path):
    """FERROQUANT_MAX_ISA caps an AVX-512 CPU to AVX2 (and AVX-VNNI): the 32-weight formats'
    AVX2 GEMM (M >= 4, K with and without a partial group) gives the bits of the scalar
    references and of the uncapped kernels."""
    level = fq._native.kernel_simd_level()
    if level not in ("avx2", "avx512", "avx512-vnni", "amx-int8"):
        import pytest

        pytest.skip(f"x86-64 with AVX2 only (kernels here: {level})")
    qtypes = "q4_0,q5_0,q8_0,iq4_nl,q4_1,q5_1"
    runs = {}
    for name, env in (
        ("scalar", {"FERROQUANT_FORCE_SCALAR": "1"}),
        ("avx2", {"FERROQUANT_MAX_ISA": "avx2"}),
        ("avxvnni", {"FERROQUANT_MAX_ISA": "avxvnni"}),
        ("avx512", {"FERROQUANT_MAX_ISA": "avx512"}),  # no AMX
        ("native", {}),
    ):
        path = tmp_path / f"{name}.npz"
        r = subprocess.run(
            [sys.executable, "-c", CAPPED, qtypes, str(path)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = dict(np.load(path))
    assert str(runs["scalar"].pop("level")) == "scalar"
    assert str(runs["avx2"].pop("level")) == "avx2"
    assert str(runs["avxvnni"].pop("level")) == "avx2"
    assert str(runs["avx512"].pop("level")) != "amx-int8"
    runs["native"].pop("level")
    for name in ("avx2", "avxvnni", "avx512", "native"):
        for key, want in runs["scalar"].items():
            got = runs[name][key]
            assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist(), (name, key)
