"""ferroquant.kv: the scalar references against the peers that define the formats (libggml and
ferroquant's own quantizers for q8_0 / q4_0, torch's cast through ferroquant's fp8 format,
numpy's float16), the torch fast path bit-exact against the references, the cache's invariants
(quantized once, never re-quantized; chunking does not matter; beam reordering), and
QuantizedCache inside transformers' generate."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
from ferroquant.kv import reference as R
from ferroquant.kv.types import KV_TYPES, kivi_group, kv_bytes_per_token, kv_cache_bytes

import peers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ferroquant.kv import QuantizedCache, codecs  # noqa: E402

KINDS = list(KV_TYPES)


def _data(shape: tuple[int, ...], seed: int = 0, scale: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * scale
    x.flat[::97] *= 40  # outliers, as real keys have
    return x


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ----------------------------------------------------------------- references against peers
def _ref_blocks(x: np.ndarray, group_fn) -> np.ndarray:
    """ggml block bytes (f16 d, then the quants) of every 32-value block of x, row-major."""
    out = []
    for row in x:
        for g in range(0, row.size, 32):
            d, qs = group_fn(row[g : g + 32])
            out.append(np.frombuffer(np.float16(d).tobytes(), np.uint8))
            out.append(qs.view(np.uint8))
    return np.concatenate(out)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_reference_ggml_blocks_match_libggml_and_ferroquant(qtype: str) -> None:
    x = _data((6, 128), seed=1)
    x[0, :32] = 0.0  # an all-zero block: d = 0
    x[1, :32] = np.linspace(-2, 2, 32)  # +-max tie: the first one wins
    fn = R.q8_0_group if qtype == "q8_0" else R.q4_0_group
    ours = _ref_blocks(x, fn)
    peers.check_bytes(ours, peers.ggml_quantize(x, qtype), qtype, "reference vs libggml")
    peers.check_bytes(ours, fq.quantize(x, qtype).data, qtype, "reference vs ferroquant")
    deq = fq.dequantize(fq.quantize(x, qtype))
    ref = np.stack(
        [np.concatenate([R.roundtrip(qtype, r[g : g + 32]) for g in range(0, 128, 32)]) for r in x]
    )
    assert np.array_equal(_bits(ref), _bits(deq))


def test_reference_fp8_matches_ferroquant_fp8_blocks_of_32() -> None:
    x = _data((5, 96), seed=2)
    x[0, :32] = 0.0
    qt = fq.quantize(x, "fp8_e4m3", block_size=32, scale_mode="block")
    scales, codes = [], []
    for row in x:
        for g in range(0, 96, 32):
            s, q = R.fp8_group(row[g : g + 32])
            scales.append(s)
            codes.append(q)
    assert np.array_equal(
        np.asarray(scales, np.float32).view(np.uint32),
        np.asarray(qt.scales, np.float32).reshape(-1).view(np.uint32),
    )
    assert np.array_equal(np.concatenate(codes), qt.data)
    ref = np.stack(
        [
            np.concatenate([R.roundtrip("fp8_e4m3", r[g : g + 32]) for g in range(0, 96, 32)])
            for r in x
        ]
    )
    assert np.array_equal(_bits(ref), _bits(fq.dequantize(qt)))


def test_reference_f16_is_ieee_half() -> None:
    x = _data((32,), seed=3)
    assert np.array_equal(R.roundtrip("f16", x), x.astype(np.float16).astype(np.float32))
    t = torch.from_numpy(x).half().float().numpy()  # torch's cast: the same round-to-nearest-even
    assert np.array_equal(_bits(R.roundtrip("f16", x)), _bits(t))


def test_roundf_is_half_away_from_zero() -> None:
    assert [R.roundf(np.float32(v)) for v in (0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997)] == [
        1,
        2,
        3,
        -1,
        -3,
        0,
    ]


# ------------------------------------------------------------ fast path against the reference
def _reference_states(kind: str, x: np.ndarray, role: str, group: int = 32) -> np.ndarray:
    """The reference's values for states x; `group` is the KIVI group (the others use 32)."""
    b, h, n, d = x.shape
    out = np.empty_like(x)
    g = group if kind in ("int4", "int2") else 32
    for i in range(b):
        for j in range(h):
            if kind in ("int4", "int2") and role == "k":
                for t in range(0, n, g):
                    for c in range(d):
                        out[i, j, t : t + g, c] = R.roundtrip(kind, x[i, j, t : t + g, c])
            else:
                for t in range(n):
                    for c in range(0, d, g):
                        out[i, j, t, c : c + g] = R.roundtrip(kind, x[i, j, t, c : c + g])
    return out


