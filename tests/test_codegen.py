"""The built extension holds no SIMD intrinsic compiled out of line.

A closure (or `array::map` / `array::from_fn`) over SIMD values inside a
`#[target_feature(enable = ...)]` function is a function of its own, compiled WITHOUT those
features: every intrinsic in it becomes a call to `core::core_arch::...::_mm256_...` (or
`_mm512_...`, `vld1q_...`) taking its vectors through memory. Session 18 found three in the
AVX-512 bf16 paths; session 19 found the AVX2 nf4 row kernel running 23-40x slower than its
fixed loop for that reason (FERROQUANT_MAX_ISA=avx2, one thread: 112-138 ms against 3.1-5.4 ms).
The bits stay right, so no numerics test sees it: this one reads the extension's symbol table.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import ferroquant._native as native

# An intrinsic wrapper: `core::core_arch::<arch>::<set>::<name>` (demangled), e.g.
# `core::core_arch::x86::avx2::_mm256_madd_epi16` or `...::arm_shared::neon::generated::vld1q_s8`.
# Types such as `core_arch::x86::__m512` inside a generic's name end in `>` or start with `__`:
# they do not match.
_INTRINSIC = re.compile(r"\bcore::core_arch::(?:\w+::)+(_?[a-z]\w*)$")
# std's own run-time feature detection reads XCR0 through a plain call: not a kernel.
_ALLOWED = {"_xgetbv"}


def _symbols(path: Path) -> list[str]:
    nm = shutil.which("nm")
    assert nm, "`nm` (binutils) is needed to read the extension's symbol table"
    out = subprocess.run(
        [nm, "-C", "--defined-only", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return [line.split(" ", 2)[2] for line in out.splitlines() if line.count(" ") >= 2]


def test_extension_keeps_its_symbols() -> None:
    """The check below needs the names: a stripped build would pass it without looking."""
    names = _symbols(Path(native.__file__))
    assert any("ferroquant_core::matmul" in n for n in names), (
        f"{native.__file__} has no ferroquant_core symbols (stripped?): "
        "build it unstripped (the default release profile) to run the codegen check"
    )


def test_no_intrinsic_out_of_line() -> None:
    names = _symbols(Path(native.__file__))
    found = sorted({n for n in names if (m := _INTRINSIC.search(n)) and m.group(1) not in _ALLOWED})
    assert not found, (
        "SIMD intrinsics compiled as out-of-line functions (a closure or array::map over "
        "vectors inside a #[target_feature] fn? write a loop or a macro): " + ", ".join(found)
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("core::core_arch::x86::avx2::_mm256_madd_epi16", "_mm256_madd_epi16"),
        ("core::core_arch::x86::avx512f::_mm512_loadu_ps", "_mm512_loadu_ps"),
        ("core::core_arch::arm_shared::neon::generated::vld1q_s8", "vld1q_s8"),
        ("core::core_arch::x86::__m512", None),
        ("core::ptr::drop_in_place<alloc::vec::Vec<[core::core_arch::x86::__m512; 4]>>", None),
        ("ferroquant_core::matmul::x86::q16_avx2::nf4_rows", None),
    ],
)
def test_intrinsic_pattern(name: str, expected: str | None) -> None:
    """The pattern finds intrinsic wrappers and nothing else (so the check above can fail)."""
    m = _INTRINSIC.search(name)
    assert (m.group(1) if m else None) == expected
