"""AWQ's statistics from the shared capture and its search passes: the capture's mean |x|
(`InputStats.mean_abs`) is that of the Linears' inputs, as `window_inputs` measures it; the
clip search's per-group grams from the capture's x^T x are `group_grams` of every token; the
block search's capture pass ends at its last block; AutoAWQ's candidate set (no s = 1).

Provenance: the references are computed here from the inputs the Linears receive (forward
pre-hooks, float64), not read from the code under test."""

from __future__ import annotations

import pytest

from ferroquant.methods import AWQConfig
from ferroquant.methods.awq import (
    format_qdq,
    group_grams,
    hessian_grams,
    scale_candidates,
    search_clip,
)

torch = pytest.importorskip("torch")


def tiny_llama(kv_heads: int = 2, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _layer0(windows: int = 12):
    from ferroquant.calib.capture import find_decoder_layers, first_layer_inputs

    pytest.importorskip("transformers")
    model = tiny_llama()
    ids = torch.randint(0, 320, (windows, 32), generator=torch.Generator().manual_seed(3))
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        hidden, calls = first_layer_inputs(model, layers, ids)
    return layers[0], calls[0], hidden


def test_capture_mean_abs_is_the_linears_inputs_mean_abs():
    """`collect_stats`' mean |x| per input channel equals (to float32 rounding) float64 means of
    the inputs the Linears receive in the same pass, and `window_inputs`' per-window sums; the
    shards' `abs_sums` added in shard order (the cluster's driver) are the one-pass bits."""
    from ferroquant.calib.capture import SHARD_WINDOWS, InputStats, LocalWindows, collect_stats
    from ferroquant.methods.awq_windows import mean_abs_inputs, window_inputs

    layer, call, hidden = _layer0()
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    seen: dict[str, list] = {n: [] for n in names}
    hs = [layer.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
        for n in names]  # fmt: skip
    with torch.no_grad():
        stats = collect_stats(layer, call, hidden, "l0")
    for h in hs:
        h.remove()
    with torch.no_grad():
        per_window = LocalWindows(call, hidden).map(layer, window_inputs, names, [], 1, "l0")
    from_windows = mean_abs_inputs(per_window, names)
    for n in names:
        ref = torch.cat(seen[n]).abs().mean(0)
        got = stats.mean_abs(n)
        assert got is not None and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=2**-23, atol=0)
        torch.testing.assert_close(got, from_windows[n], rtol=2**-23, atol=0)
    merged = InputStats(layer, "l0")
    merged.remove()
    with torch.no_grad():
        for k in range(0, len(hidden), SHARD_WINDOWS):
            part = collect_stats(layer, call, hidden[k : k + SHARD_WINDOWS], "l0")
            merged.add_shard(part.sums, part.counts, part.group_of, part.abs_sums)
    assert SHARD_WINDOWS < len(hidden)
    for a, b in zip(stats.abs_sums, merged.abs_sums, strict=True):
        assert torch.equal(a, b)
    merged.add_shard(part.sums, part.counts, part.group_of)  # a shard without them
    assert merged.abs_sums is None and merged.mean_abs(names[0]) is None


