"""QuantLinear: an nn.Linear whose weight is stored quantized (any ferroquant qtype)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode as _get_dispatch_mode

from .. import _native
from ..cuda import qmatmul as cuda_ops
from ..cuda.checks import SPLIT_SUFFIX
from ..tensor import QTensor, QuantizeError, dequantize, quantize
from . import ops  # ops registers torch.ops.ferroquant.qmatmul
from .openmp import torch_team

# Devices whose QuantLinear keeps a ggml weight in the GPU kernels' split layout.
KERNEL_LAYOUT_DEVICES = ("cuda",)

# Elements per piece of the eager path's casts when the kernel runs on the Rust pool
# (FERROQUANT_OPENMP=off, or torch without an OpenMP team). torch runs an elementwise op of at
# least at::internal::GRAIN_SIZE (32768) elements on its OpenMP pool, whose threads then
# spin-wait on the cores the Rust kernel's own pool is about to use: a two-thread QuantLinear
# call on bf16 input took 15 ms of CPU for the kernel's 4 ms at M = 4 (int4_g64_sym 4096x14336,
# 2026-12-06), while M = 1 (casts below the grain) did not. Pieces below it run on the
# calling thread. When the kernel runs on torch's own team (nn/openmp.py) that fight is gone:
# the casts are one torch op each, on the team whose spinning workers then take the kernel's
# tasks (a 128-token SmolLM2 prompt made 13 pieces per call, ~2,700 extra torch ops a forward).
_SERIAL_PIECE = 16384

# bf16 activations take `_native.qmatmul_bf16`: the casts inside the Rust call, on the calling
# thread, instead of two torch ops (each an allocation and, on torch's team, a parallel region:
# 1.0-1.16x less CPU time a call at M = 128 on SmolLM2's shapes, one thread). False (tests)
# takes the f32 call between two torch casts: the same bits (tests/test_eager.py).
_BF16_IO = True

# Fused siblings (nn/fused.py) take their group's one call; False (tests) runs each alone.
_FUSED = True


def bf16_rows(x: torch.Tensor, k: int) -> np.ndarray:
    """x (bf16, last dimension k) as a C-ordered (rows x k) uint16 array of its bits, for the
    native bf16 calls: a view where x is contiguous (numpy refuses a tensor that requires grad:
    detached first, which an eager call without grad may get)."""
    if x.requires_grad:
        x = x.detach()
    if not x.is_contiguous():
        x = x.contiguous()
    return x.view(torch.uint16).numpy().reshape(-1, k)


def _cast(t: torch.Tensor, dtype: torch.dtype, team: bool) -> torch.Tensor:
    """`t.to(dtype)`, contiguous: one torch op when the kernel runs on torch's team, else
    `_serial_cast`. The same bits either way (an elementwise cast)."""
    return t.to(dtype).contiguous() if team else _serial_cast(t, dtype)


def _serial_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` (contiguous) in pieces small enough for torch to run on this thread."""
    if t.numel() <= _SERIAL_PIECE:
        return t.to(dtype).contiguous()
    src = t.contiguous().view(-1)
    out = torch.empty(t.shape, dtype=dtype)
    dst = out.view(-1)
    for i in range(0, src.numel(), _SERIAL_PIECE):
        dst[i : i + _SERIAL_PIECE].copy_(src[i : i + _SERIAL_PIECE])
    return out


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W quantized.

    Buffers: `qweight` (uint8, the reference layout of the format), `qstats` (float32 per-block
    statistics: nf4/fp4 absmax, int8/fp8 scales; empty for ggml formats), `bias` (optional).
    The format description (qtype, block size, scale mode) travels in the state dict as extra
    state, so `load_state_dict` restores a module built with any placeholder qtype.

    On a GPU a ggml weight with CUDA kernels is repacked once, when the module moves there (or
    loads a state dict there), into the kernels' split layout (ferroquant.cuda.qmatmul), and
    only that copy is kept: GPU memory per weight is the format's bytes. `qweight` then holds
    the split layout (`kernel_layout` is True); the state dict, `qtensor()` and a move back to
    the CPU give the reference layout again.

    Training (QLoRA): on the CPU, when autograd records the call (grad enabled and the input
    requires grad), forward dequantizes W for that call into `train_dtype` (bfloat16 unless
    set; torch.float32 for full precision) and runs torch's GEMM, and the backward dequantizes
    again: no float copy of W is kept. Without grad (inference, evaluation) it runs the
    quantized kernel. The two differ by their activation rounding (docs/training.md).
    """

    # The compute dtype of the training forward and backward (see above); a class default so
    # modules pickled before it existed have it.
    train_dtype: torch.dtype = torch.bfloat16

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        qtype: str = "q8_0",
        block_size: int = 32,
        scale_mode: str | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.qtype = qtype
        self.block_size = block_size
        self.scale_mode = scale_mode
        self._np_cache: tuple | None = None  # see _eager_weights
        self.kernel_layout = False  # qweight in the GPU kernels' split layout (see above)
        self.register_buffer("qweight", torch.empty(0, dtype=torch.uint8, device=device))
        self.register_buffer("qstats", torch.empty(0, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: str, **options: Any) -> QuantLinear:
        """A quantized copy of `linear` (options as for `ferroquant.quantize`)."""
        w = linear.weight.detach().to("cpu")
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            w = w.float()
        qt = quantize(w.contiguous(), qtype, **options)
        return cls.from_qtensor(qt, linear.bias)

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | None = None) -> QuantLinear:
        if len(qt.shape) != 2:
            raise QuantizeError(f"a linear weight must be 2-D, got shape {qt.shape}")
        if qt.state is not None:
            qt = _expand_double_quant(qt)
        n, k = qt.shape
        mod = cls(
            k,
            n,
            bias=bias is not None,
            qtype=qt.qtype,
            block_size=qt.block_size,
            scale_mode=qt.scale_mode,
        )
        mod.qweight = torch.from_numpy(np.array(qt.data, copy=True))
        mod.qstats = torch.from_numpy(np.array(qt.stats, dtype=np.float32, copy=True))
        if bias is not None:
            mod.bias = nn.Parameter(
                bias.detach().to("cpu", torch.float32).clone(), requires_grad=False
            )
        return mod

    def _reference_qweight(self) -> torch.Tensor:
        """qweight in the format's reference layout (undoing the GPU layout when it is in it)."""
        w = self.qweight.detach()
        if self.__dict__.get("kernel_layout", False):
            w = cuda_ops.from_split(w.reshape(-1), self.qtype, self.out_features, self.in_features)
        return w

    def use_kernel_layout(self, on: bool) -> None:
        """Repack qweight into (True) or out of (False) the GPU kernels' split layout, in
        place of the old buffer; a no-op for formats without a split layout. `.to("cuda")` and
        loading a state dict on a GPU call it."""
        on = on and self.qtype in cuda_ops.GGML_SPLIT
        if on == self.__dict__.get("kernel_layout", False):
            return
        n, k = self.out_features, self.in_features
        w = self.qweight.detach().reshape(-1)
        convert = cuda_ops.to_split if on else cuda_ops.from_split
        self.qweight = convert(w, self.qtype, n, k).contiguous()
        self.kernel_layout = on
        self._np_cache = None

    def qtensor(self) -> QTensor:
        return QTensor(
            qtype=self.qtype,
            shape=(self.out_features, self.in_features),
            data=self._reference_qweight().cpu().numpy(),
            block_size=self.block_size,
            stats=self.qstats.detach().cpu().numpy(),
            scale_mode=self.scale_mode,
        )

    def dequantized_weight(self) -> torch.Tensor:
        return torch.from_numpy(dequantize(self.qtensor()))

    def _eager_weights(self) -> tuple[np.ndarray, np.ndarray] | None:
        """numpy views of qweight / qstats for the direct Rust call, kept until a buffer is
        replaced, modified in place or moved (`_apply` forgets them); None when the weight is
        not on the CPU or the format has no native kernel."""
        buffers = self._buffers  # (attribute access through nn.Module costs ~0.5 us each)
        w, s = buffers["qweight"], buffers["qstats"]
        c = self.__dict__.get("_np_cache")  # (absent in modules pickled before it existed)
        if c is not None and c[0] is w and c[2] is s and c[1] == w._version and c[3] == s._version:
            return c[4]
        if (
            w.device.type != "cpu"
            or self.qtype not in ops._NATIVE_QTYPES
            or self.__dict__.get("kernel_layout")
        ):
            return None
        views = (w.detach().contiguous().numpy().reshape(-1),
                 s.detach().to(torch.float32).contiguous().numpy().reshape(-1))  # fmt: skip
        self._np_cache = (w, w._version, s, s._version, views)
        return views

    def _eager_ok(self, x: torch.Tensor) -> bool:
        """True when forward may call the Rust kernel directly: a plain CPU tensor in eager
        mode (no torch.compile / export / jit / fx tracing, no dispatch or function mode, no
        functorch wrapper) and nothing for autograd to record."""
        return (
            type(x) is torch.Tensor
            and x.is_cpu  # (`x.device.type` builds a device object: 0.3 us a call)
            and x.shape[-1] == self.in_features
            and x.numel() > 0
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and _get_dispatch_mode() is None
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        )

    def _eager_forward(self, x: torch.Tensor, w: np.ndarray, s: np.ndarray) -> torch.Tensor:
        """The custom op's CPU kernel without the dispatcher: the same Rust call, the same
        casts, so the result is bit-identical to the op path."""
        team = torch_team()
        if x.dtype == torch.bfloat16 and _BF16_IO:
            return self._bf16_call(x, w, s, team)
        k = self.in_features
        x2 = x.detach()
        if x2.dim() != 2:
            x2 = x2.reshape(-1, k)
        return self._finish(x, self._f32_call(x, x2, w, s, team), team)

    def _finish(self, x: torch.Tensor, out: torch.Tensor, team: bool) -> torch.Tensor:
        """The bias added to the product `out` (rows x out_features), shaped as x."""
        bias = self._parameters["bias"]
        if bias is not None:
            b = bias.detach().to(out.dtype)
            rows = out.shape[0] if team else max(1, _SERIAL_PIECE // max(1, out.shape[1]))
            for i in range(0, out.shape[0], rows):  # pieces off the team, as the casts above
                out[i : i + rows].add_(b)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def _bf16_call(self, x: torch.Tensor, w: np.ndarray, s: np.ndarray, team: bool) -> torch.Tensor:
        """bf16 in, bf16 out, the casts inside the Rust call (`_native.qmatmul_bf16`): the
        bits of `_f32_call`'s two casts around the f32 product (tests/test_eager.py)."""
        n, k, mode = self.out_features, self.in_features, self.scale_mode or None
        y = _native.qmatmul_bf16(bf16_rows(x, k), w, self.qtype, n, k, self.block_size, s, mode,
                                 openmp=team)  # fmt: skip
        return self.bf16_out(x, y, team)

    def bf16_out(self, x: torch.Tensor, y: np.ndarray, team: bool) -> torch.Tensor:
        """The bf16 output of a `qmatmul_bf16` call on x (`y`: rows x out_features of bf16
        bits): the bias added, shaped as x. (The Python of a call is ~10 % of its time at a
        128-token SmolLM2 prompt: numpy reshapes and one `from_numpy` instead of torch views,
        ~0.5 us each, wherever there is no bias to add.)"""
        if self._parameters["bias"] is not None:
            return self._finish(x, torch.from_numpy(y).view(torch.bfloat16), team)
        if x.dim() != 2:
            y = y.reshape(x.shape[:-1] + (self.out_features,))
        return torch.from_numpy(y).view(torch.bfloat16)

    def _f32_call(
        self, x: torch.Tensor, x2: torch.Tensor, w: np.ndarray, s: np.ndarray, team: bool
    ) -> torch.Tensor:
        """The f32 product, x cast to float32 and the result back to x's dtype."""
        k = self.in_features
        if x2.dtype != torch.float32:
            x2 = _cast(x2, torch.float32, team)
        xf = x2.numpy() if x2.is_contiguous() else x2.contiguous().numpy()
        y = _native.qmatmul(xf, w, self.qtype, self.out_features, k, self.block_size, s,
                            self.scale_mode or None, openmp=team)  # fmt: skip
        out = torch.from_numpy(y)
        if x.dtype != torch.float32:
            out = _cast(out, x.dtype, team)
        return out

    def _trains(self, x: torch.Tensor) -> bool:
        """True when autograd records this call on the CPU: forward takes the dequantize +
        GEMM path (several times the kernel's speed at a training batch's rows)."""
        return (
            x.requires_grad
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and self._buffers["qweight"].device.type == "cpu"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._eager_ok(x):
            fused = self.__dict__.get("_fused")  # nn/fused.py
            if fused is not None and _FUSED:
                y = fused[0].call(fused[1], x)
                if y is not None:
                    return y
            views = self._eager_weights()
            if views is not None:
                return self._eager_forward(x, *views)
        qtype = self.qtype + SPLIT_SUFFIX if self.__dict__.get("kernel_layout") else self.qtype
        fmt = (qtype, self.out_features, self.in_features, self.block_size, self.scale_mode or "")
        if self._trains(x):
            y = torch.ops.ferroquant.dequant_matmul(
                x, self.qweight, self.qstats, *fmt, self.train_dtype
            )
        else:
            y = torch.ops.ferroquant.qmatmul(x, self.qweight, self.qstats, *fmt)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # a dtype cast (model.to(torch.bfloat16)) must not round the float32 statistics: they
        # follow the device only
        self._np_cache = None
        stats = self.qstats
        out = super()._apply(fn, recurse)
        if self.qstats.dtype != torch.float32:
            self.qstats = stats.to(self.qstats.device)
        self.use_kernel_layout(self.qweight.device.type in KERNEL_LAYOUT_DEVICES)
        fused = self.__dict__.get("_fused")
        if fused is not None and not fused[0].intact():  # moved: the stacked copy is stale
            self._fused = None
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.__dict__.get("kernel_layout", False):  # checkpoints hold the reference layout
            destination[prefix + "qweight"] = self._reference_qweight()
        for name in ("qweight", "qstats"):  # a fused member's views (nn/fused.py): its own
            t = destination.get(prefix + name)
            if t is not None and t._base is not None:
                destination[prefix + name] = t.clone()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # a copy: the live module keeps its cache
        state["_np_cache"] = None
        state["_fused"] = None  # a copy runs unfused
        return state

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "qtype": self.qtype,
            "block_size": self.block_size,
            "scale_mode": self.scale_mode,
            "in_features": self.in_features,
            "out_features": self.out_features,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.qtype = state["qtype"]
        self.block_size = int(state["block_size"])
        self.scale_mode = state["scale_mode"]
        self.in_features = int(state["in_features"])
        self.out_features = int(state["out_features"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Buffers change size with the format: adopt the saved ones before the size check.
        for name in ("qweight", "qstats"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]))
        self.kernel_layout = False  # the state dict holds the reference layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.use_kernel_layout(self.qweight.device.type in KERNEL_LAYOUT_DEVICES)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, qtype={self.qtype}"
        )


def _expand_double_quant(qt: QTensor) -> QTensor:
    """nf4/fp4 with double-quantized absmax -> the same weights with float32 absmax, computed as
    bitsandbytes does (code[q] * absmax2[block] + offset, in float32)."""
    s = qt.state
    assert s is not None
    block = np.arange(s.qabsmax.size) // s.block_size
    absmax = (s.code[s.qabsmax] * s.absmax2[block]).astype(np.float32) + np.float32(s.offset)
    return QTensor(qt.qtype, qt.shape, qt.data, qt.block_size, absmax.astype(np.float32))
