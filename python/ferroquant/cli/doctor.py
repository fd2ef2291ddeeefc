"""`ferroquant doctor`: what this machine and installation support."""

from __future__ import annotations

import argparse
import json
import platform
from importlib import metadata

from .. import __version__, _native
from .. import config as fq_config

# import name shown -> the distribution that installs it. Versions come from the installed
# metadata, so no peer is imported (bitsandbytes, for one, prints import-time noise).
PEERS = {
    "numpy": "numpy",
    "torch": "torch",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "tokenizers": "tokenizers",
    "gguf": "gguf",
    "bitsandbytes": "bitsandbytes",
    "llama_cpp": "llama-cpp-python",
    "cuda.bindings": "cuda-bindings",
    "nvrtc": "nvidia-cuda-nvrtc",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    doc = sub.add_parser("doctor", help="what this machine and installation support")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=run)


def peer_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        # nvidia-cuda-nvrtc is published under per-CUDA-major names too.
        if distribution == "nvidia-cuda-nvrtc":
            for alt in ("nvidia-cuda-nvrtc-cu12", "nvidia-cuda-nvrtc-cu13"):
                try:
                    return f"{metadata.version(alt)} ({alt})"
                except metadata.PackageNotFoundError:
                    pass
        return "not installed"


def _cuda_status() -> str:
    try:
        from ..cuda import nvrtc
    except Exception as e:  # the shim itself failing to import is worth reporting, not fatal
        return f"shim failed to import ({type(e).__name__}: {e})"
    return nvrtc.diagnose()


def _torch_team() -> str:
    """Whether QuantLinear's CPU calls run on torch's OpenMP team (nn/openmp.py)."""
    try:
        from ..nn.openmp import torch_team
    except ImportError as e:
        return f"no (torch does not import: {e})"
    if torch_team():
        return "yes"
    return "no (FERROQUANT_OPENMP=off, or torch's ATen backend is not OpenMP)"


def run(args: argparse.Namespace) -> int:
    info = {
        "ferroquant": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": _native.num_threads(),
        "simd_kernels": _native.kernel_simd_level(),  # what the matmul kernels and runtime use
        "simd_quantizers": _native.simd_level(),
        "amx": _native.amx_status(),  # Intel AMX tiles: used, or why not (CPU, OS, permission)
        "torch_openmp_team": _torch_team(),
        "settings": fq_config.describe(),
        "peers": {name: peer_version(dist) for name, dist in PEERS.items()},
        "cuda": _cuda_status(),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    for k, v in info.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk:<28} {vv}")
        else:
            print(f"{k:<30} {v}")
    return 0
