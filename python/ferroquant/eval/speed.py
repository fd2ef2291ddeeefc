"""The speed columns of `ferroquant eval`: prompt and decode tokens/s of each row in ferroquant's
native runtime (`ferroquant.runtime.LlamaRuntime` on a GGUF file of the row's weights) and, as
secondary columns, in transformers with QuantLinear.

Each row that GGUF can hold is written with `save_gguf_model` (the row's own bytes; the
baseline's bf16 weights as bf16) into a temporary folder. The speed phase then runs
`speed_runs` rounds; each round visits every row once (rows interleaved), measuring the runtime
(a fresh load, one short warm-up generation, then one timed generation) and transformers (an
untimed and a timed forward over the prompt, then the timed decode steps), the two engines in
alternating order from round to round. Every column is the median over the rounds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..qtypes import qtype_info

__all__ = [
    "SpeedRow",
    "gguf_blocker",
    "measure",
    "runtime_once",
    "torch_decode",
    "torch_prompt",
    "write_gguf",
]


@dataclass
class SpeedRow:
    """One row's engines: the torch model, its GGUF file (None: why not, in `rt_note`)."""

    name: str
    model: Any
    gguf: Path | None
    rt_note: str | None = None
    rt_prompt: list[float] = field(default_factory=list)
    rt_decode: list[float] = field(default_factory=list)
    hf_prompt: list[float] = field(default_factory=list)
    hf_decode: list[float] = field(default_factory=list)
    rt_weights: str | None = None  # the runtime's load report: what the matmuls ran on

    def medians(self) -> dict[str, Any]:
        def med(xs: list[float]) -> float | None:
            return statistics.median(xs) if xs else None

        return {
            "prompt_tps": med(self.rt_prompt),
            "decode_tps": med(self.rt_decode),
            "hf_prompt_tps": med(self.hf_prompt),
            "hf_decode_tps": med(self.hf_decode),
            "runtime_weights": self.rt_weights,
            "runtime_note": self.rt_note,
            "speed_samples": {
                "runtime_prompt": self.rt_prompt,
                "runtime_decode": self.rt_decode,
                "transformers_prompt": self.hf_prompt,
                "transformers_decode": self.hf_decode,
            },
        }


# The native runtime's KV cache keeps whole 32-value blocks along head_dim, every type included.
KV_GROUP = 32


def gguf_blocker(model: Any) -> str | None:
    """Why `model`'s quantized layers cannot go into a GGUF file (qtypes GGUF has no type for),
    or None."""
    from ..nn import QuantLinear

    q = sorted({m.qtype for m in model.modules() if isinstance(m, QuantLinear)})
    bad = [t for t in q if qtype_info(t).ggml_id is None]
    if bad:
        return f"GGUF has no type for {', '.join(bad)}; the runtime loads GGUF files only"
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (
        getattr(cfg, "hidden_size", 0) // heads if heads else None
    )
    if head_dim is not None and head_dim % KV_GROUP:
        return (
            f"the runtime's KV cache stores blocks of {KV_GROUP} along head_dim "
            f"(docs/kv.md); this model's head_dim is {head_dim}"
        )
    return None


def write_gguf(model: Any, path: Path, tokenizer: Any) -> str | None:
    """Write `model` to `path` for the runtime; returns None, or why it could not."""
    reason = gguf_blocker(model)
    if reason is not None:
        return reason
    from ..models.gguf_model import save_gguf_model

    try:
        try:
            save_gguf_model(model, path, tokenizer=tokenizer)
        except ValueError as e:
            if "pre-tokenizer not recognized" not in str(e):
                raise
            # the runtime is given token ids and never tokenizes: any pre-tokenizer name will do
            # in this temporary file
            save_gguf_model(model, path, tokenizer=tokenizer, tokenizer_pre="gpt-2")
    except (ValueError, OSError, KeyError) as e:  # an architecture or tokenizer it cannot write
        return f"no GGUF file: {e}"
    return None


def runtime_once(
    path: Path, prompt: list[int], n_decode: int, threads: int
) -> tuple[float, float, str]:
    """(prompt tok/s, decode tok/s, load report) of one fresh load of `path`: a short warm-up
    generation (touches every weight), then `prompt` as one forward and `n_decode` decode steps."""
    from ..runtime import LlamaRuntime

    rt = LlamaRuntime.from_gguf(path, n_threads=threads, n_ctx=len(prompt) + n_decode + 1)
    try:
        rt.generate(prompt[: min(8, len(prompt))], 2)
        # max_new_tokens = n + 1: the last token is picked, not fed back, so n decode steps
        g = rt.generate(prompt, n_decode + 1)
        return g.prompt_tokens_per_second, g.decode_tokens_per_second, rt.load_report["summary"]
    finally:
        del rt


def torch_prompt(model: Any, prompt: Any, clock: Any = time.perf_counter) -> float:
    """Tokens/s of one forward over `prompt` (1-D ids), no cache, timed by `clock` right after
    one untimed forward of the same model over the same prompt.

    Why the untimed one: in `measure` the call before this one is the other engine's (the
    native runtime, which for the bf16 row first dequantizes every matrix to f32) or another
    row's decode, so a lone timed forward measured whatever state that left (torch's OpenMP
    workers asleep, caches and allocator state of another engine, oneDNN's primitives for a
    new prompt length): session 12's eval read its bf16 row at 1151 tok/s where
    bench_hf_prompt's forwards read 1578 on the same machine. Timing the second of two
    forwards of the same row is a user's steady state; bench_hf_prompt times the same two
    forwards."""
    import torch

    with torch.inference_mode():
        model(input_ids=prompt[None], use_cache=False)
        t0 = clock()
        model(input_ids=prompt[None], use_cache=False)
        dt = clock() - t0
    return prompt.shape[0] / dt


def torch_decode(model: Any, prompt: Any, n_decode: int) -> tuple[float, list[int]]:
    """Tokens/s of `n_decode` greedy steps with the KV cache after `prompt` (not timed)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=prompt[None], use_cache=True)
        past, nxt = out.past_key_values, out.logits[0, -1].argmax()
        tokens = []
        t0 = time.perf_counter()
        for _ in range(n_decode):
            out = model(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[0, -1].argmax()
            tokens.append(int(nxt))
        dt = time.perf_counter() - t0
    return n_decode / dt, tokens


def measure(
    rows: list[SpeedRow],
    prompt: Any,
    n_decode: int,
    threads: int,
    runs: int,
    bar: Any = None,
) -> None:
    """`runs` rounds over `rows` (interleaved), filling each row's samples."""
    ids = [int(t) for t in prompt.tolist()]
    for r in range(runs):
        for row in rows:

            def rt(row: SpeedRow = row) -> None:
                if row.gguf is None:
                    return
                p, d, report = runtime_once(row.gguf, ids, n_decode, threads)
                row.rt_prompt.append(p)
                row.rt_decode.append(d)
                row.rt_weights = report

            def hf(row: SpeedRow = row) -> None:
                row.hf_prompt.append(torch_prompt(row.model, prompt))
                row.hf_decode.append(torch_decode(row.model, prompt, n_decode)[0])

            for engine in (rt, hf) if r % 2 == 0 else (hf, rt):
                engine()
            if bar is not None:
                bar.update(1)
