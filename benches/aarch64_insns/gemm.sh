#!/usr/bin/env bash
# Executed aarch64 instructions of whole `qmatmul` calls (N = 512 weight rows, K, M activation
# rows, one thread; the activations' quantization included, the same in every column) per weight per activation row, counted under qemu-user as run.sh does: the NEON
# GEMM with `smmla` (-cpu max), with `sdot` (FERROQUANT_MAX_ISA=dotprod), and the `sdot` row
# kernels it replaces (FERROQUANT_NEON_GEMM=0). Emulated: a proxy, not time on hardware.
# Usage: [FORMATS="q4_0 q8_0"] benches/aarch64_insns/gemm.sh [K] [M...]
# (FORMATS also takes the K-quants q2_k q3_k q4_k q5_k q6_k iq4_xs; K then a multiple of 256.)
set -euo pipefail
cd "$(dirname "$0")"
K=${1:-4096}
shift || true
MS=("${@:-2 4 8 16 64}")
read -r -a MS <<<"${MS[*]}"
REPS=2
N=512
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_DIR="$PWD/../../target/aarch64-insns"
export FERROQUANT_NUM_THREADS=1
cargo build --release -q --target aarch64-unknown-linux-gnu
BIN=$CARGO_TARGET_DIR/aarch64-unknown-linux-gnu/release/aarch64-insns
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
count() { # env... -- args
  env "$@" qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu -singlestep -d exec,nochain -D "$LOG" \
    "$BIN" qmatmul "$FMT" "$K" "$M" "$N" "$REPS_NOW" >/dev/null
  wc -l <"$LOG"
}
per_weight() { # env settings for the path
  local base full
  base=$(REPS_NOW=0 count "$@")
  full=$(REPS_NOW=$REPS count "$@")
  python3 -c "print(f'{($full - $base) / ($REPS * $N * $K * $M):.3f}')"
}
echo "instructions per weight per activation row, qmatmul $N x K=$K, one thread, qemu -cpu max"
printf '%-7s %4s %8s %8s %8s\n' format M rows_sdot gemm_sdot gemm_mmla
for FMT in ${FORMATS:-q4_0 q5_0 q8_0 iq4_nl q4_1 q5_1}; do
  for M in "${MS[@]}"; do
    printf '%-7s %4s %8s %8s %8s\n' "$FMT" "$M" \
      "$(per_weight FERROQUANT_NEON_GEMM=0 FERROQUANT_MAX_ISA=dotprod)" \
      "$(per_weight FERROQUANT_MAX_ISA=dotprod)" "$(per_weight FERROQUANT_NEON_GEMM=1)"
  done
done