@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("kind", KINDS)
def test_codecs_bit_exact_with_reference(kind: str, role: str) -> None:
    x = _data((2, 2, 64, 64), seed=4)
    x[0, 0, :32, :] = 1.25  # a constant group: scale 0
    x[1, 1, 3, :32] = 0.0
    out = torch.empty(x.shape)
    codecs.decode(kind, codecs.encode(kind, torch.from_numpy(x), role), out, role)
    assert np.array_equal(_bits(out.numpy()), _bits(_reference_states(kind, x, role)))


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["int4", "int2"]),
    role=st.sampled_from(["k", "v"]),
    group=st.sampled_from([32, 64]),
    groups=st.integers(1, 3),
    heads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    special=st.sampled_from(["none", "constant", "signed_zero", "huge", "tiny"]),
)
def test_native_kivi_encoder_is_bit_exact_with_torch_and_the_reference(
    kind: str, role: str, group: int, groups: int, heads: int, seed: int, special: str
) -> None:
    """The native group encoder (the CPU path of codecs.encode) against the torch ops (the
    other devices' path) byte for byte, and its values against the scalar reference."""
    bits = int(kind[3])
    n, d = (group * groups, 64) if role == "k" else (5, group * groups)
    x = _data((1, heads, n, d), seed=seed)
    if special == "constant":
        x[0, 0, :group, :group] = -2.5
    elif special == "signed_zero":
        x[0, -1, :group, :group] = -0.0
    elif special == "huge":
        x[0, 0, 1, :] *= 3e4  # ranges past f16's: the clamped scale
    elif special == "tiny":
        x[0, -1] *= 1e-7  # f16 subnormal scales
    xt = torch.from_numpy(x)
    fast = codecs._encode_kivi_native(xt, bits, role, group)
    slow = codecs._encode_kivi_torch(xt, bits, role, group)
    for name in ("q", "scale", "zero"):
        assert fast[name].shape == slow[name].shape, name
        assert torch.equal(fast[name].view(torch.uint8), slow[name].view(torch.uint8)), name
    out = torch.empty(x.shape)
    codecs.decode(kind, fast, out, role, group)
    assert np.array_equal(_bits(out.numpy()), _bits(_reference_states(kind, x, role, group)))


def test_native_kivi_encoder_rejects_bad_buffers() -> None:
    from ferroquant import _native

    x = np.zeros((1, 1, 64, 64), np.float32)
    q, s = np.zeros(64 * 32, np.uint8), np.zeros(128, np.uint8)
    with pytest.raises(fq.QuantizeError, match="code bytes"):
        _native.kv_kivi_encode("int4", 64, "k", x, q[:-1], s, s.copy())
    with pytest.raises(fq.QuantizeError, match="not a KIVI type"):
        _native.kv_kivi_encode("q4_0", 64, "k", x, q, s, s.copy())
    with pytest.raises(fq.QuantizeError, match="role"):
        _native.kv_kivi_encode("int4", 64, "x", x, q, s, s.copy())
    with pytest.raises(fq.QuantizeError, match="multiple of the group"):
        _native.kv_kivi_encode("int4", 64, "k", x[:, :, :32], q, s, s.copy())


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("amax", [1.3e-40, 1e-39, 1.1e-38, 1.2e-38])
def test_subnormal_blocks_match_the_reference_and_the_runtime(kind: str, amax: float) -> None:
    """A block whose largest value is subnormal: 1/d overflows to inf, and ggml's C cast of
    inf / NaN gives code 0 on x86-64. The torch fast path, the reference and the runtime's
    Rust block agree bit for bit (hypothesis found the reference raising here)."""
    from ferroquant import _native

    x = np.zeros((1, 1, 2, 32), np.float32)
    x[0, 0, 0, [3, 5, 7]] = [-amax, amax / 3, amax / 2]
    x[0, 0, 1, [0, 9]] = [amax, -amax / 4]
    out = torch.empty(x.shape)
    codecs.decode(kind, codecs.encode(kind, torch.from_numpy(x)), out)
    want = _reference_states(kind, x, "k")
    assert np.array_equal(_bits(out.numpy()), _bits(want))
    flat = x.reshape(-1)
    assert np.array_equal(
        _bits(_native.kv_decode(kind, _native.kv_encode(kind, flat))), _bits(want.reshape(-1))
    )


@pytest.mark.parametrize("kind", KINDS)
def test_stored_bytes_per_token_match_the_formula(kind: str) -> None:
    """The formula in types.py (what `ferroquant kv-size` prints) is what the codecs store."""
    x = torch.from_numpy(_data((1, 3, 64, 64), seed=5))
    stored = sum(
        t.numel() * t.element_size()
        for role in "kv"
        for t in codecs.encode(kind, x, role, kivi_group(64)).values()
    )
    shape = {"num_hidden_layers": 1, "num_attention_heads": 3, "hidden_size": 192}
    assert stored == 64 * kv_bytes_per_token(shape, kind)


