"""The native runtime's quantized, paged KV cache (docs/kv.md; rust/core/src/runtime/kv/).

The attention's bit-exactness against the scalar reference of every type is a Rust test
(runtime::kv::tests); here: the cache's blocks against the formats' peers (libggml for q8_0 and
q4_0, torch's float8_e4m3fn cast for fp8, an independent numpy transcription of the KIVI
definition), the model-level invariants (batched = step by step, 1 thread = 2 threads, every
type), generate_batch against one-at-a-time generate, and each bad input's one clear error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_runtime import write_f32_gguf

import ferroquant as fq
from ferroquant import _native
from ferroquant.models.convert import quantize_gguf
from ferroquant.runtime import KV_TYPES, LlamaRuntime

import peers

VOCAB = 49152
BLOCK = {"f32": 128, "f16": 64, "q8_0": 34, "fp8_e4m3": 36, "q4_0": 18, "int4": 36, "int2": 20}
LEN = {t: 64 if t.startswith("int") else 32 for t in BLOCK}  # values per block

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
rows32 = hnp.arrays(np.float32, st.sampled_from([32, 64, 128]), elements=finite)
rows64 = hnp.arrays(np.float32, st.sampled_from([64, 128]), elements=finite)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """SmolLM2-135M's first 2 blocks (3 KV heads of 64) at q8_0."""
    d = tmp_path_factory.mktemp("kv")
    write_f32_gguf(peers.smollm2_gguf(), d / "f32.gguf", 2)
    quantize_gguf(d / "f32.gguf", d / "q8_0.gguf", "q8_0")
    return d / "q8_0.gguf"


def test_bytes_per_token_formula():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64; f16 is 30 * 2 * 3 * 64 * 2 = 23,040.
    for t in KV_TYPES:
        assert _native.kv_bytes_per_token(t, 30, 3, 64) == 30 * 2 * 3 * 64 // LEN[t] * BLOCK[t]
    assert _native.kv_bytes_per_token("f16", 30, 3, 64) == 23040
    # int4 at 4.5 bits per value: exactly q4_0's bytes
    assert _native.kv_bytes_per_token("int4", 30, 3, 64) == 6480
    assert _native.kv_bytes_per_token("q4_0", 30, 3, 64) == 6480
    with pytest.raises(fq.QuantizeError, match="head_dim"):
        _native.kv_bytes_per_token("int4", 30, 3, 48)
    with pytest.raises(fq.QuantizeError, match="divisible by 64"):
        _native.kv_bytes_per_token("int2", 30, 3, 96)


@settings(max_examples=40, deadline=None)
@given(rows32)
def test_ggml_blocks_are_libggmls(x):
    """q8_0 / q4_0 cache blocks are exactly what libggml writes for the row."""
    for t in ("q8_0", "q4_0"):
        peers.check_bytes(_native.kv_encode(t, x), peers.ggml_quantize(x[None], t), t)


@settings(max_examples=40, deadline=None)
@given(rows32)
def test_fp8_blocks_are_torchs_cast(x):
    """fp8_e4m3: per 32 values scale = amax / 448 (1 when 0), q = float8_e4m3fn(x / scale)."""
    torch = peers.require("torch")
    b = _native.kv_encode("fp8_e4m3", x).reshape(-1, 36)
    xb = x.reshape(-1, 32)
    amax = np.abs(xb).max(axis=1)
    scale = (amax / np.float32(448)).astype(np.float32)
    scale[scale == 0] = 1
    q = (torch.from_numpy(xb) / torch.from_numpy(scale)[:, None]).to(torch.float8_e4m3fn)
    assert np.array_equal(b[:, :32], q.view(torch.uint8).numpy())
    assert np.array_equal(b[:, 32:].copy().view(np.float32)[:, 0], scale)


