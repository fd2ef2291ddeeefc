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
    ("hf_prompt_tps", "hf prompt tok/s"),
    ("hf_decode_tps", "hf decode tok/s"),
    ("kernel", "hf matmul"),
)
MARK = "†"  # a row with no tensor of the qtype it is named after
NONE = "–"  # a figure the row does not have (no runtime for its formats)


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return NONE
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
    if key.endswith("_tps"):
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
    body = [[_fmt(k, row.get(k)) for k, _ in columns] for row in rows]
    for cells, row in zip(body, rows, strict=True):
        if row.get("named_qtype_absent"):
            cells[0] += " " + MARK
    return head, body


def footnotes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per marked row: which qtype it lacks and what it holds instead."""
    return [f"{MARK} {r['note']}" for r in rows if r.get("named_qtype_absent")]


_SPEED_KEYS = {
    "speed_runtime": "runtime speed",
    "speed_runtime_missing": "not in the runtime",
    "speed_transformers": "transformers speed",
}


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
        *([f"calibration: {p['calibration']}"] if p.get("calibration") else []),
        f"metrics: {p['metrics']}",
        f"size: {p['size']}",
        f"speed: {p['speed']}; threads {p['threads']}",
        *(f"{label}: {p[k]}" for k, label in _SPEED_KEYS.items() if p.get(k)),
        f"machine: {p['machine']}"
        + (f", {p['cpu']}" if p.get("cpu") else "")
        + f"; load average {load.get('start')} -> {load.get('end')}",
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
    out += footnotes(result["rows"])
    return "\n".join(out)


def _md_table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(r) + " |" for r in body
    ]


def to_markdown(result: dict[str, Any]) -> str:
    out = ["# ferroquant eval", "", "Protocol:", ""]
    out += [f"- {s}" for s in protocol_lines(result)]
    out += ["", *_md_table(*table_cells(result["rows"]))]
    notes = footnotes(result["rows"])
    if notes:
        out += ["", *(f"{n}  " if i < len(notes) - 1 else n for i, n in enumerate(notes))]
    lc = _llama(result)
    if lc is not None:
        out += ["", "## llama.cpp, same protocol", ""] + [f"- {s}" for s in _llama_lines(lc)]
        out += ["", *_md_table(*table_cells(lc["rows"], LLAMA_COLUMNS))]
    return "\n".join(out) + "\n"


def figure(result: dict[str, Any]) -> Any:
    """bits/weight against mean KL (left) and against the runtime's decode tokens/s (right);
    coincident points share a label, the others' labels are placed apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    rows = result["rows"]
    p = result["protocol"]
    lc = _llama(result)
    stacks = [("ferroquant", rows, "o")] + ([("llama.cpp", lc["rows"], "x")] if lc else [])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), layout="constrained")
    panels = (
        (axes[0], "kl", "mean KL divergence vs bf16 (symlog; lower is better)"),
        (axes[1], "decode_tps", "decode tokens/s, native runtime (log; higher is better)"),
    )
    points: dict[int, list[tuple[str, float, float]]] = {0: [], 1: []}
    for i, (ax, key, label) in enumerate(panels):
        for stack, rs, marker in stacks:
            pts = [(r["name"], r["bits_per_weight"], r.get(key)) for r in rs]
            pts = [t for t in pts if t[2] is not None]
            ax.scatter([t[1] for t in pts], [t[2] for t in pts], marker=marker, label=stack)
            points[i] += pts
        if lc:
            ax.legend(loc="best")
        ax.set_xlabel("bits per weight (whole model, as stored; lower is smaller)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    kls = [t[2] for t in points[0] if t[2] > 0]
    axes[0].set_yscale("symlog", linthresh=min(kls) if kls else 1e-6)
    axes[1].set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axes[0].yaxis.set_major_formatter(plain)
    axes[1].yaxis.set_major_locator(FixedLocator(log_ticks(*axes[1].get_ylim())))
    axes[1].yaxis.set_major_formatter(plain)
    axes[1].yaxis.set_minor_formatter(NullFormatter())
    missing = [r["name"] for r in rows if r.get("decode_tps") is None]
    if missing:
        axes[1].text(0.01, 0.01, "not in the runtime (no GGUF type): " + ", ".join(missing),
                     transform=axes[1].transAxes, fontsize=7, va="bottom")  # fmt: skip
    fig.suptitle(
        f"{p['model']}: ctx {p['ctx']}, {p['tokens_scored']} tokens scored, {p['threads']} threads",
        fontsize=10,
    )
    fig.canvas.draw()  # fix the layout, then place the labels in display coordinates
    fig.set_layout_engine("none")
    for i, (ax, _, _) in enumerate(panels):
        _place_labels(fig, ax, points[i])
    return fig


def plot(result: dict[str, Any], path: Path) -> None:
    """Write `figure(result)` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
        _readable(tmp)
    plt.close(fig)


def log_ticks(lo: float, hi: float, at_least: int = 4) -> list[float]:
    """Round numbers between `lo` and `hi` (> 0) for a log axis: the coarsest of 1-2-5-like
    series that gives `at_least` ticks (a range under one decade still gets several)."""
    import math

    lo, hi = min(lo, hi), max(lo, hi)
    if lo <= 0:
        lo = hi / 1e3
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    series = ((1,), (1, 2, 5), (1, 2, 3, 5), (1, 1.5, 2, 3, 4, 5, 6, 8),
              (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9))  # fmt: skip
    ticks: list[float] = []
    for subs in series:
        ticks = [float(f"{m * 10.0**e:.6g}") for e in decades for m in subs]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= at_least:
            break
    return ticks


def label_groups(
    points: list[tuple[str, float, float]], xy: list[tuple[float, float]], radius: float = 5.0
) -> list[tuple[str, list[int]]]:
    """Points closer than `radius` (display pixels, `xy`) share one label: "a = b" when their
    values are the same, "a, b" when they are only close."""
    groups: list[list[int]] = []
    for k, (x, y) in enumerate(xy):
        for g in groups:
            if any(abs(x - xy[j][0]) <= radius and abs(y - xy[j][1]) <= radius for j in g):
                g.append(k)
                break
        else:
            groups.append([k])
    out = []
    for g in groups:
        same = all(points[j][1:] == points[g[0]][1:] for j in g)
        names = list(dict.fromkeys(points[j][0] for j in g))
        out.append(((" = " if same else ", ").join(names), g))
    return out


# label offsets tried in turn (points from the marker; alignment)
_OFFSETS = (
    ((5, 3), "left", "bottom"), ((5, -3), "left", "top"), ((-5, 3), "right", "bottom"),
    ((-5, -3), "right", "top"), ((0, 7), "center", "bottom"), ((0, -7), "center", "top"),
    ((8, 12), "left", "bottom"), ((8, -12), "left", "top"), ((-8, 12), "right", "bottom"),
    ((-8, -12), "right", "top"), ((0, 20), "center", "bottom"), ((0, -20), "center", "top"),
)  # fmt: skip


def _place_labels(fig: Any, ax: Any, points: list[tuple[str, float, float]]) -> None:
    """Annotate each group of points at the first offset whose text box meets no other label,
    no marker and stays inside the axes (else the offset with the least overlap)."""
    from matplotlib.transforms import Bbox

    if not points:
        return
    renderer = fig.canvas.get_renderer()
    xy = [tuple(ax.transData.transform((x, y))) for _, x, y in points]
    markers = [Bbox.from_extents(x - 4, y - 4, x + 4, y + 4) for x, y in xy]
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for text, members in label_groups(points, xy):
        anchor = points[members[0]][1:]
        best: tuple[float, Any] | None = None
        for off, ha, va in _OFFSETS:
            ann = ax.annotate(text, anchor, textcoords="offset points", xytext=off, ha=ha, va=va,
                              fontsize=7)  # fmt: skip
            box = ann.get_window_extent(renderer)
            cost = sum(_overlap(box, b) for b in placed)
            cost += sum(_overlap(box, m) for k, m in enumerate(markers) if k not in members)
            cost += box.width * box.height - _overlap(box, frame)  # outside the axes
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann)
            else:
                ann.remove()
            if cost == 0:
                break
        assert best is not None
        placed.append(best[1].get_window_extent(renderer))


def _overlap(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


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
