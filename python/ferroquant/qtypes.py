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
