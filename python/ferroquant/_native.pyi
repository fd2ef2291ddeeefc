"""Type stub of the Rust extension module ferroquant._native."""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

class QuantizeError(ValueError): ...
class FormatError(ValueError): ...

def quantize(
    x: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    src_dtype: str,
    qtype: str,
    imatrix: npt.NDArray[np.float32] | None = None,
    block_size: int | None = None,
    double_quant: bool = False,
    scale_mode: str | None = None,
) -> dict[str, Any]: ...
def gint_qdq(
    x: npt.NDArray[np.float32], qtype: str, scale: npt.NDArray[np.float32] | None = None
) -> npt.NDArray[np.float32]:
    """dequantize(quantize(x, qtype)) for a grouped integer qtype with integer zeros, fused;
    with `scale` (one finite positive value per column): that of x * scale, divided by scale."""
    ...

def dequantize(
    data: npt.NDArray[np.uint8],
    qtype: str,
    rows: int,
    cols: int,
    block_size: int,
    stats: npt.NDArray[np.float32] | None = None,
    scale_mode: str | None = None,
    double_quant: dict[str, Any] | None = None,
) -> npt.NDArray[np.float32]: ...
def dequantize_into(
    data: npt.NDArray[np.uint8],
    qtype: str,
    rows: int,
    cols: int,
    block_size: int,
    stats: npt.NDArray[np.float32],
    scale_mode: str | None,
    out: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
) -> None:
    """Dequantize into `out` (rows * cols float32, or uint16 bfloat16 bits rounded to nearest
    even as torch's cast does)."""

def hqq_solve(
    w: npt.NDArray[np.float32],
    group: int,
    bits: int,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    early_stop: bool = True,
    reference: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], int]:
    """HQQ's (inverse scales, zeros, steps) per group of `group` consecutive values."""

def hqq_quantize(
    w: npt.NDArray[np.float32],
    qtype: str,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    early_stop: bool = True,
) -> dict[str, Any]:
    """An HQQ-optimised tensor of `qtype`: block_size, data, stats (as `quantize`). The
    float-zero qtypes (`int{2,3,4}_g{32,64,128}_fz`) store the solver's zero as fp16; the integer
    ones (`int*_g*`) the searched integer zero."""

def qtypes() -> list[tuple[str, int, int, float, int | None, str]]:
    """(name, block_size, type_size, bits_per_weight, ggml_id, peer) per format, e.g. the
    grouped integers `int4_g64`, `int4_g64_sym` and (fp16 zero per group) `int4_g64_fz`."""

def gptq_columns(
    rule_name: str,
    w: npt.NDArray[np.float32],
    hinv: npt.NDArray[np.float32],
    err: npt.NDArray[np.float32],
    levels: npt.NDArray[np.uint8],
    values: npt.NDArray[np.float32],
    start: int,
    end: int,
    propagate: bool = True,
    scale: npt.NDArray[np.float32] | None = None,
    inv: npt.NDArray[np.float32] | None = None,
    low: npt.NDArray[np.float32] | None = None,
    zero: npt.NDArray[np.float32] | None = None,
    rscale: npt.NDArray[np.float32] | None = None,
    grid: npt.NDArray[np.float32] | None = None,
    grid_levels: int = 0,
    offset: float = 0.0,
    center: int = 0,
    top: int = 0,
    table: npt.NDArray[np.float32] | None = None,
    bounds: npt.NDArray[np.float32] | None = None,
    order: npt.NDArray[np.int64] | None = None,
    map: npt.NDArray[np.int64] | None = None,
    from_original: bool = False,
) -> None:
    """GPTQ's columns start..end of one lazy batch, in place (`w`, `err`, `levels`, `values`:
    [n, rows]; `hinv`: [n, n]; parameters flat [end - start, rows(, grid_levels)], or with
    `map` ([end - start]) flat [k, rows(, grid_levels)] and column start + c reading parameter
    column map[c]). `from_original`: the LDL form (`err` holds the original weights on entry,
    each column's error is w_orig - q, `hinv` is -V diag(V)^-1 with V V^T = H). `levels` are
    bytes: a rule whose levels could reach 256 is refused."""

def gptq_gather_t(
    src: npt.NDArray[np.float32], idx: npt.NDArray[np.int64], rows: bool = False
) -> npt.NDArray[np.float32]:
    """`src` [r, c] transposed with `idx` gathering its columns (out[a, b] = src[b, idx[a]],
    [c, r], `idx` a permutation of 0..c) or with `rows` its rows (out[a, b] = src[idx[b], a],
    [c, len(idx)]), in one cache-blocked pass (a copy: the same values)."""

