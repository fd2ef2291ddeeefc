#!/usr/bin/env bash
# Installs the benchmark peer: llama-cpp-python 0.3.36 built for the instruction set ferroquant's
# CPU kernels use on this project's machines (AVX2 + AVX-512 with VNNI and BF16), so that speed
# comparisons with llama.cpp are like for like. No AMX by default: llama.cpp's AMX path crashes
# ("Illegal instruction") on machines that advertise AMX without allowing it (docs/cpu-gemm.md).
# `--amx` builds a second peer with ggml's AMX backend (GGML_AMX_TILE/INT8/BF16) into
# /opt/ferroquant-bench/llama-amx, for machines whose AMX the process may use (`ferroquant doctor`
# says so); point the benchmarks at it with FERROQUANT_BENCH_LLAMA=/opt/ferroquant-bench/llama-amx.
# With 0.3.36 (ggml 0.25.3) it loads (tensors repacked into the AMX buffer, AMX_INT8 = 1) but
# dies with SIGILL at its first `tileloadd` on an OpenMP worker on the Emerald Rapids of session 16
# (gdb: ggml_backend_amx_mul_mat; the pattern of ggml-org/llama.cpp#26954, a tile configuration
# the compiler drops). Kept for a fixed release.
#
# The test peer installed by install-peers.sh stays on the AVX2 baseline; this build goes into
# its own folder and only the benchmark scripts put it on sys.path (benches/peers.py).
# The compile takes about 8 minutes on 2 cores.
#
#   scripts/install-bench-peer.sh            # into /opt/ferroquant-bench/llama-avx512
#   scripts/install-bench-peer.sh --amx      # into /opt/ferroquant-bench/llama-amx
#   FERROQUANT_BENCH_LLAMA=/some/dir scripts/install-bench-peer.sh
set -euo pipefail
PY=${PYTHON:-python3}
AMX=0
if [[ "${1:-}" == "--amx" ]]; then AMX=1; fi
if [[ $AMX == 1 ]]; then DEFAULT=/opt/ferroquant-bench/llama-amx; else DEFAULT=/opt/ferroquant-bench/llama-avx512; fi
TARGET=${FERROQUANT_BENCH_LLAMA:-$DEFAULT}
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
FLAGS="$FLAGS -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
if [[ $AMX == 1 ]]; then FLAGS="$FLAGS -DGGML_AMX_TILE=ON -DGGML_AMX_INT8=ON -DGGML_AMX_BF16=ON"; fi
mkdir -p "$TARGET"
CMAKE_ARGS="$FLAGS" "$PY" -m pip install --no-deps --no-cache-dir --upgrade \
  --target "$TARGET" "llama-cpp-python==0.3.36"
# Record what it was built with, for the benchmark output.
printf '%s\n' "$FLAGS" >"$TARGET/FERROQUANT_BUILD_FLAGS"
echo "installed llama-cpp-python 0.3.36 ($([[ $AMX == 1 ]] && echo AMX || echo AVX-512) build) in $TARGET"
