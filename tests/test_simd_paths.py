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
