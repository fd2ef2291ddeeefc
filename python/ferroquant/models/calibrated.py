"""A calibrated method on a Hugging Face checkpoint, for the GGUF writer: the model loaded in
float32, quantized layer by layer (`quantize_model`), and its tensors handed to `hf_to_gguf`.
`ferroquant convert --method` runs it here; `ferroquant.distributed.convert` with a Ray runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def calibrated_tensors(
    src: str | Path,
    qtype: str,
    method: str,
    config: Any,
    calibration: Path | None = None,
    *,
    recipe: Any = None,
    progress: bool = True,
    runner: Any = None,
) -> dict[str, Any]:
    """{HF tensor name: QTensor} of `method` (with `config`, its n_samples x seq_len windows of
    `calibration`: a text file, None for the default text) on the checkpoint `src`, plus (AWQ)
    the norms and biases its scales were folded into. `recipe`: the types to give (default: the
    `qtype` mix, lm_head kept as the recipe says); `runner`: where the layers run (None: here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..calib import calibration_ids
    from ..nn import QuantLinear
    from .quantize import quantize_model
    from .recipes import recipe_for

    src = Path(src)
    hp = json.loads((src / "config.json").read_text())
    n_head = int(hp.get("num_attention_heads", 1))
    n_gqa = n_head // int(hp.get("num_key_value_heads", n_head))
    if recipe is None:
        recipe = recipe_for(qtype, ("lm_head",), n_gqa)
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = calibration_ids(calibration, tok, config.n_samples, config.seq_len)  # before loading
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if v.dim() == 1}
    quantize_model(model, recipe, method=method, calibration=ids, config=config,
                   progress=progress, runner=runner)  # fmt: skip
    out: dict[str, Any] = {
        f"{name}.weight": mod.qtensor()
        for name, mod in model.named_modules()
        if isinstance(mod, QuantLinear)
    }
    for k, v in model.state_dict().items():  # AWQ's folds: rescaled norm weights / biases
        if k in before and not torch.equal(v, before[k]):
            out[k] = v.detach().to(torch.float32)
    return out
