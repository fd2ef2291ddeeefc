"""Calibration data: a text (default: gensim's lee_background.cor, never the evaluation text
lee.cor) or token ids -> `n_samples` windows of `seq_len` consecutive tokens.

The text is tokenized once by the model's tokenizer without special tokens and cut from its
start into consecutive, non-overlapping windows (deterministic: no sampling). A text too short
for the requested windows is an error that says how many fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..defaults import CALIBRATION_TEXT, read_text_file


def read_calibration_text(path: str | Path | None = None) -> tuple[str, str]:
    """(text, description) of a calibration file; None: gensim's lee_background.cor."""
    return read_text_file(path, CALIBRATION_TEXT, "calibration")


def calibration_ids(
    calibration: Any,
    tokenizer: Any = None,
    n_samples: int = 128,
    seq_len: int = 512,
) -> Any:
    """Token windows [n_samples, seq_len] (torch int64) from `calibration`: None (the default
    text), a str (the text itself), a Path (a text file), a list of str (texts joined by blank
    lines), or token ids (a 1-D or 2-D tensor / array / nested list: 2-D rows are used as
    windows; a 1-D stream is cut). Text needs `tokenizer` (the model's)."""
    import torch

    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}")
    what = "the calibration token ids"
    if (
        calibration is None
        or isinstance(calibration, (str, Path))
        or (
            isinstance(calibration, (list, tuple))
            and calibration
            and isinstance(calibration[0], str)
        )
    ):
        if tokenizer is None:
            raise ValueError(
                "calibration text needs the model's tokenizer (tokenizer=...), or pass token ids"
            )
        if calibration is None or isinstance(calibration, Path):
            text, what = read_calibration_text(calibration)
        elif isinstance(calibration, str):
            text, what = calibration, f"the calibration text ({len(calibration)} characters)"
        else:
            text, what = "\n\n".join(calibration), f"{len(calibration)} calibration texts"
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        ids = torch.tensor(ids, dtype=torch.int64)
    else:
        ids = torch.as_tensor(calibration).to(torch.int64)
    if ids.dim() == 2:
        if ids.shape[0] >= n_samples and ids.shape[1] >= seq_len:
            return ids[:n_samples, :seq_len].contiguous()
        ids = ids.reshape(-1)
    if ids.dim() != 1:
        raise ValueError(f"calibration token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
    need = n_samples * seq_len
    if ids.numel() < need:
        fit = ids.numel() // seq_len
        raise ValueError(
            f"{what} has {ids.numel()} tokens; {n_samples} samples x {seq_len} tokens need "
            f"{need} (it holds {fit} samples of {seq_len}: lower --calib-samples / --calib-len, "
            "or give a longer text)"
        )
    return ids[:need].reshape(n_samples, seq_len).contiguous()
