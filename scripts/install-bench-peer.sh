#!/usr/bin/env bash
# Installs the benchmark peer: llama-cpp-python 0.3.36 built for the instruction set ferroquant's
# CPU kernels use on this project's machines (AVX2 + AVX-512 with VNNI and BF16), so that speed
# comparisons with llama.cpp are like for like. Never AMX: llama.cpp's AMX path crashes here
# ("Illegal instruction") on machines that advertise AMX without allowing it.
#
# The test peer installed by install-peers.sh stays on the AVX2 baseline; this build goes into
# its own folder and only the benchmark scripts put it on sys.path (benches/peers.py).
# The compile takes about 8 minutes on 2 cores.
#
#   scripts/install-bench-peer.sh            # into /opt/ferroquant-bench/llama-avx512
#   FERROQUANT_BENCH_LLAMA=/some/dir scripts/install-bench-peer.sh
set -euo pipefail
PY=${PYTHON:-python3}
TARGET=${FERROQUANT_BENCH_LLAMA:-/opt/ferroquant-bench/llama-avx512}
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
FLAGS="$FLAGS -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
mkdir -p "$TARGET"
CMAKE_ARGS="$FLAGS" "$PY" -m pip install --no-deps --no-cache-dir --upgrade \
  --target "$TARGET" "llama-cpp-python==0.3.36"
# Record what it was built with, for the benchmark output.
printf '%s\n' "$FLAGS" >"$TARGET/FERROQUANT_BUILD_FLAGS"
echo "installed llama-cpp-python 0.3.36 (AVX-512 build) in $TARGET"
