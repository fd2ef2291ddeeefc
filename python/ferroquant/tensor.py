"""QTensor and the quantize / dequantize entry points."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _native
from .qtypes import BNB_QTYPES, qtype_info

QuantizeError = _native.QuantizeError


@dataclass(frozen=True)
class DoubleQuantState:
    """bitsandbytes' compressed statistics: absmax = dequantize_blockwise(qabsmax) + offset."""

    offset: float
    qabsmax: np.ndarray  # uint8, one per first-level block
    absmax2: np.ndarray  # float32, one per `block_size` first-level blocks
    code: np.ndarray  # float32[256], the 8-bit dynamic map
    block_size: int = 256

    def as_dict(self) -> dict[str, Any]:
        return {
            "offset": float(self.offset),
            "qabsmax": self.qabsmax,
            "absmax2": self.absmax2,
            "code": self.code,
            "block_size": self.block_size,
        }


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor: raw bytes in the reference layout plus the statistics kept beside them.

    `data` is ggml's block bytes for ggml types, bitsandbytes' packed nibbles for nf4/fp4 (element
    2j in the high nibble), one byte per weight for int8/fp8. `absmax` (nf4/fp4 without double
    quantization) or `state` (with it) and `scales` (int8/fp8) hold the statistics.
    """

    qtype: str
    shape: tuple[int, ...]
    data: np.ndarray
    block_size: int
    stats: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    scale_mode: str | None = None
    state: DoubleQuantState | None = None

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return int(self.shape[-1])

    @property
    def absmax(self) -> np.ndarray | None:
        """Per-block absmax of nf4/fp4 (None when double-quantized: see `state`)."""
        if self.qtype in BNB_QTYPES and self.state is None:
            return self.stats
        return None

    @property
    def scales(self) -> np.ndarray | None:
        """int8/fp8 scales (dequantized value = stored value * scale)."""
        return self.stats if self.scale_mode is not None else None

    @property
    def nbytes(self) -> int:
        """Bytes of the data and every statistic stored with it."""
        n = self.data.nbytes + self.stats.nbytes
        if self.state is not None:
            n += self.state.qabsmax.nbytes + self.state.absmax2.nbytes + 4
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.rows * self.cols)

    def dequantize(self, dtype: Any = "float32") -> np.ndarray:
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        return (
            f"QTensor(qtype={self.qtype!r}, shape={self.shape}, nbytes={self.nbytes}, "
            f"bits_per_weight={self.bits_per_weight:.3f})"
        )


def _as_2d_source(x: Any) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """Numpy view (float32, or uint16 bits for float16/bfloat16), its dtype name, and the shape."""
    if type(x).__module__.startswith("torch"):
        return _torch_source(x)
    if isinstance(x, np.generic):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise QuantizeError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")
    dtype = str(x.dtype)
    if x.ndim == 0:
        raise QuantizeError("expected at least one dimension, got a scalar")
    if not x.flags.c_contiguous:
        raise QuantizeError(
            f"input of shape {x.shape} is not C-contiguous; pass np.ascontiguousarray(x)"
        )
    if dtype == "float32":
        flat = x
    elif dtype in ("float16", "bfloat16"):
        flat = x.view(np.uint16)
    else:
        raise QuantizeError(f"unsupported dtype {dtype}; expected float32, float16 or bfloat16")
    return flat.reshape(-1, x.shape[-1]) if x.size else flat.reshape(0, 0), dtype, x.shape


def _torch_source(t: Any) -> tuple[np.ndarray, str, tuple[int, ...]]:
    import torch

    if t.device.type != "cpu":
        raise QuantizeError(f"expected a CPU tensor, got one on {t.device}")
    if t.dim() == 0:
        raise QuantizeError("expected at least one dimension, got a scalar")
    if not t.is_contiguous():
        raise QuantizeError(
            f"tensor of shape {tuple(t.shape)} is not contiguous; call .contiguous()"
        )
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    if t.dtype not in names:
        raise QuantizeError(f"unsupported dtype {t.dtype}; expected float32, float16 or bfloat16")
    t = t.detach()
    arr = t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy().view(np.uint16)
    shape = tuple(t.shape)
    return arr.reshape(-1, shape[-1]) if arr.size else arr.reshape(0, 0), names[t.dtype], shape


def quantize(
    x: Any,
    qtype: str,
    imatrix: Any = None,
    *,
    block_size: int | None = None,
    double_quant: bool = False,
    scale_mode: str | None = None,
) -> QTensor:
    """Quantize `x` (float32/float16/bfloat16, rows along the last axis) to `qtype`.

    imatrix: per-column importance (ggml's quant_weights), length = last dimension.
    block_size: nf4/fp4 (default 64) and int8/fp8 with scale_mode="block" (default 64).
    double_quant: bitsandbytes' compressed statistics for nf4/fp4.
    scale_mode: "tensor", "row" (default) or "block" for int8/fp8.
    """
    info = qtype_info(qtype)
    src, dtype, shape = _as_2d_source(x)
    w = None
    if imatrix is not None:
        w = np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32).reshape(-1))
    out = _native.quantize(src, dtype, info.name, w, block_size, double_quant, scale_mode)
    dq = out["double_quant"]
    return QTensor(
        qtype=info.name,
        shape=tuple(int(s) for s in shape),
        data=out["data"],
        block_size=int(out["block_size"]),
        stats=out["stats"],
        scale_mode=out["scale_mode"],
        state=DoubleQuantState(**dq) if dq is not None else None,
    )


def dequantize(qt: QTensor, dtype: Any = "float32") -> np.ndarray:
    """Values of `qt` as a numpy array of `qt.shape` (float32 unless `dtype` says otherwise)."""
    if not isinstance(qt, QTensor):
        raise QuantizeError(f"expected a QTensor, got {type(qt).__name__}")
    info = qtype_info(qt.qtype)
    data = np.ascontiguousarray(qt.data, dtype=np.uint8).reshape(-1)
    stats = np.ascontiguousarray(qt.stats, dtype=np.float32).reshape(-1)
    y = _native.dequantize(
        data,
        info.name,
        qt.rows,
        qt.cols,
        qt.block_size,
        stats,
        qt.scale_mode,
        qt.state.as_dict() if qt.state is not None else None,
    )
    y = y.reshape(qt.shape)
    return y if np.dtype(dtype) == np.float32 else y.astype(dtype)
