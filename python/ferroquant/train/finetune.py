"""`ferroquant finetune`: load a model as a float transformers model, train it on a text (with the
quantization in the loop under --qat, plain otherwise), quantize it, score it on held-out text
and write it (GGUF or ferroquant safetensors), atomically and only after everything succeeded.

Every check on the arguments (output suffix, qtype, LoRA option, model path, text, whether the
qtype fits the model's rows) runs before training starts, so bad input costs nothing and writes
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._extras import require
from ..defaults import CALIBRATION_TEXT, EVAL_TEXT, read_text_file, resolve_model
from ..qtypes import qtype_info, qtypes
from ..tensor import QuantizeError

OUT_SUFFIXES = (".gguf", ".safetensors")
# qtypes without a ggml type id: a QLoRA base in one of them re-quantizes to a ggml qtype for GGUF
_NON_GGUF = frozenset(q.name for q in qtypes() if q.ggml_id is None)


@dataclass
class LoraSpec:
    """`--lora r=16[,alpha=32][,dropout=0.05][,targets=q_proj,v_proj]` (peft's LoraConfig names;
    alpha defaults to 2r, targets to q_proj,v_proj as in the QLoRA paper's smallest setup)."""

    r: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


def parse_lora(spec: str) -> LoraSpec:
    """Parse the --lora option; a bare name after `targets=` continues its list."""
    fields: dict[str, list[str]] = {}
    key = None
    for part in (p.strip() for p in spec.split(",")):
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip()
            if key not in ("r", "alpha", "dropout", "targets"):
                raise ValueError(f"--lora: unknown field {key!r} (r, alpha, dropout, targets)")
            fields[key] = [value.strip()] if value.strip() else []
        elif key == "targets" and part:
            fields[key].append(part)
        else:
            raise ValueError(f"--lora: expected key=value, got {part!r} in {spec!r}")
    if "r" not in fields or len(fields["r"]) != 1:
        raise ValueError(f"--lora needs r=RANK, got {spec!r}")
    try:
        r = int(fields["r"][0])
        alpha = float(fields["alpha"][0]) if "alpha" in fields else None
        dropout = float(fields["dropout"][0]) if "dropout" in fields else 0.0
    except (ValueError, IndexError):
        raise ValueError(f"--lora: r is an integer, alpha and dropout numbers: {spec!r}") from None
    if r < 1:
        raise ValueError(f"--lora: r must be at least 1, got {r}")
    out = LoraSpec(r=r, alpha=alpha, dropout=dropout)
    if "targets" in fields:
        if not fields["targets"]:
            raise ValueError("--lora: targets= names at least one module (q_proj,v_proj)")
        out.targets = fields["targets"]
    return out


def load_float_model(model: str | Path | None) -> tuple[Any, Any]:
    """(float32 transformers model, tokenizer) from a checkpoint folder or a .gguf file (None:
    the shipped SmolLM2-135M-Instruct GGUF, dequantized by transformers as `ferroquant eval`
    loads it). The model's `ferroquant_gguf` names the GGUF it came from (its tokenizer for a
    GGUF output)."""
    folder, gguf_file = resolve_model(model)
    torch = require("torch", "ferroquant finetune", "eval")
    transformers = require("transformers", "ferroquant finetune", "eval")
    kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), **kw)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    m.ferroquant_gguf = str(folder / gguf_file) if gguf_file else str(folder)
    return m.eval(), tok


@dataclass
class FinetuneArgs:
    model: str | None
    out: Path
    text: str | None = None
    qat: str | None = None
    qtype: str | None = None
    steps: int = 20
    lr: float = 1e-4
    seq_len: int = 256
    batch: int = 4
    eval_text: str | None = None
    eval_tokens: int = 4096
    lora: str | None = None
    ternary_format: str = "tq2_0"
    merge_qtype: str | None = None


