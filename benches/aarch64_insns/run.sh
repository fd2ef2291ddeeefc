#!/usr/bin/env bash
# Executed-instruction counts per weight of the aarch64 kernels, scalar reference vs NEON,
# counted under qemu-user (`-singlestep -d exec,nochain` logs one line per executed
# instruction). Emulated: instruction counts are a proxy, not time on real hardware.
# Needs what scripts/test-aarch64.sh installs. Usage: benches/aarch64_insns/run.sh [K]
set -euo pipefail
cd "$(dirname "$0")"
K=${1:-4096}
REPS=10
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_DIR="$PWD/../../target/aarch64-insns"
cargo build --release -q --target aarch64-unknown-linux-gnu
BIN=$CARGO_TARGET_DIR/aarch64-unknown-linux-gnu/release/aarch64-insns
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
count() {
  qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu -singlestep -d exec,nochain -D "$LOG" \
    "$BIN" "$@" >/dev/null
  wc -l <"$LOG"
}
per_weight() { # kernel variant rows
  local base full
  base=$(count "$1" "$2" "$K" "$3" 0)
  full=$(count "$1" "$2" "$K" "$3" "$REPS")
  python3 -c "print(f'{($full - $base) / ($REPS * $K * $3):.2f}')"
}
echo "instructions per weight per activation row, K=$K, qemu -cpu max"
printf '%-14s %6s %6s %6s %6s %6s\n' kernel ref mull1 sdot1 mull4 sdot4
for kern in q4_0 q5_0 q8_0 iq4_nl q4_k q5_k q6_k; do
  printf '%-14s %6s %6s %6s %6s %6s\n' "$kern" "$(per_weight $kern ref 1)" \
    "$(per_weight $kern mull 1)" "$(per_weight $kern sdot 1)" \
    "$(per_weight $kern mull 4)" "$(per_weight $kern sdot 4)"
done
for kern in quantize_q8_0 quantize_q4_0; do
  printf '%-14s %6s %6s\n' "$kern" "$(per_weight $kern ref 1)" "$(per_weight $kern neon 1)"
done
