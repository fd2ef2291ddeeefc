"""ferroquant.kv's decode-step attention on the quantized rows (`ferroquant_kv`, the native
kv_attend_decode) against the reference path: the same cache dequantized by `codecs.decode`
(the `states_for_attention` path, itself bit-exact with the scalar reference in test_kv.py),
attended in float64. The bound (docs/kv.md): the values attended are the same numbers, the
float32 arithmetic is ordered differently (and for int4 / int2 the zero points are summed
apart: q.k = sum (q s) code + sum q z, o = sum (w s) code + sum w z), so

    |o - o_ref| <= M * (2.5 * D_s + (2 T + D + 8) u),   u = 2^-24,
    D_s = scale * max_t sum_c |q_c| (|k_tc| + 2 Zk) * (D + 3) u / (1 - (D + 3) u),
    M = max|v| + 2 Zv

with Zk, Zv the largest stored key / value zero point (0 for the other types). D_s bounds each
score's error; a score error e moves the softmax weights by a factor within e^(+-2e); the exp,
sum and weighted-sum roundings add (2 T + 8) u relative to M."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tiny_llama
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ferroquant as fq

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ferroquant import _native  # noqa: E402
from ferroquant.kv import QuantizedCache, attention  # noqa: E402
from ferroquant.kv.cache import QuantizedLayer, _Workspace  # noqa: E402
from ferroquant.kv.types import KV_TYPES  # noqa: E402

KINDS = list(KV_TYPES)
U = 2.0**-24
PLAIN = {"sinks": 0, "residual": 0, "rotation": False}  # the KIVI rules without sinks / window


def _states(b: int, h: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, n, d, generator=g) * 2
    v = torch.randn(b, h, n, d, generator=g)
    k[..., ::7] *= 8  # outlier channels, as real keys have
    return k, v


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None):
    """float64 softmax(scale q.k) v with GQA; q (B, Hq, 1, D), k / v (B, H, T, D)."""
    rep = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(rep, dim=1)
    v64 = v.double().repeat_interleave(rep, dim=1)
    s = scale * (q.double() @ k64.transpose(-1, -2))
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v64, s, k64


def _bound(q, k64, v, scale: float, layer) -> float:
    d, t = q.shape[-1], k64.shape[2]
    zk = zv = 0.0
    if layer.kivi and layer.n_quantized:
        kp, vp = layer.stored_parts()
        zk, zv = (p["zero"].float().abs().max().item() for p in (kp, vp))
    gamma = (d + 3) * U / (1 - (d + 3) * U)
    ds = scale * (q.double().abs() @ (k64.abs() + 2 * zk).transpose(-1, -2)).max().item() * gamma
    return (v.abs().max().item() + 2 * zv) * (2.5 * ds + (2 * t + d + 8) * U)


def _decode_step(
    kind: str, b: int, h: int, rep: int, n: int, seed: int, mask=None, group=32, **opts
):
    """A layer filled with n tokens (in two updates), then one decode step: (native output,
    the dequantized K/V the reference path attends, query, scale). `opts`: QuantizedLayer's
    sinks / residual / rotation (default: the type's)."""
    d = 64
    k, v = _states(b, h, n + 1, d, seed)
    layer = QuantizedLayer(kind, _Workspace(), fast_decode=lambda: True, group=group, **opts)
    cut = n // 3
    layer.update(k[:, :, :cut], v[:, :, :cut])
    layer.update(k[:, :, cut:n], v[:, :, cut:n])
    kn, vn = k[:, :, n:], v[:, :, n:]
    tagged, _ = layer.update(kn, vn)
    assert getattr(tagged, attention._TAG) is layer  # the decode step took the native path
    q = torch.randn(b, h * rep, 1, d, generator=torch.Generator().manual_seed(seed + 9))
    scale = d**-0.5
    out = layer.attend_decode(q, kn, vn, mask, scale)
    rk, rv = layer.states_for_attention(kn, vn)
    return out, rk.clone(), rv.clone(), q, scale, layer


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(KINDS),
    st.integers(1, 2),
    st.integers(1, 3),
    st.sampled_from([1, 3]),
    st.integers(1, 140),
    st.integers(0, 1000),
)
def test_native_decode_attention_within_the_bound(kind, b, h, rep, n, seed) -> None:
    out, rk, rv, q, scale, layer = _decode_step(kind, b, h, rep, n, seed)
    ref, _, k64 = _reference(q, rk, rv, scale)
    got = out.transpose(1, 2).double()  # (B, 1, Hq, D) -> (B, Hq, 1, D)
    err = (got - ref).abs().max().item()
    assert err <= _bound(q, k64, rv, scale, layer), (kind, n, err)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["int4", "int2"]),
    st.integers(1, 2),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 300),
    st.sampled_from([32, 64, 128]),
    st.sampled_from([32, 64]),
    st.booleans(),
    st.integers(0, 1000),
)
def test_simd_decode_kernel_is_bit_exact_with_the_scalar_reference(
    kind, b, h, rep, n, d, group, masked, seed
) -> None:
    # the blocked SIMD kernel (rust/core/src/runtime/kv_tensor/simd.rs) performs the scalar
    # reference's float operations in the same order: identical bits, every shape it takes
    assume(d % group == 0)
    k, v = _states(b, h, n + 1, d, seed)
    layer = QuantizedLayer(kind, _Workspace(), fast_decode=lambda: True, group=group)
    layer.update(k[:, :, : n // 2], v[:, :, : n // 2])
    layer.update(k[:, :, n // 2 : n], v[:, :, n // 2 : n])
    kn, vn = k[:, :, n:], v[:, :, n:]
    layer.update(kn, vn)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(b, h * rep, 1, d, generator=gen) * 3
    mask = torch.randint(0, 2, (b, n + 1), generator=gen, dtype=torch.uint8) if masked else None
    fast = layer.attend_decode(q, kn, vn, mask, d**-0.5)
    ref = layer.attend_decode(q, kn, vn, mask, d**-0.5, reference=True)
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32)), (kind, n, d, group)
    # and both are the attention the bound allows
    if not masked:
        rk, rv = layer.states_for_attention(kn, vn)
        want, _, k64 = _reference(q, rk, rv, d**-0.5)
        err = (fast.transpose(1, 2).double() - want).abs().max().item()
        assert err <= _bound(q, k64, rv, d**-0.5, layer)


@pytest.mark.parametrize("kind", ["int4", "q8_0"])
def test_padding_mask_is_honoured(kind: str) -> None:
    b, h, n = 2, 2, 50
    mask = torch.ones(b, n + 1, dtype=torch.bool)
    mask[0, :17] = False  # left padding of the first sequence
    out, rk, rv, q, scale, layer = _decode_step(kind, b, h, 2, n, 3, mask.to(torch.uint8))
    ref, _, k64 = _reference(q, rk, rv, scale, mask)
    err = (out.transpose(1, 2).double() - ref).abs().max().item()
    assert err <= _bound(q, k64, rv, scale, layer)
    # and the mask matters: without it the first sequence differs
    free, *_ = _decode_step(kind, b, h, 2, n, 3, None)
    assert (free[0] - out[0]).abs().max() > 1e-3 and torch.allclose(free[1], out[1])


@pytest.mark.parametrize("kind", ["int4", "int2"])
def test_kivi_group_is_a_parameter(kind: str) -> None:
    # group 64 (what the runtime may adopt): 64-token key groups, 64-channel value groups
    out, rk, rv, q, scale, layer = _decode_step(kind, 1, 2, 3, 150, 8, group=64, **PLAIN)
    assert layer.stored_parts()[0]["q"].shape[2:] == (2, 64 * int(kind[3]) // 8, 64)
    ref, _, k64 = _reference(q, rk, rv, scale)
    err = (out.transpose(1, 2).double() - ref).abs().max().item()
    assert err <= _bound(q, k64, rv, scale, layer)


def test_group_completing_step_attends_its_token_in_full_precision() -> None:
    # 31 tokens, then the 32nd fills the group: the reference path returns it unquantized
    out, rk, rv, q, scale, layer = _decode_step("int2", 1, 2, 2, 31, 5, **PLAIN)
    ref, _, k64 = _reference(q, rk, rv, scale)
    err = (out.transpose(1, 2).double() - ref).abs().max().item()
    assert err <= _bound(q, k64, rv, scale, layer)


def test_bad_buffers_are_a_clear_error() -> None:
    z = np.zeros(0, np.uint8)
    f = np.zeros(64, np.float32)
    out = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="unknown kv_type"):
        _native.kv_attend_decode("int3", [32, 1, 1, 64, 1, 0, 0, 0, 0, 0], [z] * 3, [z] * 3,
                                 f[:0], f[:0], f, 1.0, out)  # fmt: skip
    with pytest.raises(ValueError, match="keys part main has 10 bytes"):
        _native.kv_attend_decode("f16", [32, 1, 1, 64, 1, 1, 1, 1, 0, 0],
                                 [np.zeros(10, np.uint8), z, z], [np.zeros(128, np.uint8), z, z],
                                 f[:0], f[:0], f, 1.0, out)  # fmt: skip
    with pytest.raises(ValueError, match="query has 64 values"):
        _native.kv_attend_decode("f32", [32, 1, 1, 64, 2, 0, 0, 0, 0, 0], [z] * 3, [z] * 3,
                                 f[:0], f[:0], f, 1.0, out)  # fmt: skip


# ----------------------------------------------------------------- inside transformers' generate
@pytest.fixture()
def tiny_model():
    from tiny_llama import make_small_llama

    return make_small_llama()


def _decode_logits(model, kind: str, fast: bool, ids: torch.Tensor, steps: int, mask=None):
    cache = QuantizedCache(model.config, kind, fast_decode=fast)
    return tiny_llama.greedy_logits(model, cache, ids, steps, mask)


@pytest.mark.parametrize("kind", ["f32", "q8_0", "int4"])
def test_generate_fast_decode_matches_the_dequantizing_path(tiny_model, kind, monkeypatch) -> None:
    calls = []
    real = QuantizedLayer.attend_decode
    monkeypatch.setattr(
        QuantizedLayer, "attend_decode", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    native = _count_native_steps(monkeypatch)
    ids = torch.arange(3, 3 + 45).remainder(256).unsqueeze(0)
    slow_seq, slow = _decode_logits(tiny_model, kind, False, ids, 20)
    assert not calls
    fast_seq, fast = _decode_logits(tiny_model, kind, True, ids, 20)
    assert tiny_model.config._attn_implementation == attention.NAME
    # every decode step of both layers, none of the prefill: KIVI steps through the layer's
    # native state (KvLayerState), the others through attend_decode
    assert len(calls) + len(native) == 19 * 2
    assert len(native) == (38 if kind == "int4" else 0)
    # the prefix up to the first different token (float-order ties may differ later)
    same = int((fast_seq == slow_seq).all(0).long().cumprod(0).sum()) - 45
    assert same >= 8
    assert torch.allclose(fast[:, :same], slow[:, :same], atol=2e-4, rtol=0)


def _count_native_steps(monkeypatch) -> list:
    """Make the layers' native states count the decode steps they attend (the list returned)."""
    calls: list = []
    real = _native.KvLayerState

    class Counting:
        def __init__(self, *args) -> None:
            self.st = real(*args)

        def push(self, *args):
            return self.st.push(*args)

        def push_group(self, *args):
            return self.st.push_group(*args)

        def ready(self, *args):
            return self.st.ready(*args)

        def attend(self, *args):
            out = self.st.attend(*args)
            if out is not None:
                calls.append(1)
            return out

    monkeypatch.setattr(_native, "KvLayerState", Counting)
    return calls


def test_fast_decode_false_keeps_the_dequantizing_path_after_a_fast_cache(
    tiny_model, monkeypatch
) -> None:
    """`fast_decode=False` is the dequantizing path even when an earlier fast cache already
    switched the config to `ferroquant_kv` (it did not: the layers asked only the config, so a
    second "slow" run took the native decode; issue 19's "two runs of the same path differ")."""
    calls = []
    real = QuantizedLayer.attend_decode
    monkeypatch.setattr(
        QuantizedLayer, "attend_decode", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    native = _count_native_steps(monkeypatch)
    QuantizedCache(tiny_model.config, "int2")  # switches the config to ferroquant_kv
    assert tiny_model.config._attn_implementation == attention.NAME
    ids = torch.arange(5, 5 + 40).remainder(256).unsqueeze(0)
    _decode_logits(tiny_model, "int2", False, ids, 6)
    assert not calls and not native
    _decode_logits(tiny_model, "int2", True, ids, 6)
    # the fast cache still takes it: every decode step, both layers (through the layers'
    # native state, KvLayerState)
    assert len(calls) + len(native) == 5 * 2 and len(native) == 5 * 2


def test_other_caches_see_no_change(tiny_model) -> None:
    from transformers import DynamicCache

    ids = torch.arange(60).remainder(256).unsqueeze(0)
    with torch.no_grad():
        before = tiny_model.generate(ids, max_new_tokens=12, do_sample=False)
        QuantizedCache(tiny_model.config, "int4")  # switches the config to ferroquant_kv
        after = tiny_model.generate(
            ids, max_new_tokens=12, do_sample=False, past_key_values=DynamicCache()
        )
    assert torch.equal(before, after)


def test_left_padded_batch_and_quantlinear_and_streamer(tiny_model) -> None:
    from transformers.generation.streamers import BaseStreamer

    ids = torch.arange(40).remainder(256).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # left padding
    slow_seq, slow = _decode_logits(tiny_model, "int4", False, ids, 10, mask)
    fast_seq, fast = _decode_logits(tiny_model, "int4", True, ids, 10, mask)
    assert torch.allclose(fast[:, :3], slow[:, :3], atol=2e-4, rtol=0)

    class Count(BaseStreamer):
        n = 0

        def put(self, value):
            self.n += 1

        def end(self):
            pass

    qmodel = fq.quantize_model(copy.deepcopy(tiny_model), "q8_0")
    streamer = Count()
    out = qmodel.generate(
        ids[:1],
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        past_key_values=QuantizedCache(qmodel.config, "int4"),
        streamer=streamer,
    )
    assert out.shape[1] == 48 and streamer.n == 9  # the prompt, then each new token
    assert qmodel.config._attn_implementation == attention.NAME