@pytest.mark.parametrize("group", [16, 64])
def test_hessian_grams_are_every_token_s_group_grams(group):
    g = torch.Generator().manual_seed(group)
    x = torch.randn(300, 128, generator=g) * torch.rand(128, generator=g) * 4
    sums = x.double().T @ x.double()
    got = hessian_grams(sums, 300, group)
    ref = group_grams(x.double(), group)
    assert got.shape == (128 // group, group, group) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-5)
    # the clip search on given grams is the search on the inputs
    w = torch.randn(32, 128, generator=g)
    qdq = format_qdq("int4_g64" if group == 64 else "q4_0")
    a = search_clip(w, x, qdq, group, grams=group_grams(x, group))
    b = search_clip(w, x, qdq, group)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    with pytest.raises(Exception, match="inputs x or their grams"):
        search_clip(w, None, qdq, group)


def test_identity_false_is_the_grid_alone():
    g = torch.Generator().manual_seed(0)
    x_mean, w_mean = torch.rand(64, generator=g) + 0.1, torch.rand(64, generator=g) + 0.1
    with_1 = scale_candidates(x_mean, w_mean, 20, True)
    grid = scale_candidates(x_mean, w_mean, 20, True, identity=False)
    assert with_1[0][0] is None and len(grid) == 20 and grid[0][0] == 0.0
    for (ra, sa), (rb, sb) in zip(with_1[1:], grid, strict=True):
        assert ra == rb and torch.equal(sa, sb)


def test_block_search_capture_ends_at_its_last_block():
    """The attention search's capture pass does not run the MLP (nothing after the attention
    block is read), and its losses are those of a pass that runs the whole layer."""
    from ferroquant.calib.capture import LocalWindows
    from ferroquant.methods.awq_layers import pair_candidates, window_losses

    layer, call, hidden = _layer0(4)
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    x_mean = torch.ones(128)
    _, _, weights = pair_candidates(layer, names, ["q4_0"] * 3, AWQConfig(grid=4), {}, x_mean)
    calls = [0]
    h = layer.mlp.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    windows = LocalWindows(call, hidden)
    try:
        got = windows.map(layer, window_losses, [("self_attn", list(names), weights)])
    finally:
        h.remove()
    assert calls[0] == 0
    # the reference: the block's inputs from a whole-layer float32 pass, each candidate's
    # per-window squared output error computed here (the search runs in bf16: 2 % agreement)
    args: list = []
    h = layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw: args.append((a, dict(kw))), with_kwargs=True)  # fmt: skip
    with torch.no_grad():
        layer(torch.cat(hidden), *call.args, **call.kwargs)
    h.remove()
    assert len(args) == 1
    a, kw = args[0]
    lins = [layer.get_submodule(n) for n in names]
    w0 = [lin.weight.data for lin in lins]
    with torch.no_grad():
        ref = layer.self_attn(*a, **kw)[0]
        for c, ws in enumerate(weights):
            for lin, w in zip(lins, ws, strict=True):
                lin.weight.data = w
            out = layer.self_attn(*a, **kw)[0]
            for lin, w in zip(lins, w0, strict=True):
                lin.weight.data = w
            per_window = (out - ref).pow(2).sum((1, 2))
            for k in range(len(hidden)):
                assert got[k][0][0][c] == pytest.approx(float(per_window[k]), rel=2e-2)


def test_head_tie_fold_keeps_the_gqa_model_s_function():
    """v -> o under grouped-query attention (4 heads, 2 key/value heads): v's rows divided by
    random scales and o's columns multiplied by their `HeadTie` expansion compute the same
    logits (float64), and `first` undoes `expand`."""
    from ferroquant.methods.awq import HeadTie, fold_scale
    from ferroquant.methods.awq_layers import _head_tie

    pytest.importorskip("transformers")
    model = tiny_llama(kv_heads=2, layers=2).to(torch.float64)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    g = torch.Generator().manual_seed(5)
    for layer in model.model.layers:
        a = layer.self_attn
        tie = _head_tie(layer, a.v_proj, a.o_proj)
        assert tie == HeadTie(2, 2, 32)
        s = torch.exp((torch.rand(a.v_proj.out_features, generator=g) * 2 - 1) * 2.0)
        s = s.to(torch.float64)
        assert torch.equal(tie.first(tie.expand(s)), s)
        fold_scale(a.v_proj, [a.o_proj], tie.expand(s), tie.first(tie.expand(s)))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_gqa_vo_searches_v_to_o_under_grouped_query_attention():
    """With `gqa_vo`, the v -> o pair is searched under grouped-query attention, its scale is
    constant over the heads sharing a key/value head, and its pick is never above s = 1's."""
    from ferroquant.methods.awq_layers import awq_model

    pytest.importorskip("transformers")
    model = tiny_llama(kv_heads=2, layers=2)
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    report: dict = {}
    awq_model(model, lambda n, lin: "int4_g32", ids, AWQConfig(gqa_vo=True), {},
              progress=False, report=report)  # fmt: skip
    for i in range(2):
        res = report[f"model.layers.{i}.self_attn.v_proj"]
        s = res.scale.reshape(2, 2, 32)
        assert torch.equal(s[:, 0], s[:, 1])
        assert min(res.losses) <= res.losses[0]
    report = {}
    awq_model(tiny_llama(kv_heads=2, layers=1), lambda n, lin: "int4_g32", ids, AWQConfig(), {},
              progress=False, report=report)  # fmt: skip
    assert "model.layers.0.self_attn.v_proj" not in report


