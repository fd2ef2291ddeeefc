"""The KV-cache types and their exact sizes (numpy-free, torch-free: `ferroquant kv-size` runs on
the core install).

Every type stores 32-value groups. Bytes per 32 values (the format's block, scales included):

| type       | group (32 values)                               | bytes / 32 values |
|------------|-------------------------------------------------|-------------------|
| `f32`      | 32 x f32                                        | 128               |
| `f16`      | 32 x f16                                        | 64                |
| `q8_0`     | ggml block: f16 d + 32 x i8, along head_dim      | 34                |
| `fp8_e4m3` | f32 scale + 32 x e4m3, along head_dim            | 36                |
| `q4_0`     | ggml block: f16 d + 16 bytes of nibbles          | 18                |
| `int4`     | KIVI, group of 64: f16 scale + f16 zero + 32 B   | 18 (36 per 64)    |
| `int2`     | KIVI, group of 64: f16 scale + f16 zero + 16 B   | 10 (20 per 64)    |

so a token costs `n_layer x 2 (K and V) x n_head_kv x head_dim x bytes_per_32 / 32` bytes.
`int4` / `int2` (KIVI) quantize keys per channel over groups of `kivi_group(head_dim)` tokens and
values per token over groups of that many channels: 64, the native runtime's group, where head_dim
is a multiple of 64; 32 otherwise (the runtime refuses such a head_dim for int4 / int2; the
transformers cache accepts it, at 20 / 12 bytes per 32 values). They keep some tokens in the
model's dtype (`kv_full_precision_tokens`: the sinks, and the newest tokens until their group is
complete and `residual` newer tokens exist); `kv_cache_bytes` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GROUP = 32  # values per block along head_dim (every type but KIVI's 64 where head_dim allows)
KIVI_GROUP = 64  # the native runtime's KIVI group (tokens per key group, channels per value group)


def kivi_group(head_dim: int) -> int:
    """The KIVI group for a head_dim: KIVI_GROUP where it divides head_dim, else 32."""
    return KIVI_GROUP if head_dim % KIVI_GROUP == 0 else GROUP


@dataclass(frozen=True)
class KVType:
    name: str
    bytes_per_group: int  # bytes for 32 values, scales included (KIVI: at its group of 64)
    kivi: bool  # quantized only when a token group fills (residual in full precision)
    doc: str
    # KIVI defaults (transformers cache; `kv_sinks` / `kv_residual` / `kv_rotation` override):
    # the first `sinks` tokens kept in full precision and left out of their group's range; a key
    # group quantized only once `residual` newer tokens exist; Walsh-Hadamard rotation per head
    sinks: int = 0
    residual: int = 0
    rotation: bool = False


KV_TYPES: dict[str, KVType] = {
    t.name: t
    for t in (
        KVType("f32", 128, False, "float32, the exact reference"),
        KVType("f16", 64, False, "IEEE half, round to nearest even"),
        KVType("q8_0", 34, False, "ggml q8_0 blocks along head_dim"),
        KVType("fp8_e4m3", 36, False, "e4m3fn values, one f32 scale (absmax/448) per 32"),
        KVType("q4_0", 18, False, "ggml q4_0 blocks along head_dim"),
        KVType("int4", 18, True, "KIVI 4-bit: keys per channel, values per token"),
        KVType("int2", 10, True, "KIVI 2-bit: keys per channel, values per token", 4, 128, True),
    )
}


def kv_type(name: str) -> KVType:
    """The KVType called `name` (ValueError listing the known ones otherwise)."""
    t = KV_TYPES.get(str(name).lower())
    if t is None:
        raise ValueError(f"unknown kv_type {name!r}: expected one of {', '.join(KV_TYPES)}")
    return t


@dataclass(frozen=True)
class KVShape:
    """What a KV cache's size depends on."""

    n_layer: int
    n_head_kv: int
    head_dim: int

    def __post_init__(self) -> None:
        for field in ("n_layer", "n_head_kv", "head_dim"):
            v = getattr(self, field)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"KV shape: {field} must be a positive integer, got {v!r}")
        if self.head_dim % GROUP:
            raise ValueError(
                f"KV shape: head_dim {self.head_dim} is not a multiple of {GROUP} "
                "(every cache type groups 32 values along head_dim)"
            )