def gptq_permute_f32(
    src: npt.NDArray[np.float64], idx: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """`src` [n, n] with rows and columns gathered by `idx` (a permutation of 0..n), rounded to
    float32 (out[a, b] = f32(src[idx[a], idx[b]])), in one pass."""

def gptq_pack(
    data: npt.NDArray[np.uint8],
    levels: npt.NDArray[np.uint8],
    perm: npt.NDArray[np.int64],
    block: int,
    nbytes: int,
    bits: int,
    byte: npt.NDArray[np.int64],
    shift: npt.NDArray[np.int64],
    xor: int,
) -> None:
    """GPTQ's codes `levels` ([cols, rows], solve order: row p is natural column perm[p]) into
    the block bytes `data` ([rows, cols / block * nbytes], in place) by the format's bit map
    (`byte` / `shift`: [block * bits]; stored code level ^ xor); other bits are kept."""

def gram_bf16(x: npt.NDArray[np.uint16], path: str | None = None) -> npt.NDArray[np.float32]:
    """x^T x ([d, d] float32) of bf16 bits x [n, d] (row-major). path (None: the first of
    gram_bf16_paths()): "amx" (AMX tiles: the tile unit's sums, within the faithful-rounding
    bound, unit 2^-23), "avx512bf16" (one fixed f32 chain per output on vdpbf16ps) or "scalar"
    (that chain's reference: the same bits); ValueError for a path that does not run here."""

def gram_bf16_fast() -> bool:
    """Whether gram_bf16 runs a fast kernel (AMX or AVX-512 BF16) on this CPU."""

def gram_bf16_paths() -> list[str]:
    """The paths gram_bf16 runs on this CPU, fastest (its default) first."""

def block_struct_sizes() -> list[tuple[str, int]]: ...
def set_num_threads(n: int) -> None: ...
def num_threads() -> int: ...
def simd_level() -> str: ...
def kernel_simd_level() -> str: ...
def amx_status() -> str: ...
def block_quant_spans() -> list[tuple[str, int, int]]: ...
def cuda_sources() -> list[tuple[str, str]]:
    """(file name, text) of every kernel source in the repository's cuda/ folder."""
    ...

# qmatmul's weight formats (rust/core/src/matmul; `qmatmul_qtypes()` is the authority): q4_0 q4_1
# q5_0 q5_1 q8_0 iq4_nl (q8_0 / q8_1 activations), q2_k q3_k q4_k q5_k q6_k iq4_xs tq1_0 tq2_0
# (q8_K activations), nf4 int8 (16-bit activations per block of 64: reference/q16.rs), fp8_e4m3
# fp8_e5m2 (f32 activations); nf4, int8, fp8 and grouped integers from `qmatmul_bf16_min_m()` rows
# on: bf16 (reference/bf16.rs); the 12 ggml formats above (not tq*) from
# `qmatmul_bf16_ggml_min_m(qtype, k)` rows where AMX bf16 runs. ops.py dequantizes the others.
def qmatmul(
    x: npt.NDArray[np.float32],
    data: npt.NDArray[np.uint8],
    qtype: str,
    n: int,
    k: int,
    block_size: int,
    stats: npt.NDArray[np.float32] | None = None,
    scale_mode: str | None = None,
    openmp: bool = False,
) -> npt.NDArray[np.float32]: ...

# qmatmul on bf16 bits (x: M x K uint16, returns M x N uint16): the f32 product of the widened x,
# each output rounded to nearest even as torch's .to(torch.bfloat16) (QuantLinear's bf16 calls).
def qmatmul_bf16(
    x: npt.NDArray[np.uint16],
    data: npt.NDArray[np.uint8],
    qtype: str,
    n: int,
    k: int,
    block_size: int,
    stats: npt.NDArray[np.float32] | None = None,
    scale_mode: str | None = None,
    openmp: bool = False,
) -> npt.NDArray[np.uint16]: ...

# qmatmul_bf16 of weights stacked row-wise (parts[i] rows each, data and statistics concatenated:
# QuantLinear's fused q/k/v, gate/up): one M x parts[i] uint16 array per part, each the bits of
# that weight's own qmatmul_bf16 call.
def qmatmul_bf16_split(
    x: npt.NDArray[np.uint16],
    data: npt.NDArray[np.uint8],
    qtype: str,
    parts: list[int],
    k: int,
    block_size: int,
    stats: npt.NDArray[np.float32] | None = None,
    scale_mode: str | None = None,
    openmp: bool = False,
) -> list[npt.NDArray[np.uint16]]: ...
def qmatmul_qtypes() -> list[str]: ...

# qmatmul(openmp=True)'s team: the OpenMP runtime an already-loaded library uses (torch's _C
# extension -> torch's libgomp); attach returns False when there is none and never loads one.
def openmp_attach(path: str) -> bool: ...
def openmp_detach() -> None: ...
def openmp_attached() -> bool: ...
def openmp_regions() -> int: ...  # regions run on the attached team so far

# From this many activation rows (K a multiple of 32) nf4, int8, fp8 and the grouped integers run
# the bf16 GEMM and its numerics (rust/core/src/matmul/reference/bf16.rs); 0 without AVX-512 BF16.
# 12, or 8 where AMX bf16 runs (the small-M tiles, rust/core/src/matmul/x86/amx_bf16_small.rs).
def qmatmul_bf16_min_m() -> int: ...

# From this many rows that bf16 GEMM runs on AMX tiles (Intel, where the process may use them;
# FERROQUANT_MAX_ISA=avx512 turns them off): the same roundings, the tiles' own summation order,
# within a float64 bound (rust/core/src/matmul/x86/amx_bf16.rs) instead of bit-exact; 0: never.
def qmatmul_bf16_amx_min_m() -> int: ...

# From this many rows the ggml format `qtype` (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, q2_k..q6_k,
# iq4_xs) with rows of `k` weights takes that bf16 GEMM on AMX tiles (weights dequantized then
# rounded to bf16): within the tiles' float64 bound instead of the q8 activations' numerics; 0:
# never (no AMX bf16, another format, FERROQUANT_GGML_BF16=0). The K-quants' thresholds depend
# on K (rust/core/src/matmul/k_route.rs).
def qmatmul_bf16_ggml_min_m(qtype: str, k: int) -> int: ...

# The benchmarks' read-bandwidth probe (rust/core/src/matmul/bandwidth.rs): sums data's 8-byte
# words, each pool thread over its own part, `streams` (1, 2, 4, 8) sub-parts in lock step,
# prefetched `ahead` bytes in front; 512-bit loads with AVX-512 unless vector=False.
def stream_read(
    data: npt.NDArray[np.uint8], streams: int = 2, ahead: int = 0, vector: bool = True
) -> int: ...

# GGUF (rust/python/src/gguf.rs)
class GgufFile:
    """An open, memory-mapped GGUF file (v2 or v3); raises FormatError for a malformed one."""

    def __init__(self, path: str | os.PathLike[str]) -> None: ...
    @property
    def version(self) -> int: ...
    @property
    def alignment(self) -> int: ...
    @property
    def data_offset(self) -> int: ...
    @property
    def file_size(self) -> int: ...
    def metadata(self) -> list[tuple[str, str, Any, int]]:
        """[(key, type name such as "uint32" or "array[string]", value, byte offset)]."""
    def tensors(self) -> list[tuple[str, list[int], int, str, int, int, int]]:
        """[(name, ggml dims innermost first, ggml type id, type name, absolute data offset,
        nbytes, n_elements)]."""
    def tensor_data(self, index: int) -> npt.NDArray[np.uint8]:
        """Read-only zero-copy view of a tensor's bytes in the map."""

class GgufWriter:
    """Streaming atomic GGUF v3 writer: header and tensor infos on creation, then tensors in
    order, then finish() (fsync + rename) or abort()."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        metadata: list[tuple[str, tuple[int, Any]]],
        tensors: list[tuple[str, list[int], int]],
    ) -> None: ...
    def next_tensor(self) -> tuple[str, int] | None: ...
    def write_tensor(self, data: npt.NDArray[np.uint8]) -> None: ...
    def flush(self) -> None:
        """Hand the buffered bytes to the operating system (no fsync)."""
    def finish(self) -> None: ...
    def abort(self) -> None: ...
    @property
    def closed(self) -> bool: ...

def ggml_types() -> list[tuple[int, str, int, int]]: ...
def kv_encode(kv_type: str, x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]: ...
def kv_decode(kv_type: str, data: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]: ...
def kv_bytes_per_token(kv_type: str, n_layer: int, n_head_kv: int, head_dim: int) -> int: ...
def kv_attend_decode(
    kv_type: str,
    geometry: Sequence[int],
    k_parts: Sequence[npt.NDArray[np.uint8]],
    v_parts: Sequence[npt.NDArray[np.uint8]],
    tail_k: npt.NDArray[np.float32],
    tail_v: npt.NDArray[np.float32],
    q: npt.NDArray[np.float32],
    scale: float,
    out: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8] | None = None,
    reference: bool = False,
    rotate: bool = False,
) -> None:
    """One decode step's attention over a ferroquant.kv layer cache (torch layout), into out.
    geometry = (group, batch, n_head_kv, head_dim, n_head, n_quant, k_cap, v_cap, tail_cap,
    n_tail). reference: the scalar reference kernel instead of the SIMD one (bit-identical).
    rotate: the cache is stored Walsh-Hadamard rotated (q rotated in a copy, out rotated back)."""

class KvLayerState:
    """One layer of ferroquant.kv's transformers cache for its decode steps (kv/cache.py):
    geometry = (group, batch, n_head_kv, head_dim, n_head, k_cap, v_cap, tail_cap, sinks); the
    parts as in kv_attend_decode; the tails the writable float32 sinks + residual buffers; out
    the contiguous float32 (batch, 1, n_head, head_dim) torch tensor `attend` writes."""

    def __init__(
        self,
        kv_type: str,
        geometry: Sequence[int],
        k_parts: Sequence[npt.NDArray[np.uint8]],
        v_parts: Sequence[npt.NDArray[np.uint8]],
        tail_k: npt.NDArray[np.float32],
        tail_v: npt.NDArray[np.float32],
        rotate: bool,
        float32: object,
        out: object,
    ) -> None: ...
    def push(self, k: object, v: object, n_quant: int, slot: int) -> bool:
        """The step's keys / values (torch, (batch, n_head_kv, 1, head_dim) float32) into tail
        row `slot` (rotated when the cache rotates); False (nothing written) for other tensors."""
    def push_group(self, k: object, v: object, n_quant: int, n_res: int) -> bool:
        """The step that completes a KIVI group: the token written after the n_res residual rows,
        the group (tokens n_quant.., the residual's first group rows) quantized into the next
        free rows of the buffers (the bytes of codecs.encode), the newer rows moved down; False
        (nothing written) where the step is not that case (no rows allocated for the group,
        group 0 under sinks, other tensors)."""
    def ready(self, n_quant: int, n_tail: int) -> bool:
        """Let `attend` read n_quant quantized and n_tail tail positions without a push (the
        step's token already written); False when the tail has fewer rows."""
    def attend(self, query: object, scale: float) -> object | None:
        """The attention output of the step `push` wrote (the `out` tensor), or None when no
        push preceded or the query is not a contiguous float32 (batch, n_head, 1, head_dim)."""

def kv_kivi_encode(
    kv_type: str,
    group: int,
    role: str,
    x: npt.NDArray[np.float32],
    q: npt.NDArray[np.uint8],
    scale: npt.NDArray[np.uint8],
    zero: npt.NDArray[np.uint8],
) -> None:
    """KIVI's group encoder (int4 / int2) in ferroquant.kv's torch layout: float32 states x
    (batch, heads, tokens, head_dim), contiguous, per channel over `group` tokens (role "k") or
    per token over `group` channels ("v"), into contiguous byte buffers (codes, f16 scale, f16
    zero) laid out as codecs.encode's parts; bit-exact with kv/reference.py's kivi_group."""

def kv_wht(*xs: npt.NDArray[np.float32]) -> None:
    """The cache's rotation in place (H x / sqrt(n) per row of the last axis, a contiguous power
    of two; other axes may be strided), bit-exact with kv/reference.py's wht; GIL released."""

def kv_decode_attention_seconds(
    kv_type: str,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    head_dim: int,
    n_pos: int,
    reps: int = 5,
    kv_rotation: bool | str | None = None,
) -> float: ...

class LlamaModel:
    """A llama-architecture GGUF model with a paged KV cache (docs/kv.md)."""

    def __init__(
        self,
        path: str,
        n_ctx: int | None = None,
        kv_type: str = "f32",
        kv_budget: str | None = None,
        kv_rotation: bool | str | None = None,
        kv_sinks: int | None = None,
        kv_residual: int | None = None,
    ) -> None: ...
    def generate_batch(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        stop: list[int] = ...,
    ) -> dict[str, Any]: ...
    @property
    def kv(self) -> dict[str, Any]: ...
    def kv_capacity(self, max_len: int) -> int: ...
    def decode_step_seconds(self, n_seqs: int, n_pos: int, reps: int = 5) -> float: ...
    def forward(self, tokens: list[int], all_logits: bool = False) -> npt.NDArray[np.float32]: ...
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        stop: list[int] = ...,
    ) -> dict[str, Any]: ...
    def reset(self) -> None: ...
    @property
    def n_past(self) -> int: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def load_report(self) -> dict[str, Any]: ...