def test_block_search_passes_take_the_clip_rows_of_every_window():
    """The screen's two passes (every 4th window, then the others) give each window's strided
    clip rows once, and they are `window_inputs`' rows (a pass of the whole layer; the
    attention's output, o's input, through bf16 GEMMs of other batch shapes: 1e-2)."""
    from ferroquant.calib.capture import LocalWindows
    from ferroquant.methods.awq_layers import pair_candidates
    from ferroquant.methods.awq_windows import window_inputs, window_losses

    layer, call, hidden = _layer0(8)
    names = ("mlp.gate_proj", "mlp.up_proj")
    _, _, weights = pair_candidates(layer, names, ["q4_0"] * 2, AWQConfig(grid=4), {},
                                    torch.ones(128))  # fmt: skip
    rows = ["self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"]
    windows = LocalWindows(call, hidden)
    search = [("mlp", list(names), weights)]
    a = windows.map(layer, window_losses, search, (4, True), (rows, 8))
    b = windows.map(layer, window_losses, search, (4, False), (rows, 8))
    ref = windows.map(layer, window_inputs, [], rows, 8, "l0")
    for w in range(len(hidden)):
        got, other = (a[w][2], b[w][2]) if w % 4 == 0 else (b[w][2], a[w][2])
        assert other == {} and set(got) == set(rows)
        for n in rows:
            assert got[n].shape == (4, 128 if n != "mlp.down_proj" else 256)
            torch.testing.assert_close(got[n], ref[w][n][2], rtol=1e-2, atol=1e-2)


def test_float_inputs_and_clip_tokens_default_per_method():
    """None resolves per method (each measured the better pair for its method): awq gets the
    float inputs and every clip token, awq+gptq the sequential inputs and 512 tokens, also when
    an awq config is reused for awq+gptq; explicit values stay."""
    from ferroquant.methods import method_config

    awq = method_config("awq", AWQConfig())
    both = method_config("awq+gptq", AWQConfig())
    assert (awq.resolved().float_inputs, awq.resolved().clip_tokens) == (True, 0)
    assert (both.resolved().float_inputs, both.resolved().clip_tokens) == (False, 512)
    assert "float_inputs=True" in awq.describe() and "clip_tokens=0," in awq.describe()
    assert "float_inputs=False" in both.describe() and "clip_tokens=512," in both.describe()
    mine = method_config("awq+gptq", AWQConfig(float_inputs=True, clip_tokens=64)).resolved()
    assert (mine.float_inputs, mine.clip_tokens) == (True, 64)
    # the screen: awq every 8th window, 5 attention finalists; awq+gptq every 4th, 3 and 3
    a, b = awq.resolved(), both.resolved()
    assert (a.screen_stride, a.screen_keep, a.screen_keep_attention) == (8, 3, 5)
    assert (b.screen_stride, b.screen_keep, b.screen_keep_attention) == (4, 3, 3)
    mine = method_config("awq", AWQConfig(screen_stride=2, screen_keep=1)).resolved()
    assert (mine.screen_stride, mine.screen_keep, mine.screen_keep_attention) == (2, 1, 3)