def kv_shape(config: Any) -> KVShape:
    """The KVShape of a transformers config, a config.json dict, or a KVShape."""
    if isinstance(config, KVShape):
        return config
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
        get = lambda k, d=None: getattr(config, k, d)  # noqa: E731
    n_layer = get("num_hidden_layers")
    n_head = get("num_attention_heads")
    if n_layer is None or n_head is None:
        raise ValueError("config: num_hidden_layers and num_attention_heads are required")
    n_head_kv = get("num_key_value_heads") or n_head
    head_dim = get("head_dim") or get("hidden_size", 0) // n_head
    return KVShape(int(n_layer), int(n_head_kv), int(head_dim))


def kv_bytes_per_token(config: Any, kv_type_name: str) -> int:
    """Bytes one token's K and V take in the cache, all layers: exact, scales included
    (`n_layer * 2 * n_head_kv * head_dim * bytes_per_group / 32`). For `int4` / `int2` this is the
    quantized steady state; see `kv_cache_bytes` for the full-precision residual."""
    s, t = kv_shape(config), kv_type(kv_type_name)
    per_32 = t.bytes_per_group
    if t.kivi and kivi_group(s.head_dim) == GROUP:  # one scale and zero per 32 values, not 64
        per_32 += 2
    return s.n_layer * 2 * s.n_head_kv * (s.head_dim // GROUP) * per_32


def kv_window(kv_type_name: str, sinks: int | None = None, residual: int | None = None) -> tuple:
    """(sinks, residual) of a type: the given values, else the type's defaults (int2: 4, 128;
    the others 0, 0). Non-KIVI types take none (ValueError)."""
    t = kv_type(kv_type_name)
    s = t.sinks if sinks is None else sinks
    r = t.residual if residual is None else residual
    for name, v in (("kv_sinks", s), ("kv_residual", r)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if v and not t.kivi:
            raise ValueError(f"{name} applies to the KIVI types int4 / int2 only, not {t.name}")
    return s, r


def kv_full_precision_tokens(
    config: Any,
    kv_type_name: str,
    tokens: int,
    sinks: int | None = None,
    residual: int | None = None,
) -> int:
    """Tokens a sequence of `tokens` keeps in the model's dtype: for `int4` / `int2` the sinks
    (the first S) and the tokens after the last quantized key group (a group of G is quantized
    once R newer tokens exist), i.e. at most S + R + G - 1; 0 for the other types."""
    if not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be a non-negative integer, got {tokens!r}")
    t = kv_type(kv_type_name)
    s, r = kv_window(t.name, sinks, residual)
    if not t.kivi:
        return 0
    g = kivi_group(kv_shape(config).head_dim)
    if s >= g:
        raise ValueError(f"kv_sinks {s} must be smaller than the KIVI group ({g} tokens)")
    quantized = g * max(0, (tokens - r) // g)
    return min(s, tokens) + max(0, tokens - max(s, quantized))


def kv_cache_bytes(
    config: Any,
    kv_type_name: str,
    tokens: int,
    residual_bytes: int = 2,
    sinks: int | None = None,
    residual: int | None = None,
) -> int:
    """Bytes of a cache holding `tokens` tokens of one sequence. KIVI types (`int4`, `int2`)
    hold the full-precision tokens of `kv_full_precision_tokens` in the model's dtype
    (`residual_bytes` per value: 2 for f16/bf16, 4 for f32) and the quantized groups (their sink
    slots included) at `kv_bytes_per_token`; the other types quantize every token."""
    s, t = kv_shape(config), kv_type(kv_type_name)
    per_token = kv_bytes_per_token(s, t.name)
    full = kv_full_precision_tokens(s, t.name, tokens, sinks, residual)
    if not t.kivi:
        return tokens * per_token
    _, r = kv_window(t.name, sinks, residual)
    g = kivi_group(s.head_dim)
    quantized = g * max(0, (tokens - r) // g)  # rows of whole groups, sink slots included
    full_precision = s.n_layer * 2 * s.n_head_kv * s.head_dim * residual_bytes
    return quantized * per_token + full * full_precision
