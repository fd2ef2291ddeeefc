"""Where a KV cache type's error comes from, and what the KIVI knobs buy: fake-quantized caches
in transformers on SmolLM2-135M-Instruct (the shipped GGUF's weights dequantized to float32),
perplexity and KL against the float32 cache over the first --ctx tokens of lee.cor +
lee_background.cor (kv_hf.py's text).

A diagnostic, not the shipped cache: keys and values are quantized and dequantized in torch
(the runtime's block rules, docs/kv.md) and handed to sdpa. Streaming semantics are kept: the
text is fed in chunks of the key group G, and a token is quantized only once its G-token key
group is complete and at least R newer tokens exist (R = 0: the runtime's KIVI rule), so every
query sees exactly what a token-by-token stream would. Per-token types (fp8, q8_0) do not
depend on the chunking.

Specs (comma-separated `key=value`, one spec per argument):
- per-token types: `k=fp8|fp8search|q8_0|f16,v=...` (fp8: e4m3fn with one f32 scale amax/448
  per 32 values, the runtime's fp8_e4m3; fp8search: the same bytes, the block's scale chosen
  among amax/448 * 2^(-j/16), j < 16, for the least squared error), `rot=1` (Walsh-Hadamard per
  head before quantizing, as `kv_rotation`);
- KIVI: `bits=2` (keys and values; `vbits=` for the values apart), `G=64` (key group, tokens),
  `GV=64` (value group, channels), `R=0` (extra full-precision recent tokens),
  `rot=kv|k|v|none`, `kclip=1` / `vclip=1` (each group's range shrunk about its middle by the
  factor among 1, 0.95, ..., 0.7 with the least squared error: same bytes, another encoder),
  `prerope=1` (KVQuant's pre-RoPE keys: a key group is quantized per channel with the RoPE of
  its positions undone, and RoPE is applied again to the dequantized keys; takes rot=v|none).

Bytes per token (SmolLM2: 30 layers x 3 key/value heads x 64, K and V): codes plus one f16
scale and one f16 zero per group; the full-precision tail (at most R + G - 1 tokens of f16,
23,040 B each) is printed apart and amortized over --ctx.

    python benches/kv_knobs.py --ctx 2048 "k=fp8,v=f16" "bits=2,rot=kv,R=128"
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kv_hf  # noqa: E402

F16_BYTES_PER_TOKEN = 23040  # SmolLM2-135M: 30 x 2 x 3 x 64 x 2
VALUES_PER_TOKEN = 30 * 3 * 64  # of K (and as many of V)
CLIPS = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7]


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // n, n)


def fp8(x: torch.Tensor, search: bool = False) -> torch.Tensor:
    xb = _blocks(x.float(), 32)
    amax = xb.abs().amax(-1, keepdim=True)
    s0 = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    best = err = None
    for j in range(16 if search else 1):
        s = s0 * 2 ** (-j / 16)
        d = (xb / s).to(torch.float8_e4m3fn).float() * s
        e = ((d - xb) ** 2).sum(-1, keepdim=True)
        if best is None:
            best, err = d, e
        else:
            m = e < err
            best, err = torch.where(m, d, best), torch.where(m, e, err)
    return best.reshape(x.shape)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks(x.float(), 32)
    d = (xb.abs().amax(-1, keepdim=True) / 127).half().float()
    q = torch.where(d > 0, (xb / torch.where(d > 0, d, 1)).round().clamp(-127, 127), 0)
    return (q * d).reshape(x.shape)


def asym(x: torch.Tensor, bits: int, dim: int, clip: bool) -> torch.Tensor:
    """KIVI's asymmetric groups along `dim` (f16 scale and zero), optionally range-clipped."""
    levels = 2**bits - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    best = err = None
    for a in CLIPS if clip else [1.0]:
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * a
        s = (2 * half / levels).half().float()
        z = (mid - half).half().float()
        q = ((x - z) / torch.where(s > 0, s, 1)).round().clamp(0, levels)
        d = torch.where(s > 0, q * s + z, z)
        e = ((d - x) ** 2).sum(dim, keepdim=True)
        if best is None:
            best, err = d, e
        else:
            m = e < err
            best, err = torch.where(m, d, best), torch.where(m, e, err)
    return best


def parse(spec: str) -> dict[str, Any]:
    o: dict[str, Any] = {"k": None, "v": None, "bits": None, "vbits": None, "G": 64, "GV": 64}
    o.update(R=0, rot="none", kclip=False, vclip=False, prerope=False)
    for part in filter(None, spec.split(",")):
        key, _, val = part.partition("=")
        if key in ("k", "v", "rot"):
            o[key] = val
        elif key in ("kclip", "vclip", "prerope"):
            o[key] = val == "1"
        else:
            o[key] = int(val)
    if o["rot"] == "1":
        o["rot"] = "kv"
    if o["bits"] is not None and o["vbits"] is None:
        o["vbits"] = o["bits"]
    return o


PER_TOKEN = {"f16": lambda x: x.half().float(), "fp8": fp8, "q8_0": q8_0}
PER_TOKEN["fp8search"] = lambda x: fp8(x, search=True)
PER_TOKEN_BYTES = {"f16": 64, "fp8": 36, "fp8search": 36, "q8_0": 34}  # per 32 values


