"""Measured per-tensor allocation to a target size (`convert --target-size / --target-bpw`).

The optimiser is checked against brute force on small random instances (hypothesis); the
end-to-end path on a tiny random Llama: the file is at most the target, llama.cpp (the peer that
defines the format) loads and runs it, the plan is saved / reused / refused for another model,
and out-of-reach targets name both limits and write nothing.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_llama import make_tiny_llama

import ferroquant as fq
import ferroquant.gguf as fg
from ferroquant import cli
from ferroquant.methods.allocate import Sensitivity, TensorMeasure, candidates_for, optimise
from ferroquant.models.allocation import parse_size

import peers


@st.composite
def instances(draw):
    n = draw(st.integers(1, 4))
    measures = []
    for i in range(n):
        k = draw(st.integers(1, 4))
        sizes = sorted(draw(st.lists(st.integers(1, 50), min_size=k, max_size=k, unique=True)))
        errs = draw(st.lists(st.floats(0, 100), min_size=k, max_size=k))
        opts = {f"q{j}": (sizes[j], errs[j]) for j in range(k)}
        measures.append(TensorMeasure(f"t{i}", (1, 1), opts))
    lo = sum(min(b for b, _ in m.options.values()) for m in measures)
    hi = sum(max(b for b, _ in m.options.values()) for m in measures)
    return measures, draw(st.integers(lo, hi))


@settings(max_examples=200, deadline=None)
@given(instances())
def test_optimiser_fits_the_budget_and_is_near_brute_force(inst):
    measures, budget = inst
    choice = optimise(measures, budget)
    used = sum(m.options[choice[m.name]][0] for m in measures)
    score = sum(m.options[choice[m.name]][1] for m in measures)
    assert used <= budget
    best = min(
        sum(m.options[q][1] for m, q in zip(measures, combo, strict=True))
        for combo in itertools.product(*(list(m.options) for m in measures))
        if sum(m.options[q][0] for m, q in zip(measures, combo, strict=True)) <= budget
    )
    # Lagrangian + greedy fill: exact on the convex hull; off it, never worse than the best
    # choice plus the largest single-tensor score (the knapsack relaxation bound)
    assert score <= best + max(max(s for _, s in m.options.values()) for m in measures) + 1e-9
    # no single upgrade that still fits lowers the score (the greedy fill ran to the end)
    for m in measures:
        nb, ns = m.options[choice[m.name]]
        for b, s in m.options.values():
            assert not (s < ns and used - nb + b <= budget)


def test_out_of_reach_budgets_state_both_limits():
    m = [TensorMeasure("a", (1, 1), {"x": (10, 1.0), "y": (20, 0.0)})]
    with pytest.raises(ValueError, match="smallest 10 bytes, largest 20 bytes"):
        optimise(m, 9)
    with pytest.raises(ValueError, match="smallest 10 bytes, largest 20 bytes"):
        optimise(m, 21)


def test_candidates_and_sizes():
    assert candidates_for(512) == ("q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0")
    assert candidates_for(288) == ("q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0")
    assert parse_size("110MB") == 110_000_000 and parse_size("1KiB") == 1024
    with pytest.raises(ValueError, match="cannot read"):
        parse_size("lots")


def test_score_is_the_fisher_weighted_error():
    d2 = np.array([[1.0, 2.0], [3.0, 4.0]])
    s = Sensitivity(np.array([1.0, 10.0]), np.array([2.0, 0.5]))
    assert s.error(d2) == pytest.approx(0.5 * (2 * (1 + 20) + 0.5 * (3 + 40)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-alloc"))


@pytest.fixture(scope="module")
def allocated(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("alloc")
    text = d / "calib.txt"
    text.write_text("Quantization spends bits where they matter most. " * 80)
    out, plan = d / "alloc.gguf", d / "plan.json"
    args = ["convert", str(tiny), str(out), "--target-size", "9MB", "--plan", str(plan)]
    args += ["--calib", str(text), "--calib-samples", "2", "--calib-len", "64", "--quiet"]
    assert cli.main(args) == 0
    return d, out, plan, text


def test_allocated_file_fits_runs_in_llama_cpp_and_shows_its_plan(allocated, capsys):
    d, out, plan, _ = allocated
    assert out.stat().st_size <= 9_000_000
    with fg.open(out) as f:
        types = {
            t.qtype for n, t in f.tensors.items() if n.endswith(".weight") and len(t.shape) == 2
        }
    assert len(types) > 1  # a mix, not one type
    llama_cpp = peers.require("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False)
    try:
        llm.eval([1, 504, 3260, 5260])
        assert np.isfinite(np.array(llm.scores[:4])).all()
    finally:
        llm.close()
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "allocation plan" in shown and "blk.1.ffn_down.weight" in shown.split("allocation")[-1]
    saved = json.loads(plan.read_text())
    assert set(saved["chosen"]) == {t["name"] for t in saved["tensors"]}


def test_saved_plan_is_reused_without_measuring(allocated, tiny, monkeypatch):
    d, out, plan, _ = allocated
    import ferroquant.models.allocation as alloc

    def no_measure(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(alloc, "measure_model", no_measure)
    again = d / "again.gguf"
    assert cli.main(["convert", str(tiny), str(again), "--plan", str(plan), "--quiet"]) == 0
    assert again.read_bytes() == out.read_bytes()
    smaller = d / "smaller.gguf"
    args = ["convert", str(tiny), str(smaller), "--plan", str(plan), "--target-size", "7MB"]
    assert cli.main([*args, "--quiet"]) == 0
    assert smaller.stat().st_size <= 7_000_000


def test_bad_targets_and_foreign_plans_write_nothing(allocated, tiny, tmp_path, capsys):
    _, _, plan, _ = allocated
    other = make_tiny_llama(tmp_path / "other", tied=False)
    dst = tmp_path / "x.gguf"
    assert cli.main(["convert", str(other), str(dst), "--plan", str(plan), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "plan for another model" in err and not dst.exists()
    args = ["convert", str(tiny), str(dst), "--plan", str(tmp_path / "new.json"), "--quiet"]
    assert cli.main(args) == 2 and "give --target-size or --target-bpw" in capsys.readouterr().err
    for size in ("1MB", "90MB"):
        args = ["convert", str(tiny), str(dst), "--plan", str(plan), "--target-size", size]
        assert cli.main([*args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "the smallest file is" in err and "the largest" in err and not dst.exists()


def test_refusals_leave_an_existing_output_as_it_was(allocated, tiny, tmp_path, capsys):
    # --target-bpw out of reach, a plan whose tensor has another shape, an imatrix of another
    # model: each is refused before the writer opens, so an existing file keeps its bytes
    _, out, plan, _ = allocated
    dst = tmp_path / "kept.gguf"
    dst.write_bytes(b"an earlier file")
    for bpw in ("0.5", "40"):
        args = ["convert", str(tiny), str(dst), "--plan", str(plan), "--target-bpw", bpw]
        assert cli.main([*args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"--target-bpw {bpw}" in err and "smallest" in err and "largest" in err
    saved = json.loads(plan.read_text())
    saved["tensors"][0]["shape"][0] += 1
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(saved))
    name = saved["tensors"][0]["name"]
    assert cli.main(["convert", str(tiny), str(dst), "--plan", str(moved), "--quiet"]) == 2
    assert f"tensor {name} is" in capsys.readouterr().err
    from ferroquant.methods.imatrix_io import ImatrixEntry, ImportanceMatrix, write_imatrix

    entry = ImatrixEntry(np.ones((1, 128), np.float32), np.ones(1, np.float32))
    write_imatrix(ImportanceMatrix({"blk.1.ffn_down.weight": entry}), tmp_path / "bad.gguf")
    args = ["convert", str(tiny), str(dst), "--target-size", "9MB", "--quiet"]
    assert cli.main([*args, "--imatrix", str(tmp_path / "bad.gguf")]) == 2
    assert "blk.1.ffn_down.weight has 128 columns, the model's has 288" in capsys.readouterr().err
    assert dst.read_bytes() == b"an earlier file"


def test_eval_rows_with_imatrix_and_allocation(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ferroquant.eval.calibrated import Calibration, calibrated_copy
    from ferroquant.eval.run import row_spec, stored_bytes
    from ferroquant.models import quantize_model
    from ferroquant.nn import QuantLinear

    assert row_spec("q4_k_m+imatrix").options == {"calibrated": True}
    assert row_spec("alloc@q2_k").recipe == "q2_k"
    with pytest.raises(ValueError, match="ggml recipe"):
        row_spec("nf4+imatrix")
    tok = AutoTokenizer.from_pretrained(str(tiny))
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.bfloat16).eval()
    cal = Calibration(model, tok, imatrix_chunks=2, alloc_windows=2, ctx=64)
    plain = quantize_model(__import__("copy").deepcopy(model), "q4_k_m", progress=False)
    weighted = calibrated_copy(model, "q4_k_m", {"calibrated": True}, cal)
    imp = cal.imatrix()["model.layers.0.self_attn.q_proj"]
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    want = fq.quantize(w.contiguous(), "q4_k", imp)
    got = weighted.model.layers[0].self_attn.q_proj.qtensor()
    np.testing.assert_array_equal(np.asarray(got.data), np.asarray(want.data))
    alloc = calibrated_copy(model, "q4_k_m", {"calibrated": True, "allocate": True}, cal)
    kinds = {m.qtype for m in alloc.modules() if isinstance(m, QuantLinear)}
    assert len(kinds) > 1
    assert stored_bytes(alloc)[0] <= stored_bytes(plain)[0]


def test_gptq_quantizes_to_the_planned_types(allocated, tiny):
    d, out, plan, text = allocated
    gptq = d / "gptq.gguf"
    args = ["convert", str(tiny), str(gptq), "--plan", str(plan), "--method", "gptq"]
    args += ["--calib", str(text), "--calib-samples", "2", "--calib-len", "64", "--quiet"]
    assert cli.main(args) == 0
    assert gptq.stat().st_size == out.stat().st_size
    with fg.open(gptq) as g, fg.open(out) as r:
        assert {n: t.qtype for n, t in g.tensors.items()} == {
            n: t.qtype for n, t in r.tensors.items()
        }
        assert not np.array_equal(
            g.tensors["blk.0.attn_q.weight"].data, r.tensors["blk.0.attn_q.weight"].data
        )
