"""The outputs of `ferroquant eval`: the table (text and Markdown), JSON and a PNG plot, each with
the protocol it was measured under."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._atomic import atomic_path

COLUMNS = (
    ("name", "precision"),
    ("qtypes_used", "tensors (qtype x count)"),
    ("bits_per_weight", "bits/w"),
    ("size_mb", "size MB"),
    ("ppl", "ppl"),
    ("dppl_pct", "Δppl %"),
    ("kl", "mean KL"),
    ("top1", "top-1"),
    ("prompt_tps", "prompt tok/s"),
    ("decode_tps", "decode tok/s"),
    ("kernel", "matmul"),
)


def _fmt(key: str, v: Any) -> str:
    if key == "qtypes_used":
        return ", ".join(f"{q} x{n}" for q, n in sorted(v.items(), key=lambda kv: -kv[1]))
    if key == "bits_per_weight":
        return f"{v:.3f}"
    if key == "size_mb":
        return f"{v:.1f}"
    if key == "ppl":
        return f"{v:.3f}"
    if key == "dppl_pct":
        return f"{v:+.2f}"
    if key == "kl":
        return f"{v:.5f}"
    if key == "top1":
        return f"{v:.4f}"
    if key in ("prompt_tps", "decode_tps"):
        return f"{v:.1f}"
    return str(v)


LLAMA_COLUMNS = (
    ("name", "row"),
    ("llama_ftype", "llama.cpp file type"),
    ("bits_per_weight", "bits/w"),
    ("size_mb", "size MB"),
    ("ppl", "ppl"),
    ("dppl_pct", "Δppl %"),
    ("kl", "mean KL"),
    ("top1", "top-1"),
    ("prompt_tps", "prompt tok/s"),
    ("decode_tps", "decode tok/s"),
)


def table_cells(
    rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...] = COLUMNS
) -> tuple[list[str], list[list[str]]]:
    head = [h for _, h in columns]
    body = [[_fmt(k, row[k]) for k, _ in columns] for row in rows]
    return head, body


def protocol_lines(result: dict[str, Any]) -> list[str]:
    p = result["protocol"]
    load = p.get("load_average") or {}
    formats = [f"formats: {p['formats']}"] if "formats" in p else []
    return [
        f"model: {p['model']}; baseline = {p['baseline']}",
        f"kept unquantized: {p['kept_unquantized']}",
        f"text: {p['text']}; {p['text_tokens']} tokens, {p['tokenization']}",
        f"windows: ctx {p['ctx']}, stride {p['stride']}, {p['windows']} windows, "
        f"{p['tokens_scored']} tokens scored"
        + (f" (cap {p['max_tokens']})" if p["max_tokens"] else " (whole text)"),
        *formats,
        f"metrics: {p['metrics']}",
        f"size: {p['size']}",
        f"speed: {p['speed']}; threads {p['threads']}",
        f"machine: {p['machine']}; load average {load.get('start')} -> {load.get('end')}",
        f"date: {p['date']}; ferroquant {p['ferroquant']}",
    ]


def _llama(result: dict[str, Any]) -> dict[str, Any] | None:
    return (result.get("against") or {}).get("llama.cpp")


def _llama_lines(lc: dict[str, Any]) -> list[str]:
    out = [f"{lc['stack']}, same protocol; baseline = {lc['baseline']}", lc["note"]]
    if lc["skipped"]:
        out.append("no llama.cpp file type for: " + ", ".join(lc["skipped"]))
    return out


def _text_table(head: list[str], body: list[list[str]], left: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(head), "  ".join("-" * w for w in widths), *(line(r) for r in body)]


def format_table(result: dict[str, Any]) -> str:
    """Plain text: the protocol, then the table (and llama.cpp's, with --against)."""
    out = ["ferroquant eval", *("  " + s for s in protocol_lines(result)), ""]
    lc = _llama(result)
    if lc is not None:
        out += ["llama.cpp:", *("  " + s for s in _llama_lines(lc)), ""]
        out += _text_table(*table_cells(lc["rows"], LLAMA_COLUMNS), {0, 1}) + [""]
        out += ["ferroquant:"]
    out += _text_table(*table_cells(result["rows"]), {0, 1, len(COLUMNS) - 1})
    return "\n".join(out)


def _md_table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(r) + " |" for r in body
    ]


def to_markdown(result: dict[str, Any]) -> str:
    out = ["# ferroquant eval", "", "Protocol:", ""]
    out += [f"- {s}" for s in protocol_lines(result)]
    out += ["", *_md_table(*table_cells(result["rows"]))]
    lc = _llama(result)
    if lc is not None:
        out += ["", "## llama.cpp, same protocol", ""] + [f"- {s}" for s in _llama_lines(lc)]
        out += ["", *_md_table(*table_cells(lc["rows"], LLAMA_COLUMNS))]
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """bits/weight against mean KL (left) and against decode tokens/s (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    p = result["protocol"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    for ax, key, label in (
        (axes[0], "kl", "mean KL divergence vs bf16 (symlog)"),
        (axes[1], "decode_tps", "CPU decode tokens/s (log)"),
    ):
        lc = _llama(result)
        for stack, rs, marker in (("ferroquant", rows, "o"), ("llama.cpp", lc and lc["rows"], "x")):
            if not rs:
                continue
            xs = [r["bits_per_weight"] for r in rs]
            ys = [r[key] for r in rs]
            ax.scatter(xs, ys, marker=marker, label=stack)
            for r, x, y in zip(rs, xs, ys, strict=True):
                ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)  # fmt: skip
        if lc:
            ax.legend()
        ax.set_xlabel("bits per weight (whole model, as stored)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    lc = _llama(result)
    kls = [r["kl"] for r in rows + (lc["rows"] if lc else []) if r["kl"] > 0]
    axes[0].set_yscale("symlog", linthresh=min(kls) if kls else 1e-6)
    axes[1].set_yscale("log")
    fig.suptitle(
        f"{p['model']}: ctx {p['ctx']}, {p['tokens_scored']} tokens scored, {p['threads']} threads",
        fontsize=10,
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
        _readable(tmp)
    plt.close(fig)


def _readable(path: Path) -> None:
    """Report files get the permissions of any new file (the temporary file is 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save(result: dict[str, Any], out_dir: str | Path, png: bool = True) -> dict[str, str]:
    """Write eval.json, eval.md and (png=True) eval.png into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "markdown": out / "eval.md"}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        _readable(tmp)
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(to_markdown(result), encoding="utf-8")
        _readable(tmp)
    if png:
        paths["png"] = out / "eval.png"
        plot(result, paths["png"])
    return {k: str(v) for k, v in paths.items()}
