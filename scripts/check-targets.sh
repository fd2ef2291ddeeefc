#!/usr/bin/env bash
# The other platforms the wheel is built for, type-checked and linted from Linux: Windows
# (x86_64-pc-windows-gnu: the same Rust code as MSVC's target, no linker needed to check it) and
# macOS on Apple Silicon (aarch64-apple-darwin: NEON kernels, macOS cfgs). `cargo clippy` compiles
# every crate of the workspace, tests included, for the target without linking; the PyO3 binding
# crate needs only the Python version (abi3). This catches OS- or architecture-specific code that
# does not build; it runs nothing (aarch64 Linux is run under qemu by scripts/test-aarch64.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
for target in x86_64-pc-windows-gnu aarch64-apple-darwin; do
  rustup target add "$target" >/dev/null 2>&1 || true
  echo "-- clippy ($target)"
  PYO3_CROSS_PYTHON_VERSION=3.11 cargo clippy --workspace --all-targets --target "$target" -q \
    -- -D warnings
done