def kivi_numpy(x: np.ndarray, bits: int) -> np.ndarray:
    """docs/kv.md's KIVI block, transcribed independently in numpy."""
    levels = (1 << bits) - 1
    out = []
    for g in x.reshape(-1, 64):
        s16 = np.float16(min((g.max() - g.min()) / np.float32(levels), np.float32(65504)))
        z16 = np.float16(np.clip(g.min(), -65504, 65504) + np.float32(0))
        s, z = np.float32(s16), np.float32(z16)
        q = np.zeros(64, np.uint8)
        if s != 0:
            q = np.clip(np.rint((g - z) / s), 0, levels).astype(np.uint8)
        per = 8 // bits
        packed = np.zeros(64 // per, np.uint8)
        for i in range(64):
            packed[i % len(packed)] |= q[i] << (bits * (i // len(packed)))
        out.append(np.concatenate([packed, np.array([s16, z16]).view(np.uint8)]))
    return np.concatenate(out)


@settings(max_examples=60, deadline=None)
@given(rows64, st.sampled_from([4, 2]))
def test_kivi_blocks_follow_the_definition(x, bits):
    t = f"int{bits}"
    enc = _native.kv_encode(t, x)
    assert np.array_equal(enc, kivi_numpy(x, bits))
    # Dequantized values stay within half a step (plus the f16 rounding of zero and scale).
    back = _native.kv_decode(t, enc).reshape(-1, 64)
    for g, b, blk in zip(x.reshape(-1, 64), back, enc.reshape(-1, BLOCK[t]), strict=True):
        s = float(blk[-4:-2].copy().view(np.float16)[0])
        span = float(g.max()) - float(g.min())
        tol = 0.5 * s + 2e-3 * (abs(float(g.min())) + span) + 1e-6
        assert np.all(np.abs(b.astype(np.float64) - g) <= tol)


# Wide values (past the f16 range) and signed zeros: where the two caches' rules could part.
wide = st.one_of(st.floats(-1e6, 1e6, allow_nan=False, width=32), st.sampled_from([0.0, -0.0]))


@settings(max_examples=80, deadline=None)
@given(
    hnp.arrays(np.float32, st.sampled_from([64, 128]), elements=wide),
    st.sampled_from(["f16", "q8_0", "q4_0", "fp8_e4m3", "int4", "int2"]),
)
def test_runtime_and_transformers_caches_store_the_same_values(x, t):
    """One definition, two implementations: the runtime's block (Rust) decodes to exactly what
    the transformers cache's scalar reference (ferroquant.kv.reference) gives, bit for bit."""
    from ferroquant.kv.reference import roundtrip

    back = _native.kv_decode(t, _native.kv_encode(t, x))
    want = np.concatenate([roundtrip(t, g) for g in x.reshape(-1, LEN[t])])
    assert np.array_equal(back.view(np.uint32), want.astype(np.float32).view(np.uint32)), t


@settings(max_examples=30, deadline=None)
@given(rows32, st.sampled_from(["f16", "q8_0", "q4_0", "fp8_e4m3"]))
def test_decode_of_encode_is_stable(x, t):
    """Decoding and re-encoding a cache block gives the same block (the codecs are exact
    inverses on the grid), f16 round-to-nearest-even as numpy's cast."""
    enc = _native.kv_encode(t, x)
    if t == "f16":
        assert np.array_equal(enc.view(np.float16), x.astype(np.float16))
    back = _native.kv_decode(t, enc)
    if t != "q4_0":  # q4_0's grid is asymmetric (-8..7): its re-encoding may rescale
        # compared as values: a scale that underflows f16 stores d = 0 beside nonzero codes,
        # which decode to zeros and re-encode as zero codes (hypothesis: x = [8.8e-13, 0, ...])
        again = _native.kv_decode(t, _native.kv_encode(t, back))
        assert np.array_equal(again, back)  # as numbers: -0 (a negative code times d = 0) is 0


@pytest.mark.parametrize(
    "kv,rotation,window",
    [(t, None, None) for t in KV_TYPES]
    + [("int4", True, None), ("int4", "values", None)]
    + [("int2", None, (4, 0)), ("int2", None, (5, 3))],
)
def test_batched_equals_step_by_step_and_threads_do_not_matter(
    model, kv, rotation, window, monkeypatch
):
    """A 72-token prompt (past one 64-position KIVI group) in one call, in chunks, or token by
    token, on 1 or 2 threads, rotated or not, with KIVI sinks and a short residual (so that
    page 0 is quantized inside the prompt): the same logits bit for bit."""
    # The cache is under test, not the matmul: the ggml formats' Linears change numerics at
    # `qmatmul_ggml_bf16_min_m` rows (48 where AMX bf16 runs: the bf16 tiles), which a 72-token
    # call crosses and its 30- and 33-token chunks do not; keep their int8 paths at every M.
    monkeypatch.setenv("FERROQUANT_GGML_BF16", "0")
    sinks, residual = window or (None, None)
    tokens = [int(t) for t in np.random.default_rng(7).integers(0, VOCAB, 72)]
    before = fq.num_threads()
    try:
        fq.set_num_threads(1)
        rt = LlamaRuntime.from_gguf(
            model, n_ctx=96, kv_type=kv, kv_budget="8MiB", kv_rotation=rotation,
            kv_sinks=sinks, kv_residual=residual,
        )  # fmt: skip
        one = rt.forward(tokens, all_logits=True)
        fq.set_num_threads(2)
        rt.reset()
        two = rt.forward(tokens, all_logits=True)
        rt.reset()
        chunks = [rt.forward(tokens[:30], all_logits=True), rt.forward(tokens[30:63], True)]
        steps = np.concatenate(chunks + [rt.forward([t])[None] for t in tokens[63:]])
    finally:
        fq.set_num_threads(before)
    assert np.array_equal(one, two)
    assert np.array_equal(steps, one)


def test_quantized_caches_stay_close_to_f32(model):
    tokens = [int(t) for t in np.random.default_rng(8).integers(0, VOCAB, 96)]
    ref = LlamaRuntime.from_gguf(model, n_ctx=96).forward(tokens, all_logits=True)
    scale = np.abs(ref).max()
    cases = [("f16", None, 0.05), ("q8_0", None, 0.1), ("fp8_e4m3", None, 0.2),
             ("int4", None, 0.3), ("int4", True, 0.3), ("q4_0", None, 0.3)]  # fmt: skip
    for kv, rot, tol in cases:
        rt = LlamaRuntime.from_gguf(model, n_ctx=96, kv_type=kv, kv_rotation=rot)
        got = rt.forward(tokens, True)
        assert np.abs(got - ref).mean() < tol * scale * 0.1, kv
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8, kv


def test_rotation_defaults_and_choice(model):
    """Rotation is on by default for q4_0 and int2 (head_dim 64 is a power of two), off for the
    others; it can be chosen either way, and changes the logits only through the rounding."""
    for kv in KV_TYPES:
        rt = LlamaRuntime.from_gguf(model, n_ctx=64, kv_type=kv)
        assert rt.kv["rotation"] is (kv in ("q4_0", "int2")), kv
        assert rt.kv["page_tokens"] == (64 if kv.startswith("int") else 32)
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, VOCAB, 24)]
    exact = [LlamaRuntime.from_gguf(model, n_ctx=64, kv_rotation=r).forward(tokens, True)
             for r in (False, True)]  # fmt: skip
    # f32 cache: the rotation is orthogonal, so q.k and the output change only by rounding
    assert np.abs(exact[0] - exact[1]).max() < 1e-3 * np.abs(exact[0]).max()
    off = LlamaRuntime.from_gguf(model, n_ctx=64, kv_type="q4_0", kv_rotation=False)
    assert off.kv["rotation"] is False
    # The values alone: the output is rotated back, so on f32 it changes only by rounding too.
    vrot = LlamaRuntime.from_gguf(model, n_ctx=64, kv_rotation="values")
    assert vrot.kv["rotation"] == "values"
    got = vrot.forward(tokens, True)
    assert np.abs(got - exact[0]).max() < 1e-3 * np.abs(exact[0]).max()
    with pytest.raises(fq.QuantizeError, match="kv_rotation"):
        LlamaRuntime.from_gguf(model, n_ctx=64, kv_rotation="keys-please")


@pytest.mark.parametrize("kv", ["q8_0", "int4"])
def test_generate_batch_equals_one_at_a_time(model, kv):
    """Sequences decoded together give each the tokens it gets alone; a pool that holds one
    sequence at a time makes the others wait, with the same result."""
    rng = np.random.default_rng(9)
    prompts = [[int(t) for t in rng.integers(0, VOCAB, n)] for n in (5, 40, 17)]
    rt = LlamaRuntime.from_gguf(model, n_ctx=96, kv_type=kv, kv_budget="16MiB")
    alone = [rt.generate(p, 12).tokens for p in prompts]
    g = rt.generate_batch(prompts, max_new_tokens=12)
    assert g.tokens == alone and g.max_active == 3
    assert rt.kv["charged"] == 0  # every page back in the pool
    one_at_a_time = rt.kv["page_bytes"] * 2 + rt.kv["residual_bytes"]  # 12 + 40 < 64 positions
    small = LlamaRuntime.from_gguf(model, n_ctx=64, kv_type=kv, kv_budget=str(one_at_a_time))
    assert small.kv_capacity(64) == 1
    g1 = small.generate_batch(prompts, max_new_tokens=12)
    assert g1.tokens == alone and g1.max_active == 1


def test_kivi_sinks_and_residual(model):
    """int2 keeps 4 sinks and 128 recent positions in f16 by default, int4 neither; the pool
    charges a sequence its quantized pages plus those f16 rows (docs/kv.md); the options are
    checked, and refused for the per-token types."""
    f16_row = LlamaRuntime.from_gguf(model, n_ctx=64, kv_type="f16").kv["bytes_per_token"]
    # a 64-position page: (f16_row / 2) values a position, BLOCK / 64 bytes a value
    page = {t: f16_row // 2 * BLOCK[t] for t in ("int4", "int2")}
    rt = LlamaRuntime.from_gguf(model, n_ctx=2048, kv_type="int2", kv_budget="256MiB")
    assert (rt.kv["kv_sinks"], rt.kv["kv_residual"]) == (4, 128)
    assert rt.kv["residual_bytes"] == (128 + 64 + 4) * f16_row
    charge = (2048 - 128) // 64 * page["int2"] + (128 + 64 + 4) * f16_row
    assert rt.kv_capacity(2048) == (256 << 20) // charge
    r4 = LlamaRuntime.from_gguf(model, n_ctx=2048, kv_type="int4", kv_budget="256MiB")
    assert (r4.kv["kv_sinks"], r4.kv["kv_residual"]) == (0, 0)
    assert r4.kv_capacity(2048) == (256 << 20) // (32 * page["int4"] + 64 * f16_row)
    own = LlamaRuntime.from_gguf(model, n_ctx=64, kv_type="int4", kv_sinks=2, kv_residual=64)
    assert (own.kv["kv_sinks"], own.kv["kv_residual"]) == (2, 64)
    with pytest.raises(fq.QuantizeError, match="kv_sinks must be 0 to 63"):
        LlamaRuntime.from_gguf(model, n_ctx=64, kv_type="int2", kv_sinks=64)
    with pytest.raises(fq.QuantizeError, match="not kv_type f16"):
        LlamaRuntime.from_gguf(model, n_ctx=64, kv_type="f16", kv_residual=16)


def test_bad_input_one_clear_error_each(model):
    with pytest.raises(fq.QuantizeError, match='unknown kv_type "int3"'):
        LlamaRuntime.from_gguf(model, kv_type="int3")
    with pytest.raises(fq.QuantizeError, match="too small for one sequence of 2048"):
        LlamaRuntime.from_gguf(model, n_ctx=2048, kv_type="f16", kv_budget="1MiB")
    with pytest.raises(fq.QuantizeError, match="not a size"):
        LlamaRuntime.from_gguf(model, kv_budget="lots")
    with pytest.raises(fq.QuantizeError, match="context length 8192"):
        LlamaRuntime.from_gguf(model, n_ctx=8193)
    rt = LlamaRuntime.from_gguf(model, n_ctx=32, kv_type="int4", kv_budget="4MiB")
    with pytest.raises(fq.QuantizeError, match="prompt 1: 30 prompt tokens \\+ 8 new tokens pass"):
        rt.generate_batch([[1, 2], list(range(30))], max_new_tokens=8)
    with pytest.raises(fq.QuantizeError, match="context full"):
        rt.forward(list(range(33)))
    with pytest.raises(fq.QuantizeError, match="prompt 0: token"):
        rt.generate_batch([[VOCAB]], max_new_tokens=1)
    # Still usable: nothing was charged, and both paths run.
    assert rt.kv["charged"] == 0 and rt.n_past == 0
    assert len(rt.generate_batch([[1, 2], [3]], max_new_tokens=4).tokens[1]) == 4
    assert rt.forward([1, 2, 3]).shape == (VOCAB,)


def test_cli_generate_kv(tmp_path, capsys, model):
    from ferroquant import cli

    assert cli.main(["generate", str(model), "--prompt", "hi", "--kv", "int3"]) != 0
    assert "int3" in capsys.readouterr().err
    argv = ["generate", str(model), "--prompt", "hi", "--kv", "int4", "--ctx", "64"]
    assert cli.main(argv + ["--max-tokens", "3", "--kv-budget", "8MiB"]) == 0
    assert "kv int4" in capsys.readouterr().err
    assert cli.main(argv + ["--max-tokens", "2", "--kv-rotation", "on"]) == 0
    assert "kv int4" in capsys.readouterr().err
    argv2 = ["generate", str(model), "--prompt", "hi", "--kv", "int2", "--ctx", "64"]
    assert cli.main(argv2 + ["--max-tokens", "2", "--kv-sinks", "2", "--kv-residual", "0"]) == 0
    assert "kv int2" in capsys.readouterr().err
    assert cli.main(argv2 + ["--kv-sinks", "99"]) != 0
    assert "kv_sinks" in capsys.readouterr().err


def test_decode_step_probe(model):
    """The bench's speed probe: batched steps over synthetic caches run and give every page
    back; a pool too small for the sequences asked for is one clear error, then still usable."""
    rt = LlamaRuntime.from_gguf(model, n_ctx=96, kv_type="int4", kv_budget="4MiB")
    assert rt.decode_step_seconds(2, 80, reps=2) > 0
    assert rt.kv["charged"] == 0
    n = rt.kv_capacity(96)
    with pytest.raises(fq.QuantizeError, match=f"holds {n} sequences of 96 positions"):
        rt.decode_step_seconds(n + 1, 93, reps=3)
    assert rt.kv["charged"] == 0
    assert rt.forward([1, 2, 3]).shape == (VOCAB,)