def check(a: FinetuneArgs) -> tuple[str, LoraSpec | None]:
    """Every argument check that needs no model: returns (the qtype or mix to quantize with, the
    LoRA spec). Raises ValueError / QuantizeError / FileNotFoundError naming what is wrong."""
    if a.out.suffix.lower() not in OUT_SUFFIXES:
        raise ValueError(f"-o must end in .gguf or .safetensors, got {a.out}")
    if not a.out.parent.is_dir():
        raise FileNotFoundError(f"the output folder {a.out.parent} does not exist")
    if a.steps < 1 or a.batch < 1 or a.seq_len < 2 or not a.lr > 0:
        raise ValueError("need --steps >= 1, --batch >= 1, --seq-len >= 2 and --lr > 0")
    if a.qat and a.qtype and a.qat.lower() != a.qtype.lower():
        raise ValueError(f"--qat {a.qat} and --qtype {a.qtype} disagree: --qat sets the qtype")
    from ..models.recipes import recipe_for  # (models/ needs torch: imported after `require`)

    if a.lora and a.qat:
        raise ValueError("--lora trains adapters over a quantized base: use it without --qat")
    if a.merge_qtype and not a.lora:
        raise ValueError("--merge-qtype applies to --lora only")
    default = "nf4" if a.lora else "q4_0"
    target = (a.qat or a.qtype or default).lower()
    if target != "ternary":
        recipe_for(target)  # an unknown name is a QuantizeError listing the valid ones
    elif not a.qat:
        raise QuantizeError("ternary has no post-training form here: use --qat ternary")
    lora = parse_lora(a.lora) if a.lora else None
    if lora is not None:
        merged = (a.merge_qtype or target).lower()
        if a.merge_qtype:
            qtype_info(merged)  # an unknown name is a QuantizeError listing the valid ones
        if a.out.suffix.lower() == ".gguf" and merged in _NON_GGUF:
            raise ValueError(
                f"a .gguf output cannot hold {merged}: pass --merge-qtype with a ggml qtype "
                "(q4_0, q4_k, q8_0, ...) for the merged weights, or write .safetensors"
            )
    resolve_model(a.model)
    read_text_file(a.text, CALIBRATION_TEXT, "training")
    read_text_file(a.eval_text, EVAL_TEXT, "held-out")
    return target, lora


def run(a: FinetuneArgs, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, quantize, score, write. Returns {ppl, losses, median_step_s, written}."""
    torch = require("torch", "ferroquant finetune", "eval")
    require("transformers", "ferroquant finetune", "eval")

    from ..models.quantize import quantize_model
    from . import qat
    from .loop import TrainConfig, perplexity, train, training_windows

    target, lora = check(a)
    if lora is not None:
        from . import lora as qlora  # needs peft: a missing extra is named before any work
    model, tok = load_float_model(a.model)
    if lora is not None:
        qlora.check_targets(model, lora.targets)  # before any work: nothing written
        qat.plan(model, target)  # as for --qat: a named qtype must hold every layer's rows
        quantize_model(model, target, progress=False)
        model = qlora.apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.targets)
    elif a.qat:
        qat.prepare(model, target)  # checks every layer's row length before changing any
    # QLoRA: the frozen lm_head's GEMMs and the loss fused and chunked (train.fused_loss)
    cfg = TrainConfig(steps=a.steps, lr=a.lr, batch=a.batch, seq_len=a.seq_len,
                      fused_loss=lora is not None)  # fmt: skip
    text, what = read_text_file(a.text, CALIBRATION_TEXT, "training")
    windows = training_windows(tok, text, cfg)
    if lora is not None:
        mode = f"QLoRA r={lora.r} on {','.join(lora.targets)} over a {target} base"
    elif a.qat:
        mode = f"QAT {target}"
    else:
        mode = f"plain fine-tuning, then {target}"
    say(f"ferroquant finetune: {mode}; {cfg.describe()}; text {what} ({windows.shape[0]} windows)")

    def on_step(i: int, loss: float, dt: float) -> None:
        say(f"step {i + 1}/{cfg.steps}  loss {loss:.4f}  {dt:.1f} s")

    log = train(model, windows, cfg, on_step)
    if lora is not None:
        model = qlora.merge_lora(model, a.merge_qtype)
        say(f"merged the adapters, re-quantized to {a.merge_qtype or target}")
    elif a.qat:
        qat.convert(model, ternary_as=a.ternary_format)
    else:
        quantize_model(model, target, progress=False)
    eval_text, eval_what = read_text_file(a.eval_text, EVAL_TEXT, "held-out")
    ids = torch.tensor(tok(eval_text, add_special_tokens=False, verbose=False)["input_ids"])
    ppl = perplexity(model, ids, 512, a.eval_tokens)
    say(f"held-out perplexity ({eval_what}, first {a.eval_tokens} tokens, ctx 512): {ppl:.3f}")
    if a.out.suffix.lower() == ".gguf":
        from ..models.gguf_model import save_gguf_model

        save_gguf_model(model, a.out, tokenizer=model.ferroquant_gguf)
    else:
        from ..models.serialization import save_quantized

        save_quantized(model, a.out)
    say(f"wrote {a.out}")
    return {
        "ppl": ppl,
        "losses": log.losses,
        "median_step_s": log.median_step_s,
        "written": str(a.out),
    }
