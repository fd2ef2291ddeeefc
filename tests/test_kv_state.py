"""The native decode step of ferroquant.kv's transformers cache (`_native.KvLayerState`: the
step's token written by `update`, the attention read by `ferroquant_kv`) against the Python path
it replaces (`_decode_write` + `attend_decode`, itself checked against float64 attention in
test_kv_attention.py): the same stored bytes and bit-identical outputs, step after step, across
group boundaries, with sinks, windows, rotation and batches; the cases it does not take fall
back to that path."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ferroquant import _native  # noqa: E402
from ferroquant.kv import attention  # noqa: E402
from ferroquant.kv.cache import QuantizedLayer, _Workspace  # noqa: E402

D = 64


class _Module(torch.nn.Module):
    num_key_value_groups = 1
    is_causal = True


def _pair(kind: str, n_head: int, **opts) -> tuple[QuantizedLayer, QuantizedLayer]:
    """(a layer with the native state, the same layer without: the Python path)."""
    fast = QuantizedLayer(kind, _Workspace(), lambda: True, n_head=n_head, **opts)
    slow = QuantizedLayer(kind, _Workspace(), lambda: True, **opts)
    return fast, slow


def _step(layer: QuantizedLayer, k, v, q, mask=None) -> torch.Tensor:
    kk, vv = layer.update(k, v)
    module = _Module()
    module.num_key_value_groups = q.shape[1] // k.shape[1]  # sdpa's (prefill, chunks)
    out, _ = attention.attention(module, q, kk, vv, mask, scaling=D**-0.5)
    return out.clone()


@pytest.mark.parametrize(
    "kind,opts",
    [
        ("int4", {}),  # no window: the step that fills a group quantizes it
        ("int2", {}),  # 4 sinks, a 128-token window, rotated
        ("int2", {"sinks": 0, "residual": 0, "rotation": False}),
        ("int4", {"sinks": 3, "residual": 40, "rotation": True}),
        ("int2", {"sinks": 2, "residual": 0, "rotation": True}),
    ],
)
@pytest.mark.parametrize("b,h,rep", [(1, 3, 3), (2, 2, 1)])
def test_native_step_is_bit_identical_to_the_python_path(kind, opts, b, h, rep) -> None:
    g = torch.Generator().manual_seed(b * 10 + rep)
    fast, slow = _pair(kind, h * rep, **opts)
    # batch 2: a prompt past the residual window, so that its first decode group is native too
    n0 = 70 + (fast.residual if b == 2 else 0)
    prompt = torch.randn(b, h, n0, D, generator=g), torch.randn(b, h, n0, D, generator=g)
    for layer in (fast, slow):
        layer.update(*prompt)
    python_groups = []  # decode steps the fast layer's Python path appended
    append = fast._append
    fast._append = lambda k, v: (python_groups.append(fast.n_tokens), append(k, v))[1]
    before = fast.n_quantized
    native = 0
    for _ in range(150):  # past two or three group boundaries
        k, v = torch.randn(b, h, 1, D, generator=g), torch.randn(b, h, 1, D, generator=g)
        q = torch.randn(b, h * rep, 1, D, generator=g)
        want = _step(slow, k, v, q)
        got = _step(fast, k, v, q)
        native += fast._fast_state is not None
        assert torch.equal(got, want)
        assert slow._fast_state is None
    # the stored bytes are the same too (quantized rows, sinks and residual)
    for a, c in zip(fast.stored_parts(), slow.stored_parts(), strict=True):
        assert all(torch.equal(a[n], c[n]) for n in a)
    used = fast.sinks + fast.n_res
    assert torch.equal(fast.fp_k[:, :, :used], slow.fp_k[:, :, :used])
    assert torch.equal(fast.fp_v[:, :, :used], slow.fp_v[:, :, :used])
    # KIVI groups of 64 tokens, quantized once `residual` newer tokens exist
    r = fast.residual
    quantized = [64 * max(0, (n - r) // 64) for n in (n0, n0 + 150)]
    assert (fast.n_tokens, fast.n_quantized) == (slow.n_tokens, slow.n_quantized)
    assert (fast.n_tokens, fast.n_quantized) == (n0 + 150, quantized[1])
    assert quantized[1] > quantized[0]  # groups were quantized on the way
    assert native == 150  # every step, those that quantize a group included
    # the group steps are native (push_group; the buffers grown first where full) but the
    # first group of a layer (no quantized rows yet, group 0 under sinks): the Python path
    assert python_groups == ([python_groups[0]] if before == 0 else [])
    assert fast.k_rows.n == fast.n_quantized // 64 and fast.v_rows.n == fast.n_quantized


@pytest.mark.parametrize("kind,opts", [("int4", {}), ("int2", {})])
def test_dequantizing_reads_after_native_group_steps(kind, opts) -> None:
    """Attention that is not `ferroquant_kv` (sdpa on `update`'s float states) after the native
    steps, group steps included: the same states as the Python path's, step for step."""
    g = torch.Generator().manual_seed(7)
    fast = QuantizedLayer(kind, _Workspace(), lambda: False, n_head=4, **opts)
    slow = QuantizedLayer(kind, _Workspace(), lambda: False, **opts)
    prompt = torch.randn(2, 2, 200, D, generator=g), torch.randn(2, 2, 200, D, generator=g)
    for layer in (fast, slow):
        layer.update(*prompt)
    groups = fast.n_quantized
    for _ in range(140):
        k, v = torch.randn(2, 2, 1, D, generator=g), torch.randn(2, 2, 1, D, generator=g)
        got = [t.clone() for t in fast.update(k, v)]
        want = slow.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert fast.n_quantized >= groups + 128  # two groups or more quantized on the way


def test_cases_the_state_does_not_take_fall_back() -> None:
    g = torch.Generator().manual_seed(5)
    fast, slow = _pair("int2", 4)
    prompt = torch.randn(1, 2, 30, D, generator=g), torch.randn(1, 2, 30, D, generator=g)
    for layer in (fast, slow):
        layer.update(*prompt)

    def both(k, v, q, mask=None, native=False):
        want = _step(slow, k, v, q, mask)
        got = _step(fast, k, v, q, mask)
        assert (fast._fast_state is not None) == native
        assert torch.equal(got, want)

    k, v, q = (torch.randn(1, n, 1, D, generator=g) for n in (2, 2, 4))
    both(k, v, q, native=True)
    # keys that are not a contiguous float32 step: the Python update writes them, the state
    # attends (`ready`); two tokens: sdpa on the dequantized layer
    both(torch.randn(1, 2, 1, 2 * D, generator=g)[..., ::2], v, q, native=True)
    both(k.double(), v, q, native=True)
    both(torch.randn(1, 2, 2, D, generator=g), torch.randn(1, 2, 2, D, generator=g), q)
    # a query the state does not take (strided), a padding mask: attend_decode
    both(k, v, torch.randn(1, 4, 1, 2 * D, generator=g)[..., ::2], native=True)
    mask = torch.ones(1, 1, 1, fast.n_tokens + 1, dtype=torch.bool)
    mask[..., :3] = False
    both(k, v, q, mask, native=True)
    # a bfloat16 layer has no native state
    bf = QuantizedLayer("int4", _Workspace(), lambda: True, n_head=4)
    bf.update(*(t.bfloat16() for t in prompt))
    bf.update(k.bfloat16(), v.bfloat16())
    assert bf._state is None and bf._fast_state is None


def test_state_output_is_the_layers_buffer_until_its_next_step() -> None:
    g = torch.Generator().manual_seed(2)
    fast, _ = _pair("int4", 2)
    fast.update(torch.randn(1, 2, 10, D, generator=g), torch.randn(1, 2, 10, D, generator=g))
    k, v, q = (torch.randn(1, 2, 1, D, generator=g) for _ in range(3))
    first = _step(fast, k, v, q)
    kk, vv = fast.update(k, v)
    out, _ = attention.attention(_Module(), q, kk, vv, None, scaling=D**-0.5)
    assert out.shape == (1, 1, 2, D) and out is fast._out
    assert not torch.equal(out, first)  # one more token attended


def test_bad_state_input_is_a_clear_error() -> None:
    import numpy as np

    z = np.zeros(0, np.uint8)
    tail = np.zeros((1, 1, 4, 32), np.float32)
    out = torch.empty(1, 1, 2, 32)
    geometry = [32, 1, 1, 32, 2, 0, 0, 4, 0]
    args = ([z] * 3, [z] * 3, tail, tail.copy(), False, torch.float32)
    _native.KvLayerState("int4", geometry, *args, out)  # consistent: accepted
    with pytest.raises(ValueError, match="unknown kv_type"):
        _native.KvLayerState("int3", geometry, *args, out)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
        _native.KvLayerState("int4", [32, 1, 2, 32, 3, 0, 0, 2, 0], *args, out)
    with pytest.raises(ValueError, match="the tail holds"):
        _native.KvLayerState("int4", [32, 1, 1, 32, 2, 0, 0, 5, 0], *args, out)
    with pytest.raises(ValueError, match="keys part main has 0 bytes"):
        _native.KvLayerState("int4", [32, 1, 1, 32, 2, 1, 0, 4, 0], *args, out)
    with pytest.raises(ValueError, match="the output must be"):
        _native.KvLayerState("int4", geometry, *args, torch.empty(1, 2, 1, 32))
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        _native.KvLayerState("int4", [32, 1, 1, 96, 2, 0, 0, 4, 0], *args[:4], True,
                             torch.float32, out)  # fmt: skip
    st = _native.KvLayerState("int4", geometry, *args, out)
    k = torch.zeros(1, 1, 1, 32)
    assert st.attend(torch.zeros(1, 2, 1, 32), 1.0) is None  # no push before it
    assert not st.push(k, k, 0, 4)  # past the tail
    assert st.push(k, k, 0, 3)
    assert st.attend(torch.zeros(1, 2, 1, 32), 1.0) is out
    # a group step with no rows allocated for it, an incomplete group: declined, nothing ready
    assert not st.push_group(k, k, 0, 3)
    assert not st.push_group(k, k, 0, 1)
    assert st.attend(torch.zeros(1, 2, 1, 32), 1.0) is None