# -------------------------------------------------------------------------------- properties
finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=32, max_size=32), st.sampled_from([4, 2]))
def test_kivi_error_is_bounded_by_the_scale(values: list[float], bits: int) -> None:
    """|x - x'| <= s/2 + |min - zero| + levels * |s - (max-min)/levels| (+ float32 rounding):
    rounding to the grid, plus what storing scale and zero in f16 moved the grid."""
    x = np.asarray(values, np.float32)
    s16, z16, _ = R.kivi_group(x, bits)
    deq = R.roundtrip(f"int{bits}", x)
    levels = (1 << bits) - 1
    s, z = float(s16), float(z16)
    lo, hi = float(x.min()), float(x.max())
    bound = 0.5 * s + abs(lo - z) + levels * abs(s - (hi - lo) / levels)
    bound += 4 * np.finfo(np.float32).eps * (abs(lo) + abs(hi) + levels * s)
    assert np.all(np.abs(deq.astype(np.float64) - x) <= bound)


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=32, max_size=32))
def test_q8_0_error_is_bounded_by_the_block_scale(values: list[float]) -> None:
    x = np.asarray(values, np.float32)
    d, _ = R.q8_0_group(x)
    amax = float(np.abs(x).max())
    # half a step of the f16 scale, plus the f16 rounding of d times 127
    bound = 0.5 * float(d) + 127 * abs(float(d) - amax / 127) + 1e-6 * amax
    assert np.all(np.abs(R.roundtrip("q8_0", x).astype(np.float64) - x) <= bound)


