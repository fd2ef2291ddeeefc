"""QuantEmbedding: an nn.Embedding whose table is stored in a ggml format (rows of blocks), as a
GGUF file holds `token_embd.weight`; a lookup dequantizes only the rows it returns (llama.cpp's
get_rows)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..qtypes import qtype_info
from ..tensor import QTensor, QuantizeError, dequantize


class QuantEmbedding(nn.Module):
    """Embedding table (num_embeddings x embedding_dim) quantized as a ggml qtype.

    Buffers: `qweight` (uint8, the rows of blocks). The output dtype follows the module's float
    dtype (`module.to(torch.bfloat16)` makes it bf16; float32 by default)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str = "q8_0") -> None:
        super().__init__()
        info = qtype_info(qtype)
        if info.ggml_id is None:
            raise QuantizeError(f"QuantEmbedding holds ggml formats; {qtype} is not one")
        if embedding_dim % info.block_size:
            raise QuantizeError(
                f"rows of {embedding_dim} weights are not whole {qtype} blocks of {info.block_size}"
            )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.qtype = info.name
        self.row_bytes = embedding_dim // info.block_size * info.type_size
        self.register_buffer(
            "qweight", torch.zeros(num_embeddings * self.row_bytes, dtype=torch.uint8)
        )
        # carries the output dtype through module.to(dtype); holds no data
        self.register_buffer("dtype_ref", torch.empty(0), persistent=False)

    @classmethod
    def from_qtensor(cls, qt: QTensor) -> QuantEmbedding:
        if len(qt.shape) != 2:
            raise QuantizeError(f"an embedding table must be 2-D, got shape {qt.shape}")
        mod = cls(qt.shape[0], qt.shape[1], qt.qtype)
        data = torch.from_numpy(np.array(qt.data, dtype=np.uint8, copy=True).reshape(-1))
        if data.numel() != mod.qweight.numel():
            raise QuantizeError(f"{qt.qtype} {qt.shape} needs {mod.qweight.numel()} bytes")
        mod.qweight = data
        return mod

    def qtensor(self) -> QTensor:
        info = qtype_info(self.qtype)
        return QTensor(
            self.qtype,
            (self.num_embeddings, self.embedding_dim),
            self.qweight.detach().cpu().numpy(),
            info.block_size,
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to("cpu", torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must be in [0, {self.num_embeddings})")
        rows = self.qweight.detach().cpu().view(self.num_embeddings, self.row_bytes)[flat]
        qt = QTensor(
            self.qtype,
            (int(flat.numel()), self.embedding_dim),
            rows.numpy().reshape(-1),
            qtype_info(self.qtype).block_size,
        )
        out = torch.from_numpy(dequantize(qt)).to(device=ids.device, dtype=self.dtype_ref.dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def get_extra_state(self) -> dict[str, Any]:
        return {"qtype": self.qtype, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim}  # fmt: skip

    def set_extra_state(self, state: dict[str, Any]) -> None:
        info = qtype_info(state["qtype"])
        self.qtype = info.name
        self.num_embeddings = int(state["num_embeddings"])
        self.embedding_dim = int(state["embedding_dim"])
        self.row_bytes = self.embedding_dim // info.block_size * info.type_size

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the buffer's size follows the format: adopt the saved one before the size check
        if prefix + "qweight" in state_dict:
            self.qweight = torch.empty_like(state_dict[prefix + "qweight"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"
