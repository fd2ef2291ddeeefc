"""Where a KV cache type's error comes from, and what the KIVI knobs buy: fake-quantized caches
in transformers on SmolLM2-135M-Instruct (the shipped GGUF's weights dequantized to float32),
perplexity and KL against the float32 cache over the first --ctx tokens of lee.cor +
lee_background.cor (kv_hf.py's text); `--weights q8_0` (or another format) runs the same on
QuantLinear copies of those weights.

A diagnostic, not the shipped cache: keys and values are quantized and dequantized in torch
(the runtime's block rules, docs/kv.md) and handed to sdpa. Streaming semantics are kept: the
text is fed in chunks of the key group G, and a token is quantized only once its G-token key
group is complete and at least R newer tokens exist (R = 0: the runtime's KIVI rule), so every
query sees exactly what a token-by-token stream would. Per-token types (fp8, q8_0) do not
depend on the chunking.

Specs (comma-separated `key=value`, one spec per argument):
- per-token types: `k=fp8|fp8search|fp8head|fp8chan|q8_0|f16,v=...` (fp8: e4m3fn with one f32
  scale amax/448 per 32 values, the runtime's fp8_e4m3; fp8search: the same bytes, the block's
  scale chosen among amax/448 * 2^(-j/16), j < 16, for the least squared error; fp8head: one
  scale per token and head; fp8chan: one scale per channel and 32-token page, see fp8_scaled),
  `rot=1` (Walsh-Hadamard per head before quantizing, as `kv_rotation`);
- KIVI: `bits=2` (keys and values; `vbits=` for the values apart), `G=64` (key group, tokens),
  `GV=64` (value group, channels), `R=0` (extra full-precision recent tokens),
  `rot=kv|k|v|none`, `kclip=1` / `vclip=1` (each group's range shrunk about its middle by the
  factor among 1, 0.95, ..., 0.7 with the least squared error: same bytes, another encoder),
  `prerope=1` (KVQuant's pre-RoPE keys: a key group is quantized per channel with the RoPE of
  its positions undone, and RoPE is applied again to the dequantized keys; takes rot=v|none),
  `S=4` (attention sinks: the first S tokens kept in f16, left out of their group's range),
  `ok=20` / `ov=1` (dense-and-sparse: that many outliers per key group of one head (G x 64
  entries) / per value vector of one head (64 entries) kept in f16 with their index, chosen
  greedily to shrink their groups' ranges most, which then exclude them), `knuq=1` / `vnuq=1`
  (KVQuant's non-uniform quantization: a 2^bits-level codebook per layer on the group's range
  mapped to [-1, 1], fitted by k-means weighted by the group's half-range squared (the squared
  error in the cache's units) on --calib-tokens of lee_background.cor's end, past every
  evaluation window; `=2`: the end levels pinned at -1 and 1), `exact=0-4+29` (a diagnostic:
  those layers' caches kept exact).

Bytes per token (SmolLM2: 30 layers x 3 key/value heads x 64, K and V): codes plus one f16
scale and one f16 zero per group; the full-precision tail (at most R + G - 1 tokens of f16,
23,040 B each, plus S sink tokens) is printed apart and amortized over --ctx. Outliers add
their f16 value and index (4 B a key, 3 B a value) to the rows.

    python benches/kv_knobs.py --ctx 2048 "k=fp8,v=f16" "bits=2,rot=kv,R=128"
    python benches/kv_knobs.py --ctx 4096 "bits=2,prerope=1,rot=v,vclip=1,G=32,GV=32,R=156,S=4"
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


def fp8_scaled(x: torch.Tensor, scale_over: str) -> torch.Tensor:
    """e4m3fn with the scale (amax / 448, f32) taken over another set of values than fp8's 32 of
    one token: `head` (the head_dim values of one token and head), `channel` (one channel over
    a page of 32 tokens: the page's scale, as vLLM's / TensorRT's fp8 caches pick a scale per
    tensor; an oracle where a chunk's page is not yet complete in a stream)."""
    b, h, n, d = x.shape
    x = x.float()
    if scale_over == "head":
        amax = x.abs().amax(-1, keepdim=True)
        s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
        return (x / s).to(torch.float8_e4m3fn).float() * s
    pad = -n % 32  # zeros leave a channel's amax unchanged
    xp = torch.cat([x, x.new_zeros(b, h, pad, d)], 2).reshape(b, h, -1, 32, d)
    amax = xp.abs().amax(3, keepdim=True)
    s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    q = (xp / s).to(torch.float8_e4m3fn).float() * s
    return q.reshape(b, h, -1, d)[:, :, :n]


def q8_0(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks(x.float(), 32)
    d = (xb.abs().amax(-1, keepdim=True) / 127).half().float()
    q = torch.where(d > 0, (xb / torch.where(d > 0, d, 1)).round().clamp(-127, 127), 0)
    return (q * d).reshape(x.shape)


def asym(
    x: torch.Tensor,
    bits: int,
    dim: int,
    clip: bool,
    keep: torch.Tensor | None = None,
    book: torch.Tensor | None = None,
    collect: list | None = None,
) -> torch.Tensor:
    """KIVI's asymmetric groups along `dim` (f16 scale and zero), optionally range-clipped.
    `keep` (bool, x's shape): entries stored apart in f16 (outliers, sink tokens), left out of
    the group's range. `book`: a non-uniform codebook of 2^bits levels in [-1, 1] (the group's
    range mapped to [-1, 1]) instead of the uniform grid. `collect`: receives the normalized
    entries and their weights (half-range squared: the squared error in x's units) for a
    codebook fit."""
    levels = 2**bits - 1
    if keep is None:
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    else:
        inf = torch.tensor(float("inf"))
        lo = torch.where(keep, inf, x).amin(dim, keepdim=True)
        hi = torch.where(keep, -inf, x).amax(dim, keepdim=True)
        empty = ~torch.isfinite(lo)  # a group made only of kept entries
        lo, hi = torch.where(empty, 0, lo), torch.where(empty, 0, hi)
    best = err = None
    for a in CLIPS if clip else [1.0]:
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * a
        if book is None:
            s = (2 * half / levels).half().float()
            z = (mid - half).half().float()
            q = ((x - z) / torch.where(s > 0, s, 1)).round().clamp(0, levels)
            d = torch.where(s > 0, q * s + z, z)
        else:  # f16 mid and half-range; each entry to the nearest level
            m16, h16 = mid.half().float(), half.half().float()
            u = (x - m16) / torch.where(h16 > 0, h16, 1)
            c = book[(u.unsqueeze(-1) - book).abs().argmin(-1)]
            d = torch.where(h16 > 0, m16 + h16 * c, m16)
            if collect is not None and a == 1.0:
                w = (h16**2).expand_as(x)
                sel = ~keep if keep is not None else torch.ones_like(x, dtype=torch.bool)
                sel = sel & (h16 > 0).expand_as(x)
                collect.append((u[sel].flatten(), w[sel].flatten()))
        if keep is not None:
            d = torch.where(keep, x.half().float(), d)
        e = ((d - x) ** 2).sum(dim, keepdim=True)
        if best is None:
            best, err = d, e
        else:
            m = e < err
            best, err = torch.where(m, d, best), torch.where(m, e, err)
    return best


def outliers(x: torch.Tensor, n: int) -> torch.Tensor:
    """Dense-and-sparse: the n entries per block of x [blocks, groups, entries] whose removal
    shrinks the groups' ranges most (greedy: each step drops one group's current minimum or
    maximum, whichever lowers that group's squared range most). Returns the bool mask."""
    nb, ng, m = x.shape
    srt, order = x.sort(-1)
    lo = torch.zeros(nb, ng, dtype=torch.int64)
    hi = torch.full((nb, ng), m - 1, dtype=torch.int64)
    at = torch.arange(nb)
    for _ in range(n):
        g = lambda i: srt.gather(-1, i.unsqueeze(-1)).squeeze(-1)  # noqa: E731
        r2 = (g(hi) - g(lo)) ** 2
        ok = hi - lo > 1
        gain_hi = torch.where(ok, r2 - (g((hi - 1).clamp(min=0)) - g(lo)) ** 2, -1.0)
        gain_lo = torch.where(ok, r2 - (g(hi) - g((lo + 1).clamp(max=m - 1))) ** 2, -1.0)
        both = torch.cat([gain_hi, gain_lo], 1)
        pick = both.argmax(1)
        grp, is_lo = pick % ng, pick >= ng
        hi[at, grp] -= (~is_lo).long()
        lo[at, grp] += is_lo.long()
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(m).expand(nb, ng, m).contiguous())
    return (rank < lo.unsqueeze(-1)) | (rank > hi.unsqueeze(-1))


def fit_book(samples: list, levels: int, pinned: bool, iters: int = 40) -> torch.Tensor:
    """Weighted 1-D k-means (Lloyd) of normalized entries: the codebook, sorted, in [-1, 1];
    `pinned`: the end levels stay at -1 and 1 (each group's minimum and maximum stay exact)."""
    u = torch.cat([a for a, _ in samples])
    w = torch.cat([b for _, b in samples])
    book = torch.linspace(-1, 1, levels)
    for _ in range(iters):
        idx = (u.unsqueeze(-1) - book).abs().argmin(-1)
        num = torch.zeros(levels).index_add_(0, idx, u * w)
        den = torch.zeros(levels).index_add_(0, idx, w)
        book = torch.where(den > 0, num / den.clamp(min=1e-30), book)
        if pinned:
            book[0], book[-1] = -1.0, 1.0
    return book.sort().values


def parse(spec: str) -> dict[str, Any]:
    o: dict[str, Any] = {"k": None, "v": None, "bits": None, "vbits": None, "G": 64, "GV": 64}
    o.update(R=0, rot="none", kclip=False, vclip=False, prerope=False)
    o.update(S=0, ok=0, ov=0, knuq=0, vnuq=0, exact="")
    for part in filter(None, spec.split(",")):
        key, _, val = part.partition("=")
        if key in ("k", "v", "rot", "exact"):
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
PER_TOKEN["fp8head"] = lambda x: fp8_scaled(x, "head")
PER_TOKEN["fp8chan"] = lambda x: fp8_scaled(x, "channel")
# per 32 values (fp8head: one f32 scale per 64-value head, fp8chan: per channel and 32 tokens)
PER_TOKEN_BYTES = {"f16": 64, "fp8": 36, "fp8search": 36, "fp8head": 34, "fp8chan": 36, "q8_0": 34}


class FakeQuantCache(DynamicCache):
    """DynamicCache that keeps the exact rows for its bookkeeping but returns `spec`'s
    dequantized rows (streaming semantics, see the module docstring) to attention."""

    def __init__(self, o: dict[str, Any], config: Any, rotary: Any = None) -> None:
        super().__init__(config=config)
        self.o, self.full, self.done = o, {}, {}
        self.h = hadamard(config.head_dim if hasattr(config, "head_dim") else 64)
        self.rotary = rotary  # the model's rotary embedding (prerope)
        self.exact: set[int] = set()
        for part in filter(None, o["exact"].split("+")):  # layers kept exact: "0-4+29"
            a, _, b = part.partition("-")
            self.exact.update(range(int(a), int(b or a) + 1))
        self.books: dict[tuple[str, int], torch.Tensor] = {}  # (k|v, layer) -> codebook
        self.collect: dict[tuple[str, int], list] | None = None  # set for a calibration run
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

    def _quant(self, kind: str, x: torch.Tensor, dim: int, keep: Any, li: int) -> torch.Tensor:
        o = self.o
        nuq = o["knuq"] if kind == "k" else o["vnuq"]
        book = self.books.get((kind, li)) if nuq else None
        col = None
        if nuq and self.collect is not None:
            col = self.collect.setdefault((kind, li), [])
            book = torch.linspace(-1, 1, 2 ** o["bits" if kind == "k" else "vbits"])
        bits = o["bits"] if kind == "k" else o["vbits"]
        clip = o["kclip"] if kind == "k" else o["vclip"]
        return asym(x, bits, dim, clip, keep, book, col)

    def _keys(self, kg: torch.Tensor, s: int, li: int) -> torch.Tensor:
        """One key group [b, heads, G, d] (tokens s..): per channel over the G tokens; sink
        tokens and `ok` outliers per head and group kept apart."""
        o = self.o
        b, nh, g, d = kg.shape
        x = kg.permute(0, 1, 3, 2).reshape(b * nh, d, g)  # groups = channels, entries = tokens
        keep = torch.zeros_like(x, dtype=torch.bool)
        if o["S"] > s:
            keep[:, :, : o["S"] - s] = True
        if o["ok"]:  # sink entries stand in as a plain token's, never picked for their range
            plain = x[..., max(o["S"] - s, 0) :][..., :1]
            keep |= outliers(torch.where(keep, plain, x), o["ok"]) & ~keep
        q = self._quant("k", x, 2, keep if keep.any() else None, li)
        return q.reshape(b, nh, d, g).permute(0, 1, 3, 2)

    def _values(self, vg: torch.Tensor, s: int, li: int) -> torch.Tensor:
        """The values of G tokens [b, heads, G, d]: per token over GV channels; sink tokens and
        `ov` outliers per token and head kept apart."""
        o = self.o
        b, nh, g, d = vg.shape
        x = vg.reshape(b * nh * g, d // o["GV"], o["GV"])
        keep = torch.zeros_like(x, dtype=torch.bool)
        if o["S"] > s:
            keep.view(b, nh, g, -1)[:, :, : o["S"] - s] = True
        if o["ov"]:
            keep |= outliers(x, o["ov"])
        q = self._quant("v", x, 2, keep if keep.any() else None, li)
        return q.reshape(b, nh, g, d)

    def update(self, k: torch.Tensor, v: torch.Tensor, li: int, *a: Any, **kw: Any) -> Any:
        o, h = self.o, self.h
        exact_k, exact_v = super().update(k, v, li, *a, **kw)
        if li in self.exact:  # a diagnostic: this layer's cache kept exact
            return exact_k, exact_v
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
                kq = self._keys(kg, s, li).reshape(b, nh, g, d)
                if o["prerope"]:
                    kq = self._rope(kq, s, 1)
                vq = self._values(fv[:, :, s : s + g], s, li)
                dk = torch.cat([dk, kq], 2)
                dv = torch.cat([dv, vq], 2)
            self.done[li] = (dk, dv)
            n = dk.shape[2]
            keys, vals = torch.cat([dk, fk[:, :, n:]], 2), torch.cat([dv, fv[:, :, n:]], 2)
        if rk:
            keys = keys @ h.T
        if rv:
            vals = vals @ h.T
        return keys, vals


def bytes_per_token(o: dict[str, Any]) -> tuple[float, int]:
    """(bytes per token of the quantized rows, most full-precision tokens held). Outliers cost
    their f16 value plus an index: 2 bytes for a key (one of G x 64 entries of a head's group),
    1 byte for a value (one of a head's 64 channels); sink tokens are held in f16 like the
    tail; a codebook (4 f16 levels per layer, K and V) is 480 bytes per model, not counted."""
    if o["bits"] is None:
        per = sum(PER_TOKEN_BYTES[o[r] or "f16"] for r in ("k", "v")) / 32
        return VALUES_PER_TOKEN * per, 0
    bits = o["bits"] + 32 / o["G"] + o["vbits"] + 32 / o["GV"]
    heads = VALUES_PER_TOKEN // 64  # layers x key/value heads
    sparse = heads * (o["ok"] * 4 / o["G"] + o["ov"] * 3)
    return VALUES_PER_TOKEN * bits / 8 + sparse, o["R"] + o["G"] - 1 + o["S"]


@torch.no_grad()
def log_probs(
    model: Any, window: torch.Tensor, spec: str | None, calib: torch.Tensor | None = None
) -> torch.Tensor:
    o = parse(spec) if spec else None
    rotary = model.model.rotary_emb
    chunk = o["G"] if o and o["bits"] is not None else 256

    def run(text: torch.Tensor, cache: Any) -> torch.Tensor:
        out = []
        for at in range(0, text.numel(), chunk):
            part = text[at : at + chunk].unsqueeze(0)
            out.append(model(part, past_key_values=cache, use_cache=True).logits[0].float())
        return torch.log_softmax(torch.cat(out)[:-1], -1)

    if o is None:
        return run(window, DynamicCache(config=model.config))
    books = {}
    if o["knuq"] or o["vnuq"]:  # fit the codebooks on the calibration text first
        cal = FakeQuantCache(o, model.config, rotary)
        cal.collect = {}
        run(calib, cal)
        levels = {"k": 2 ** o["bits"], "v": 2 ** o["vbits"]}
        pin = {"k": o["knuq"] == 2, "v": o["vnuq"] == 2}
        books = {key: fit_book(s, levels[key[0]], pin[key[0]]) for key, s in cal.collect.items()}
        for kind in ("k", "v"):
            if o[kind + "nuq"]:
                mean = torch.stack([b for key, b in books.items() if key[0] == kind]).mean(0)
                print(f"  {kind} codebooks, mean over layers: {[round(float(c), 3) for c in mean]}")
    cache = FakeQuantCache(o, model.config, rotary)
    cache.books = books
    return run(window, cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default="float", help="float, or a format: q8_0, q4_k_m")
    ap.add_argument("--calib-tokens", type=int, default=2048, help="codebook fit (knuq/vnuq)")
    ap.add_argument("specs", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models, ids, _ = kv_hf._load([args.weights])
    model = models[args.weights]
    model.config._attn_implementation = "sdpa"
    window = ids[: args.ctx]
    calib = ids[-args.calib_tokens :]  # lee_background.cor's end: past every evaluation window
    assert ids.numel() - args.calib_tokens >= max(args.ctx, 4096), "calibration overlaps"
    base = log_probs(model, window, None)
    nll = -base.gather(1, window[1:, None]).mean()
    print(f"ctx {args.ctx} float32 cache: ppl {math.exp(nll):.4f} (load {kv_hf.benchlib.load()})")
    for spec in args.specs:
        t = time.time()
        lp = log_probs(model, window, spec, calib)
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
