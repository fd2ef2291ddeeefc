"""The native runtime: a Llama-family GGUF model run by the Rust core, no torch needed.

    from ferroquant.runtime import LlamaRuntime
    rt = LlamaRuntime.from_gguf("model.gguf", n_threads=2, n_ctx=2048)
    logits = rt.forward([1, 2, 3])           # float32 (vocab,): the last token's logits
    out = rt.generate(prompt_ids, max_new_tokens=32)   # greedy unless temperature > 0
    tok = load_tokenizer("model.gguf")      # the file's own tokenizer (runtime/tokenizer.py)
    text = generate_text("model.gguf", "Hi", chat=True)["text"]

Weights are used in place from the memory-mapped file when ferroquant's quantized matmul has
a kernel for their qtype (`ferroquant._native.qmatmul_qtypes()`); others are dequantized to f32
once at load (`rt.load_report`). On x86-64 with AVX-512 VNNI the q8_0-valued (q8_0, q5_0),
q4_K and q6_K matrices are copied once at load into 8-row panels for the runtime's own kernels
(the same products bit for bit; FERROQUANT_RUNTIME_PACK=0 keeps them as stored). The KV cache is
a pool of pages of 32 positions under a byte budget, in one of the types of docs/kv.md
(`kv_type`: f32 (default, exact), f16, q8_0, fp8_e4m3, q4_0, int4, int2): `forward` and
`generate` continue one sequence (`reset` frees it), `generate_batch` decodes several prompts
together, new ones waiting while the pool is full. Results do not depend on the thread count.

    rt = LlamaRuntime.from_gguf("model.gguf", kv_type="int4", kv_budget="256MiB")
    out = rt.generate_batch([ids_a, ids_b, ids_c], max_new_tokens=64)   # BatchGeneration
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _native
from .tokenizer import GGUFTokenizer


@dataclass
class Generation:
    tokens: list[int]
    prompt_tokens: int
    prompt_seconds: float
    decode_steps: int
    decode_seconds: float

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _ids(tokens: Iterable[int] | np.ndarray) -> list[int]:
    ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
    if any(t < 0 for t in ids):
        raise ValueError("token ids must be non-negative")
    return ids


@dataclass
class BatchGeneration:
    tokens: list[list[int]]
    prompt_tokens: int
    prompt_seconds: float
    decode_tokens: int
    decode_steps: int
    decode_seconds: float
    max_active: int

    @property
    def decode_tokens_per_second(self) -> float:
        """Aggregate decode speed: tokens of every sequence per second of batched steps."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


KV_TYPES = ("f32", "f16", "q8_0", "fp8_e4m3", "q4_0", "int4", "int2")


