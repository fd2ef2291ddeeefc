"""The resume side folder of a calibrated conversion on the cluster (`OUT.layers.resume/`, next to
the output, removed when the output is complete): what the finished decoder layers became and the
next layer's inputs, so that `--resume` continues at layer granularity.

    state.json        {"fingerprint": ..., "done": k}: layers 0..k-1 are finished (written last)
    layer-00000.pt    a finished layer as the driver holds it after the method (QuantLinears
                      swapped in, AWQ's folds applied), pickled with torch.save
    inputs-00001.pt   the calibration windows' hidden states at layer k's input (float32, in
                      shard order): the outputs of layer k-1
    float-inputs-00001.pt  where the method carries a second stream (GPTQ's asymmetric
                      calibration: the float model's hidden states), that stream at layer k

Every file is written atomically (temporary file, fsync, rename) and state.json after the files
it names, so a driver killed at any point leaves a consistent folder: at worst the layer it was
on is done again. The layers and the next inputs are what the rest of the pipeline needs; the
inputs are rewritten per layer (the calibration set's hidden states, n_samples x seq_len x hidden
float32: 151 MB for SmolLM2-135M at 128 x 512), the layers are written once each. The files are
pickles: resume only from a folder this tool wrote (the fingerprint is checked, not trust)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .._atomic import atomic_path

log = logging.getLogger(__name__)


def layers_path(out_path: str | os.PathLike[str]) -> Path:
    out = Path(out_path)
    return out.with_name(out.name + ".layers.resume")


def ids_fingerprint(base: str, ids: Any, n_layers: int) -> str:
    """`base` (checkpoint, plan, method, config, version) with the calibration windows' tokens."""
    import numpy as np

    h = hashlib.sha256(base.encode())
    h.update(str((tuple(ids.shape), n_layers)).encode())
    h.update(np.ascontiguousarray(ids.cpu().numpy(), np.int64).tobytes())
    return h.hexdigest()


class LayerJournal:
    """The side folder of one calibrated conversion. `resume=False` starts afresh (an old folder
    is cleared); `resume=True` continues from the layers an interrupted run finished, once
    `open(fingerprint)` has checked that the folder belongs to the same run."""

    def __init__(self, path: Path, *, resume: bool) -> None:
        self.path, self.resume = path, resume
        self.done = 0

    def open(self, fingerprint: str) -> int:
        """Check or start the folder; the number of layers already finished."""
        self.fingerprint = fingerprint
        state = self.path / "state.json"
        if self.resume and state.is_file():
            try:
                meta = json.loads(state.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"{state}: not a ferroquant resume state ({e}); remove "
                                 f"{self.path}") from None  # fmt: skip
            if meta.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{self.path}: belongs to another conversion (other checkpoint, qtype, "
                    "method, settings, calibration text or version); remove it or convert "
                    "without --resume"
                )
            self.done = int(meta["done"])
            log.info("resuming: %d layers finished in %s", self.done, self.path)
            return self.done
        if self.path.exists():
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        self.path.mkdir(parents=True)
        self._state(0)
        return 0

    def _state(self, done: int) -> None:
        with atomic_path(self.path / "state.json") as tmp:
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": done}))
        self.done = done

    def _save(self, obj: Any, name: str) -> None:
        import torch

        with atomic_path(self.path / name) as tmp:
            torch.save(obj, tmp)

    def _load(self, name: str) -> Any:
        import torch

        path = self.path / name
        try:
            return torch.load(path, weights_only=False)  # our own pickle (fingerprinted)
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            raise ValueError(f"{path}: cannot be read ({e}); remove {self.path}") from None

    def save(self, index: int, layer: Any, inputs: list[Any],
             float_inputs: list[Any] | None = None) -> None:  # fmt: skip
        """Layer `index` is finished; `inputs`: the next layer's hidden states (its outputs);
        `float_inputs`: the method's second stream at the next layer, if it carries one."""
        self._save(layer, f"layer-{index:05d}.pt")
        self._save(inputs, f"inputs-{index + 1:05d}.pt")
        if float_inputs is not None:
            self._save(float_inputs, f"float-inputs-{index + 1:05d}.pt")
        self._state(index + 1)
        (self.path / f"inputs-{index:05d}.pt").unlink(missing_ok=True)
        (self.path / f"float-inputs-{index:05d}.pt").unlink(missing_ok=True)

    def layer(self, index: int) -> Any:
        return self._load(f"layer-{index:05d}.pt")

    def inputs(self) -> list[Any]:
        """The hidden states at the input of the first layer not finished."""
        return self._load(f"inputs-{self.done:05d}.pt")

    def float_inputs(self) -> list[Any]:
        """The method's second stream at the first layer not finished (see `save`)."""
        return self._load(f"float-inputs-{self.done:05d}.pt")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
