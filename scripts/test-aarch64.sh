#!/usr/bin/env bash
# aarch64 checks without ARM hardware: cross-compile the Rust core for aarch64-unknown-linux-gnu
# and run its tests under qemu-user. Emulated, not real hardware: this checks correctness (every
# NEON kernel bit for bit against the scalar references), not speed.
#   1. the whole core suite on `-cpu max` (has dotprod and i8mm: the `sdot` kernels, the GEMM
#      in `smmla` and, forced by its tests, in `sdot`),
#   2. the matmul tests on `-cpu cortex-a53` (Armv8.0, no dotprod: the `smull` kernels),
#   2b. the GEMM's tests (the 32-weight formats' and the K-quants'), the detection, has_gemm
#      and the runtime's matmuls and prompt (llama::tests) on
#      `-cpu cortex-a76` (dotprod, no i8mm: the GEMM in `sdot` by detection), on `-cpu max`
#      with FERROQUANT_MAX_ISA=dotprod (the cap), and the K-quants' and the detection with
#      FERROQUANT_MAX_ISA=neon (no GEMM: the `smull` row kernels by detection),
#   3. the matmul and NEON-quantizer tests with FERROQUANT_FORCE_SCALAR=1 (the references
#      through the dispatch),
#   4. clippy for the target, the whole workspace (cfg-gated code, dead code there; the PyO3
#      binding crate type-checks for aarch64 thanks to abi3, no aarch64 Python needed).
# FERROQUANT_EXPECT_DOTPROD / _I8MM make the runs fail unless they took the path they are meant to.
# Needs (Debian): gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user; installed with apt
# when missing (CI runs as root on a fresh Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null
fi
rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1 || true
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
qemu="qemu-aarch64 -L /usr/aarch64-linux-gnu"
tests=(cargo test -p ferroquant-core --target aarch64-unknown-linux-gnu -q)

echo "-- qemu -cpu max (dotprod): whole core suite"
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$qemu -cpu max" FERROQUANT_EXPECT_DOTPROD=1 \
  FERROQUANT_EXPECT_I8MM=1 "${tests[@]}"
echo "-- qemu -cpu cortex-a53 (no dotprod): matmul"
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$qemu -cpu cortex-a53" FERROQUANT_EXPECT_DOTPROD=0 \
  "${tests[@]}" matmul
echo "-- qemu -cpu cortex-a76 (dotprod, no i8mm), and -cpu max capped at dotprod / neon: the NEON GEMM"
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$qemu -cpu cortex-a76" FERROQUANT_EXPECT_DOTPROD=1 \
  FERROQUANT_EXPECT_I8MM=0 "${tests[@]}" -- gemm_neon detection_and_dispatch has_gemm llama::tests
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$qemu -cpu max" FERROQUANT_MAX_ISA=dotprod \
  FERROQUANT_EXPECT_DOTPROD=1 FERROQUANT_EXPECT_I8MM=0 "${tests[@]}" -- gemm_neon detection_and_dispatch \
  has_gemm llama::tests
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$qemu -cpu max" FERROQUANT_MAX_ISA=neon \
  FERROQUANT_EXPECT_DOTPROD=0 FERROQUANT_EXPECT_I8MM=0 "${tests[@]}" -- gemm_neon_k \
  neon_gemm_chosen_by_detection detection_and_dispatch has_gemm llama::tests
echo "-- FERROQUANT_FORCE_SCALAR=1: matmul, legacy_neon"
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$qemu -cpu max" FERROQUANT_FORCE_SCALAR=1 \
  "${tests[@]}" -- matmul legacy_neon
echo "-- clippy (aarch64)"
cargo clippy --workspace --all-targets --target aarch64-unknown-linux-gnu -q -- -D warnings
