"""Round to nearest: every weight quantized alone by the format's own quantizer (no data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RTNConfig:
    """RTN has no options of its own (the format's options go to `ferroquant.quantize`)."""

    def describe(self) -> str:
        return "rtn(" + ", ".join(f"{k}={v}" for k, v in asdict(self).items()) + ")"
