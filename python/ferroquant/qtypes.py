"""The qtype table: name, block size, bytes per block, bits per weight, ggml id, peer."""

from __future__ import annotations

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


GGML_QTYPES = tuple(q.name for q in _TABLE.values() if q.ggml_id is not None)
BNB_QTYPES = ("nf4", "fp4")
SCALED_QTYPES = ("int8", "fp8_e4m3", "fp8_e5m2")
# the types whose ggml quantizer uses an importance matrix (quant_weights); q8_0 and the float
# types ignore it
IMATRIX_QTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                  "iq4_nl", "iq4_xs")  # fmt: skip