class FakeQuantCache(DynamicCache):
    """DynamicCache that keeps the exact rows for its bookkeeping but returns `spec`'s
    dequantized rows (streaming semantics, see the module docstring) to attention."""

    def __init__(self, o: dict[str, Any], config: Any, rotary: Any = None) -> None:
        super().__init__(config=config)
        self.o, self.full, self.done = o, {}, {}
        self.h = hadamard(config.head_dim if hasattr(config, "head_dim") else 64)
        self.rotary = rotary  # the model's rotary embedding (prerope)
        if o["prerope"] and o["rot"] in ("kv", "k"):
            raise SystemExit("prerope=1 takes rot=v or rot=none (the keys' RoPE is undone)")

    def _rope(self, k: torch.Tensor, start: int, sign: int) -> torch.Tensor:
        """RoPE at positions start.. (sign 1), or undone (sign -1): the keys' channel pairs
        rotated by +-theta_p, as transformers' apply_rotary_pos_emb."""
        pos = torch.arange(start, start + k.shape[2])[None]
        cos, sin = self.rotary(k, pos)
        half = k.shape[-1] // 2
        rot_half = torch.cat([-k[..., half:], k[..., :half]], -1)
        return k * cos[:, None] + sign * rot_half * sin[:, None]

    def update(self, k: torch.Tensor, v: torch.Tensor, li: int, *a: Any, **kw: Any) -> Any:
        o, h = self.o, self.h
        super().update(k, v, li, *a, **kw)
        k, v = k.float(), v.float()
        rk, rv = o["rot"] in ("kv", "k"), o["rot"] in ("kv", "v")
        if rk:
            k = k @ h
        if rv:
            v = v @ h
        if o["bits"] is None:  # per-token types: every row as stored
            qk = PER_TOKEN[o["k"] or "f16"](k)
            qv = PER_TOKEN[o["v"] or "f16"](v)
            fk, fv = self.full.get(li, (k[:, :, :0], v[:, :, :0]))
            keys, vals = torch.cat([fk, qk], 2), torch.cat([fv, qv], 2)
            self.full[li] = (keys, vals)
        else:
            fk, fv = self.full.get(li, (k[:, :, :0], v[:, :, :0]))
            before = fk.shape[2]
            fk, fv = torch.cat([fk, k], 2), torch.cat([fv, v], 2)
            self.full[li] = (fk, fv)
            dk, dv = self.done.get(li, (k[:, :, :0], v[:, :, :0]))
            g = o["G"]
            while dk.shape[2] < max(before - o["R"], 0) // g * g:
                s = dk.shape[2]
                b, nh, _, d = fk.shape
                kg = fk[:, :, s : s + g]
                if o["prerope"]:  # KVQuant: per-channel groups before RoPE mixes the pairs
                    kg = self._rope(kg, s, -1)
                kq = asym(kg.reshape(b, nh, 1, g, d), o["bits"], 3, o["kclip"])
                kq = kq.reshape(b, nh, g, d)
                if o["prerope"]:
                    kq = self._rope(kq, s, 1)
                vq = asym(_blocks(fv[:, :, s : s + g], o["GV"]), o["vbits"], 4, o["vclip"])
                dk = torch.cat([dk, kq], 2)
                dv = torch.cat([dv, vq.reshape(b, nh, g, d)], 2)
            self.done[li] = (dk, dv)
            n = dk.shape[2]
            keys, vals = torch.cat([dk, fk[:, :, n:]], 2), torch.cat([dv, fv[:, :, n:]], 2)
        if rk:
            keys = keys @ h.T
        if rv:
            vals = vals @ h.T
        return keys, vals


def bytes_per_token(o: dict[str, Any]) -> tuple[float, int]:
    """(bytes per token of the quantized rows, most full-precision tokens held)."""
    if o["bits"] is None:
        per = sum(PER_TOKEN_BYTES[o[r] or "f16"] for r in ("k", "v")) / 32
        return VALUES_PER_TOKEN * per, 0
    bits = o["bits"] + 32 / o["G"] + o["vbits"] + 32 / o["GV"]
    return VALUES_PER_TOKEN * bits / 8, o["R"] + o["G"] - 1


@torch.no_grad()
def log_probs(model: Any, window: torch.Tensor, spec: str | None) -> torch.Tensor:
    o = parse(spec) if spec else None
    rotary = model.model.rotary_emb
    cache = FakeQuantCache(o, model.config, rotary) if o else DynamicCache(config=model.config)
    chunk = o["G"] if o and o["bits"] is not None else 256
    out = []
    for at in range(0, window.numel(), chunk):
        part = window[at : at + chunk].unsqueeze(0)
        out.append(model(part, past_key_values=cache, use_cache=True).logits[0].float())
    return torch.log_softmax(torch.cat(out)[:-1], -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("specs", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models, ids, _ = kv_hf._load(["float"])
    model = models["float"]
    model.config._attn_implementation = "sdpa"
    window = ids[: args.ctx]
    base = log_probs(model, window, None)
    nll = -base.gather(1, window[1:, None]).mean()
    print(f"ctx {args.ctx} float32 cache: ppl {math.exp(nll):.4f} (load {kv_hf.benchlib.load()})")
    for spec in args.specs:
        t = time.time()
        lp = log_probs(model, window, spec)
        ppl = math.exp(-lp.gather(1, window[1:, None]).mean())
        kl = float((base.exp() * (base - lp)).sum(-1).mean())
        bpt, tail = bytes_per_token(parse(spec))
        print(
            f"{spec:42s} ppl {ppl:8.4f} {100 * (ppl / math.exp(nll) - 1):+7.2f}%  KL {kl:.2e}  "
            f"{bpt:6.0f} B/token + tail <= {tail} tokens "
            f"({bpt + tail * F16_BYTES_PER_TOKEN / args.ctx:.0f} B/token at ctx {args.ctx}) "
            f"[{time.time() - t:.0f} s]",
            flush=True,
        )


if __name__ == "__main__":
    main()
