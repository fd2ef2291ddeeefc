"""The calibration data and the layer-by-layer capture every calibrated method shares."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ferroquant.calib import (  # noqa: E402
    calibration_ids,
    find_decoder_layers,
    first_layer_inputs,
    read_calibration_text,
    run_layers,
)
from ferroquant.defaults import CALIBRATION_TEXT, EVAL_TEXT  # noqa: E402


class _Chars:
    """A stand-in tokenizer: one token per character."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def _tiny(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_windows_from_text_ids_and_files(tmp_path):
    ids = calibration_ids("abcdefgh" * 10, _Chars(), n_samples=3, seq_len=20)
    assert ids.shape == (3, 20) and ids[0, 0] == ord("a") and ids[1, 0] == ord("e")
    two_d = torch.arange(40).reshape(4, 10)
    assert torch.equal(calibration_ids(two_d, None, 2, 5), two_d[:2, :5])
    f = tmp_path / "c.txt"
    f.write_text("xyz" * 50)
    assert calibration_ids(f, _Chars(), 2, 30).shape == (2, 30)
    assert calibration_ids(["ab" * 20, "cd" * 20], _Chars(), 2, 40).shape == (2, 40)


def test_text_too_short_says_how_many_windows_fit():
    with pytest.raises(
        ValueError, match=r"has 100 tokens; 4 samples x 64 tokens need 256 \(it holds 1"
    ):
        calibration_ids("a" * 100, _Chars(), 4, 64)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        calibration_ids("text", None, 1, 2)


def test_default_calibration_text_is_lee_background_never_the_eval_text():
    pytest.importorskip("gensim")
    assert CALIBRATION_TEXT != EVAL_TEXT
    text, what = read_calibration_text()
    assert "lee_background" in what and len(text) > 300_000


def test_decoder_layers_are_found_or_named_as_missing():
    name, layers = find_decoder_layers(_tiny())
    assert name == "model.layers" and len(layers) == 3
    with pytest.raises(ValueError, match="no decoder layers found"):
        find_decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_sequential_capture_reproduces_the_model_s_own_layer_inputs():
    model = _tiny()
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    _, layers = find_decoder_layers(model)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(3)}
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen[i].append(kw.get("hidden_states", a[0] if a else None)),
            with_kwargs=True,
        )
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for k in range(3):
            model(ids[k : k + 1])
    for h in hooks:
        h.remove()
    hidden, _ = first_layer_inputs(model, layers, ids)
    for k in range(3):
        torch.testing.assert_close(hidden[k], seen[0][k])

    got: dict[int, list] = {}
    groups: dict[int, list] = {}

    def process(i, where, layer, stats):
        got[i] = where
        groups[i] = sorted(sorted(names) for names, h, n in stats.groups())
        for _names, h, n in stats.groups():
            assert n == 3 * 16 and h.shape[0] == h.shape[1]
            assert torch.allclose(h, h.T)

    run_layers(model, ids, process, progress=False)
    assert got == {0: "model.layers.0", 1: "model.layers.1", 2: "model.layers.2"}
    assert groups[0] == [
        ["mlp.down_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
    ]


def test_non_finite_activations_name_the_layer():
    model = _tiny()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(
        ValueError, match=r"non-finite activations at the input of model\.layers\.1\.mlp"
    ):
        run_layers(model, ids, lambda *a: None, progress=False)


@pytest.mark.parametrize("d", [5, 128, 129, 300])
def test_gram_is_x_transpose_x_and_exactly_symmetric(d, monkeypatch):
    """The statistics' float32 triangular-block product (forwards in float32, or no bf16 kernel)
    against float64 x^T x, and mirrored exactly (the bf16 kernel: tests/test_gram_bf16.py)."""
    import ferroquant.calib.capture as cap
    from ferroquant.calib.capture import gram

    monkeypatch.setattr(cap, "GRAM_BF16", False)

    x = torch.randn(257, d, generator=torch.Generator().manual_seed(d))
    got = gram(x)
    ref = x.double().T @ x.double()
    assert got.dtype == torch.float32 and torch.equal(got, got.T)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


def test_capture_statistics_are_x_transpose_x_of_the_linear_inputs_as_they_reach_it():
    """q's Hessian (its input is the norm's output, float32 in both precisions) is the same with
    and without the bf16 autocast, bit for bit: the float32 product. o_proj's input is bf16
    under the autocast: its Hessian is the Rust kernel's x^T x of those bf16 values (where this
    CPU has the kernel), within float32 summation of the float64 one."""
    import ferroquant.calib.capture as cap
    from ferroquant import _native

    model = _tiny()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    _, layers = find_decoder_layers(model)
    seen: dict[str, list[torch.Tensor]] = {"q_proj": [], "o_proj": []}
    attn = layers[0].self_attn
    with torch.no_grad():
        hidden, calls = first_layer_inputs(model, layers, ids)
        hooks = [
            getattr(attn, nm).register_forward_pre_hook(
                lambda m, a, nm=nm: seen[nm].append(a[0].reshape(-1, 64).clone())
            )
            for nm in seen
        ]
        sums = {}
        for dtype in (None, torch.bfloat16):
            old, cap.FORWARD_AUTOCAST = cap.FORWARD_AUTOCAST, dtype
            try:
                st = cap.collect_stats(layers[0], calls[0], hidden, "l0")
                bf16 = cap.forward_dtype(hidden[0]) == torch.bfloat16
            finally:
                cap.FORWARD_AUTOCAST = old
            sums[dtype] = {nm: st.sums[st.group_of[f"self_attn.{nm}"]] for nm in seen}
    for h in hooks:
        h.remove()
    q, o = seen["q_proj"], seen["o_proj"]
    assert q[0].dtype == q[1].dtype == torch.float32 and torch.equal(q[0], q[1])
    assert torch.equal(sums[None]["q_proj"], sums[torch.bfloat16]["q_proj"])
    ref = q[0].double().T @ q[0].double()
    torch.testing.assert_close(sums[None]["q_proj"], ref, rtol=1e-5, atol=1e-4)
    x = o[1]
    assert x.dtype == (torch.bfloat16 if bf16 else torch.float32)
    if bf16 and cap.bf16_kernel():
        bits = x.view(torch.int16).numpy().view("uint16")
        want = torch.from_numpy(_native.gram_bf16(bits)).double()
        assert torch.equal(sums[torch.bfloat16]["o_proj"], want)
    xd = x.double()
    torch.testing.assert_close(sums[torch.bfloat16]["o_proj"], xd.T @ xd, rtol=1e-5, atol=1e-4)
