"""`ferroquant eval`: what each precision costs in quality (perplexity, KL, top-1 against the
baseline on held-out text) and gains in size and speed. `run.py` runs the rows, `load.py` loads
the model and text, `metrics.py` scores windows, `speed.py` times each row in the native runtime
and in transformers, `report.py` writes the table, JSON and plot, `llamacpp.py` scores
llama.cpp's own quantizations."""

from __future__ import annotations

from .run import run_eval

__all__ = ["run_eval"]