def _layer_states(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.from_numpy(_data((2, 2, n, 64), seed=seed))
    v = torch.from_numpy(_data((2, 2, n, 64), seed=seed + 1))
    return k, v


# the plain KIVI rules (no sinks, no window, no rotation); test_kv_window.py covers the others
PLAIN = {"sinks": 0, "residual": 0, "rotation": False}


def _fill(kind: str, k: torch.Tensor, v: torch.Tensor, chunks: list[int], **opts):
    from ferroquant.kv.cache import QuantizedLayer, _Workspace

    layer = QuantizedLayer(kind, _Workspace(), **(opts or PLAIN))
    at, outs, snaps = 0, [], []
    for c in chunks:
        ok, ov = layer.update(k[:, :, at : at + c], v[:, :, at : at + c])
        at += c
        outs.append((ok.clone(), ov.clone()))
        snaps.append([{n: t.clone() for n, t in p.items()} for p in layer.stored_parts()])
    return layer, outs, snaps


chunk_lists = st.lists(st.integers(1, 40), min_size=1, max_size=8)


@settings(max_examples=15, deadline=None)
@given(chunk_lists, st.sampled_from(KINDS))
def test_old_rows_never_change_and_chunking_does_not_matter(chunks: list[int], kind: str) -> None:
    """Each token is quantized once: appending never rewrites a stored row, and the stored bytes
    do not depend on how the tokens were split into updates."""
    k, v = _layer_states(sum(chunks), seed=6)
    layer, outs, snaps = _fill(kind, k, v, chunks)
    for before, after in zip(snaps, snaps[1:], strict=False):
        for p0, p1 in zip(before, after, strict=True):
            for name, t in p0.items():
                assert torch.equal(p1[name][:, :, : t.shape[2]], t), (kind, name)
    one, _, _ = _fill(kind, k, v, [sum(chunks)])
    for p_many, p_one in zip(layer.stored_parts(), one.stored_parts(), strict=True):
        for name in p_one:
            assert torch.equal(p_many[name], p_one[name])
    # what update returns: the quantized groups (those complete when the last call's first
    # token was appended) dequantized; the residual and (int4 / int2) the last call's tokens
    # as given
    n = sum(chunks)
    g = layer.group  # head_dim 64: the KIVI group is 64, as in the runtime
    full = (n - chunks[-1] + 1) // g * g if KV_TYPES[kind].kivi else n
    m = min(full, n - chunks[-1]) if KV_TYPES[kind].kivi else n
    ok, ov = outs[-1]
    for got, x, role in ((ok, k, "k"), (ov, v, "v")):
        ref = _reference_states(kind, x[:, :, :full].numpy(), role, g)
        assert np.array_equal(_bits(got[:, :, :m].numpy()), _bits(ref[:, :, :m]))
        assert torch.equal(got[:, :, m:], x[:, :, m:])


@pytest.mark.parametrize("kind", ["int4", "int2"])
@pytest.mark.parametrize("chunks", [[1] * 130, [60, 4, 63, 1, 2]])
def test_kivi_update_that_exactly_fills_a_group_stores_what_one_update_does(
    kind: str, chunks: list[int]
) -> None:
    """The update that brings the residual to exactly one group (every 64th decode step)
    stores the same bytes as one update of all the tokens, and the residual afterwards holds
    the tokens that followed."""
    k, v = _layer_states(sum(chunks), seed=7)
    layer, _, _ = _fill(kind, k, v, chunks)
    one, _, _ = _fill(kind, k, v, [sum(chunks)])
    assert layer.n_quantized == one.n_quantized == 128 and layer.n_res == one.n_res
    for p_many, p_one in zip(layer.stored_parts(), one.stored_parts(), strict=True):
        for name in p_one:
            assert torch.equal(p_many[name], p_one[name]), (kind, name)
    r = layer.n_res
    assert torch.equal(layer.fp_k[:, :, :r], k[:, :, 128:])
    assert torch.equal(layer.fp_v[:, :, :r], v[:, :, 128:])


# ----------------------------------------------------------------- inside transformers' generate
@pytest.fixture(scope="module")
def tiny_model():
    from tiny_llama import make_small_llama

    return make_small_llama()


def _generate(model, cache, n: int = 40, **kw) -> torch.Tensor:
    ids = torch.arange(3, 3 + 45).remainder(256).unsqueeze(0)
    return model.generate(
        ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, past_key_values=cache, **kw
    )


def test_f32_cache_generates_what_dynamic_cache_does(tiny_model) -> None:
    from transformers import DynamicCache

    ref = _generate(tiny_model, DynamicCache(config=tiny_model.config))
    assert torch.equal(_generate(tiny_model, QuantizedCache(tiny_model.config, "f32")), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_fills_the_cache_with_the_formula_bytes(tiny_model, kind: str) -> None:
    ids = torch.arange(70).remainder(256).unsqueeze(0)
    cache = QuantizedCache(tiny_model.config, kind)
    with torch.no_grad():
        out = tiny_model(ids, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 70
    assert torch.isfinite(out.logits).all()
    # 64 tokens quantized + 6 residual float32 tokens for int4 / int2
    assert cache.nbytes() == kv_cache_bytes(tiny_model.config, kind, 70, residual_bytes=4)


def _streamed_logits(model, ids: torch.Tensor, kind: str, **opts) -> torch.Tensor:
    """Logits of `ids` fed in 32-token chunks (as a token-by-token stream attends)."""
    cache = QuantizedCache(model.config, kind, **opts)
    with torch.no_grad():
        parts = [
            model(ids[:, at : at + 32], past_key_values=cache, use_cache=True).logits
            for at in range(0, ids.shape[1], 32)
        ]
    return torch.cat(parts, dim=1)


def test_quantized_caches_stay_close_to_f32(tiny_model) -> None:
    ids = torch.arange(100).remainder(256).unsqueeze(0)
    with torch.no_grad():
        ref = tiny_model(ids).logits
    # int2 without its sinks and window (a 100-token text would stay in full precision)
    plain = {"kv_sinks": 0, "kv_residual": 0, "kv_rotation": False}
    errs = {
        k: (_streamed_logits(tiny_model, ids, k, **(plain if k == "int2" else {})) - ref)
        .abs()
        .max()
        .item()
        for k in KINDS
    }
    assert errs["f32"] < 1e-4  # chunking only reorders float sums
    # finer formats err less: the order the bits give
    assert errs["f16"] < errs["q8_0"] < errs["q4_0"] and errs["int4"] < errs["int2"]
    assert errs["f32"] < errs["f16"]


def test_beam_search_and_quantlinear_model(tiny_model) -> None:
    import copy

    out = _generate(tiny_model, QuantizedCache(tiny_model.config, "int4"), n=12, num_beams=3)
    assert out.shape[1] == 45 + 12
    qmodel = fq.quantize_model(copy.deepcopy(tiny_model), "q8_0")
    from ferroquant.nn import QuantLinear

    assert any(isinstance(m, QuantLinear) for m in qmodel.modules())
    a = _generate(qmodel, QuantizedCache(qmodel.config, "q8_0"), n=8)
    assert a.shape[1] == 45 + 8


def test_bad_input_is_a_clear_error(tiny_model) -> None:
    with pytest.raises(ValueError, match="unknown kv_type 'int3'"):
        QuantizedCache(tiny_model.config, "int3")
    with pytest.raises(ValueError, match="kv_type must be a string"):
        QuantizedCache(tiny_model.config, 4)
    cache = QuantizedCache(tiny_model.config, "int4")
    _generate(tiny_model, cache, n=2)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
    from ferroquant.kv.cache import QuantizedLayer, _Workspace

    with pytest.raises(ValueError, match="head_dim 48 is not a multiple of 32"):
        QuantizedLayer("q8_0", _Workspace()).update(
            torch.zeros(1, 1, 2, 48), torch.zeros(1, 1, 2, 48)
        )
