"""The qtype table: name, block size, bytes per block, bits per weight, ggml id, peer."""

from __future__ import annotations

import re
from typing import NamedTuple

from . import _native


class QType(NamedTuple):
    name: str
    block_size: int
    type_size: int
    bits_per_weight: float
    ggml_id: int | None
    peer: str


_TABLE: dict[str, QType] = {row[0]: QType(*row) for row in _native.qtypes()}


def qtypes() -> list[QType]:
    """Every format ferroquant quantizes to, in table order."""
    return list(_TABLE.values())


def qtype_info(name: str) -> QType:
    """The row of `name` (case-insensitive); raises QuantizeError for an unknown name."""
    try:
        return _TABLE[name.lower()]
    except (KeyError, AttributeError):
        known = " ".join(_TABLE)
        raise _native.QuantizeError(f"unknown qtype {name!r}; known qtypes: {known}") from None


class GInt(NamedTuple):
    """A grouped integer qtype `int{bits}_g{group|ch}[_sym]` (GPTQ / AWQ checkpoints)."""

    bits: int
    group: int  # 0: one group per row (per-channel)
    sym: bool


_GINT = re.compile(r"int([2348])_g(32|64|128|ch)(_sym)?")


def gint_params(name: str) -> GInt | None:
    """The bits, group and symmetry of a grouped integer qtype name; None for other qtypes."""
    m = _GINT.fullmatch(name.lower()) if isinstance(name, str) else None
    if m is None or name.lower() not in _TABLE:
        return None
    return GInt(int(m[1]), 0 if m[2] == "ch" else int(m[2]), m[3] is not None)


def is_float_zero(name: str) -> bool:
    """Whether `name` is a grouped integer format with an fp16 zero per group (`int*_g*_fz`,
    rust/core/src/formats/gint.rs): not a GPTQ / AWQ format (their zeros are integers), so
    `gint_params` returns None for it."""
    return isinstance(name, str) and name.lower().endswith("_fz") and name.lower() in _TABLE


def float_zero_refusal(name: str, where: str) -> str:
    """The error message for a float-zero qtype sent where only integer zeros can go."""
    base = name.lower().removesuffix("_fz")
    return (
        f"{name} stores a float (fp16) zero point per group; {where} holds integer zeros only: "
        f"quantize to {base} instead (method='hqq' then searches the best integer zero)"
    )


def gint_name(bits: int, group: int, sym: bool) -> str:
    """The qtype name of a grouped integer format (group 0 or -1: per-channel); QuantizeError
    when the table has no such format."""
    name = f"int{bits}_g{'ch' if group in (0, -1) else group}{'_sym' if sym else ''}"
    if name not in _TABLE:
        have = " ".join(q for q in _TABLE if gint_params(q) is not None)
        raise _native.QuantizeError(
            f"no grouped integer format for bits={bits} group_size={group} sym={sym}; "
            f"supported: {have}"
        )
    return name


GGML_QTYPES = tuple(q.name for q in _TABLE.values() if q.ggml_id is not None)
BNB_QTYPES = ("nf4", "fp4")
SCALED_QTYPES = ("int8", "fp8_e4m3", "fp8_e5m2")
# the types whose ggml quantizer uses an importance matrix (quant_weights); q8_0 and the float
# types ignore it
IMATRIX_QTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                  "iq4_nl", "iq4_xs")  # fmt: skip