class LlamaRuntime:
    """A loaded model plus its paged KV cache."""

    def __init__(self, native: Any, path: str) -> None:
        self._m = native
        self.path = path

    @classmethod
    def from_gguf(
        cls,
        path: str | os.PathLike[str],
        n_threads: int | None = None,
        n_ctx: int | None = 2048,
        kv_type: str = "f32",
        kv_budget: str | int = "512MiB",
        kv_rotation: bool | str | None = None,
        kv_sinks: int | None = None,
        kv_residual: int | None = None,
    ) -> LlamaRuntime:
        """Load a llama-architecture GGUF. `n_threads` sets ferroquant's thread pool (shared by
        the whole process; None leaves it as it is). `n_ctx`: positions a sequence may hold
        (None: the model's training context, at most 4096; more than the training context is an
        error). `kv_type`: the cache type (docs/kv.md). `kv_budget`: the pool's bytes ("512MiB",
        "1GB" or an int); it must hold at least one sequence of `n_ctx` positions. `kv_rotation`:
        rotate K, V and the query per head with a Walsh-Hadamard transform (True / "on"), the
        values only ("values"), or nothing (False / "off"); None: the type's default where
        head_dim is a power of two (docs/kv.md, "Rotation"). `kv_sinks` / `kv_residual` (KIVI
        types only): the first positions kept in f16 for good, and the recent positions kept in
        f16 before a page is quantized; None: the type's default (int2: 4 and 128, int4: 0 and
        0; docs/kv.md, "KIVI sinks and residual")."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such GGUF file: {os.fspath(path)}")
        if n_threads is not None:
            _native.set_num_threads(int(n_threads))
        native = _native.LlamaModel(
            os.fspath(path), n_ctx, str(kv_type), str(kv_budget), kv_rotation, kv_sinks, kv_residual
        )
        return cls(native, os.fspath(path))

    @property
    def kv(self) -> dict[str, Any]:
        """The cache: kv_type, bytes_per_token (of the pages), page_tokens, page_bytes,
        residual_bytes (a sequence's f16 rows at most), kv_sinks, kv_residual, rotation (False,
        True or "values"), budget, charged."""
        return self._m.kv

    def kv_capacity(self, max_len: int) -> int:
        """How many sequences of `max_len` positions the pool holds at once."""
        return self._m.kv_capacity(int(max_len))

    def decode_step_seconds(self, n_seqs: int, n_pos: int, reps: int = 5) -> float:
        """Median seconds of one batched decode step of `n_seqs` sequences, each over `n_pos`
        cached positions filled with pseudo-random rows (a speed probe for benches: no
        prefill; the pool must hold `n_seqs` sequences of `n_pos + reps` positions)."""
        return self._m.decode_step_seconds(int(n_seqs), int(n_pos), int(reps))

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int] | np.ndarray],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Iterable[int] = (),
    ) -> BatchGeneration:
        """Generate for several prompts together: each is admitted with room for
        `len(prompt) + max_new_tokens` positions, prefilled, then decoded with the others in one
        forward pass per step. Finished sequences free their pages at once; while the pool is
        full, the next prompts wait (first come, first served). A prompt that can never fit
        (past n_ctx, or more than the whole budget) raises before any work. Forgets the sequence
        of `forward` / `generate`. Prompt i samples with seed `seed + i`."""
        d = self._m.generate_batch(
            [_ids(p) for p in prompts],
            int(max_new_tokens),
            float(temperature),
            int(top_k),
            int(seed),
            [int(t) for t in stop],
        )
        return BatchGeneration(**d)

    @property
    def config(self) -> dict[str, Any]:
        return self._m.config

    @property
    def load_report(self) -> dict[str, Any]:
        return self._m.load_report

    @property
    def n_past(self) -> int:
        return self._m.n_past

    @property
    def n_ctx(self) -> int:
        return self._m.n_ctx

    def forward(self, tokens: Sequence[int] | np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` at the next positions (appending them to the cache). Returns the last
        token's logits (vocab,) or, with `all_logits`, every token's (n, vocab), float32."""
        return self._m.forward(_ids(tokens), all_logits)

    def generate(
        self,
        prompt_tokens: Sequence[int] | np.ndarray,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Iterable[int] = (),
        reset: bool = True,
    ) -> Generation:
        """Greedy (temperature 0) or seeded temperature/top-k sampling. The prompt runs as one
        batch, then one token per step; stops after a token in `stop`. `reset` starts a fresh
        sequence (else the prompt continues the cached one)."""
        if reset:
            self.reset()
        d = self._m.generate(
            _ids(prompt_tokens),
            int(max_new_tokens),
            float(temperature),
            int(top_k),
            int(seed),
            [int(t) for t in stop],
        )
        return Generation(**d)

    def reset(self) -> None:
        """Forget the sequence."""
        self._m.reset()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LlamaRuntime({self.path!r}, layers={c['n_layer']}, embd={c['n_embd']}, "
            f"heads={c['n_head']}/{c['n_head_kv']}, vocab={c['vocab']}, n_ctx={self.n_ctx}, "
            f"kv_type={self.kv['kv_type']!r})"
        )


def load_tokenizer(path: str | os.PathLike[str]) -> GGUFTokenizer:
    """The GGUF's own tokenizer, built from its `tokenizer.ggml.*` metadata with the `tokenizers`
    library (a fraction of a second; no transformers, gguf-py or torch). See
    `ferroquant.runtime.tokenizer` for the vocabulary and pre-tokenizer types it reads."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such GGUF file: {os.fspath(path)}")
    return GGUFTokenizer.from_gguf(path)


def generate_text(
    path: str | os.PathLike[str],
    prompt: str,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    n_threads: int | None = None,
    n_ctx: int | None = 2048,
    chat: bool = False,
    kv_type: str = "f32",
    kv_budget: str | int = "512MiB",
    kv_rotation: bool | str | None = None,
    kv_sinks: int | None = None,
    kv_residual: int | None = None,
) -> dict[str, Any]:
    """Tokenize `prompt` (through the file's chat template with `chat`, else with BOS when the
    file asks for it), generate until an end-of-generation token (the file's eos / eot / eom)
    or `max_new_tokens`, and decode. Returns the text, the token ids, the speeds and the load
    report."""
    tok = load_tokenizer(path)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    rt = LlamaRuntime.from_gguf(path, n_threads=n_threads, n_ctx=n_ctx, kv_type=kv_type,
                                kv_budget=kv_budget, kv_rotation=kv_rotation, kv_sinks=kv_sinks,
                                kv_residual=kv_residual)  # fmt: skip
    g = rt.generate(ids, max_new_tokens, temperature, top_k, seed, tok.stop_ids)
    text = tok.decode(g.tokens, skip_special_tokens=True)
    return {
        "prompt": prompt,
        "text": text,
        "prompt_token_ids": [int(i) for i in ids],
        "token_ids": g.tokens,
        "prompt_tokens_per_second": g.prompt_tokens_per_second,
        "decode_tokens_per_second": g.decode_tokens_per_second,
        "threads": _native.num_threads(),
        "load_report": rt.load_report["summary"],
        "kv_type": kv_type,
    }


__all__ = [
    "KV_TYPES",
    "BatchGeneration",
    "GGUFTokenizer",
    "Generation",
    "LlamaRuntime",
    "generate_text",
    "load_tokenizer",
]
