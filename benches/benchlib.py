"""What every benchmark script here shares: repeated runs with the engines interleaved, the median
and spread (min-max) of each row, ratios against the peers, the machine line, the markdown table,
and which llama.cpp build is timed.

llama.cpp as a speed peer: the AVX-512 build that scripts/install-bench-peer.sh installs apart
from the test peer (default /opt/ferroquant-bench/llama-avx512, or $FERROQUANT_BENCH_LLAMA).
`use_bench_llama()` must run before anything imports llama_cpp; when that build is missing, the
AVX2 test peer is used and `llama_build()` says so.
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

BENCH_LLAMA = Path(os.environ.get("FERROQUANT_BENCH_LLAMA", "/opt/ferroquant-bench/llama-avx512"))
_llama_from: str | None = None


def add_runs(ap, default: int) -> None:
    ap.add_argument("--runs", type=int, default=default,
                    help=f"runs, engines interleaved within each (default {default})")  # fmt: skip


def interleave(engines: dict[str, Callable[[], object]], runs: int) -> dict[str, list]:
    """Each run calls every engine once, in an order rotated by one each run; returns each
    engine's results in run order."""
    names = list(engines)
    out: dict[str, list] = {n: [] for n in names}
    for r in range(runs):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(engines[n]())
    return out


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], fmt: str = ".1f") -> str:
    """'median (min-max)', or the value alone for a single run."""
    m = format(med(values), fmt)
    if len(values) < 2:
        return m
    sep = " to " if min(values) < 0 else "-"
    return f"{m} ({format(min(values), fmt)}{sep}{format(max(values), fmt)})"


def ratio(ours: Sequence[float], peer: Sequence[float], higher_is_better: bool = True) -> str:
    """How many times faster ours is than the peer, from the medians ('2.00x')."""
    a, b = med(ours), med(peer)
    return f"{(a / b if higher_is_better else b / a):.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu() -> tuple[str, set[str]]:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def ours_isa() -> str:
    """The widest instruction set ferroquant's CPU matmul kernels and runtime pick at run time
    on this machine, as the Rust core reports it (rust/core/src/cpu.rs)."""
    from ferroquant import _native

    return _native.kernel_simd_level()


def machine() -> str:
    """One line: date and time (UTC), CPU, cores, its AVX-512 extensions, load average."""
    model, fl = _cpu()
    names = (("avx512f", "F"), ("avx512bw", "BW"), ("avx512vl", "VL"), ("avx512_vnni", "VNNI"),
             ("avx512_bf16", "BF16"), ("avx512vbmi", "VBMI"))  # fmt: skip
    ext = "/".join(n for f, n in names if f in fl)
    isa = ("AVX2" if "avx2" in fl else "no AVX2") + (f", AVX-512 {ext}" if ext else "")
    isa += ", AMX present" if any(f.startswith("amx") for f in fl) else ", no AMX"
    now = datetime.datetime.now(datetime.timezone.utc)
    cores = f"{os.cpu_count()} cores"
    return f"{now:%Y-%m-%d %H:%M} UTC; {model}, {cores} ({isa}); load average {load()}"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def use_bench_llama() -> None:
    """Put the AVX-512 llama-cpp-python build first on sys.path when it is installed. Call it
    before anything imports llama_cpp."""
    global _llama_from
    if "llama_cpp" in sys.modules:
        raise RuntimeError("use_bench_llama() must run before llama_cpp is imported")
    if (BENCH_LLAMA / "llama_cpp" / "__init__.py").exists():
        sys.path.insert(0, str(BENCH_LLAMA))
        _llama_from = str(BENCH_LLAMA)


def llama_path() -> str | None:
    """The folder of the AVX-512 build when use_bench_llama() put it on sys.path (for children)."""
    return _llama_from


def llama_build() -> str:
    """Which llama.cpp this process times, and what it was built for (its system info line)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode().strip().rstrip("|").strip()
    where = os.path.dirname(os.path.dirname(llama_cpp.__file__))
    line = f"llama-cpp-python {llama_cpp.__version__} from {where}: {info}"
    if _llama_from is None:
        if ours_isa() == "avx2":
            # No AVX-512 here: ours runs AVX2 too, so the baseline build is the like-for-like peer.
            return f"{line}\n  the AVX2 baseline build (the test peer); ferroquant runs AVX2 here"
        return (
            f"{line}\nWARNING: only the AVX2 baseline llama.cpp was available (the test peer): "
            "it is NOT built for the instruction set ferroquant uses here; run "
            "scripts/install-bench-peer.sh for the AVX-512 build."
        )
    flags = BENCH_LLAMA / "FERROQUANT_BUILD_FLAGS"
    if flags.exists():
        line += f"\n  built with CMAKE_ARGS={flags.read_text().strip()}"
    return line
