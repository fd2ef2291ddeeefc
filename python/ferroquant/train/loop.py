"""The fine-tuning loop of `ferroquant finetune` and benches/bench_train.py: token windows from a
text, AdamW over the model's trainable parameters, next-token loss, held-out perplexity.

Deliberately plain torch (no Trainer): the loop is a dozen lines, and the benchmark times its
steps against torchao's QAT with the very same loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .fused_loss import causal_lm_loss


@dataclass
class TrainConfig:
    """Defaults: AdamW (Loshchilov & Hutter), no warm-up or decay (runs of tens of steps),
    gradients clipped at norm 1. lr 1e-4: long QAT runs use 1e-5 .. 2e-5 (torchao's Llama
    recipes), but Adam moves a weight about lr a step, and in tens of steps 2e-5 moves it a few
    hundredths of a q4_0 grid step (amax / 8, about 0.01 here): nothing would round differently.
    Not tuned."""

    steps: int = 20
    lr: float = 1e-4
    batch: int = 4
    seq_len: int = 256
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # the loss through train.fused_loss (chunked lm_head + cross-entropy, the head's GEMMs in
    # the frozen base layers' compute dtype) where the model allows it: QLoRA's default
    fused_loss: bool = False

    def describe(self) -> str:
        return (
            f"{self.steps} steps of {self.batch} x {self.seq_len} tokens, AdamW lr {self.lr:g}, "
            f"weight decay {self.weight_decay:g}, grad-norm clip {self.max_grad_norm:g}"
        )


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def median_step_s(self) -> float:
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else float("nan")


def training_windows(tokenizer: Any, text: str, cfg: TrainConfig) -> torch.Tensor:
    """As many non-overlapping windows of seq_len tokens as the text holds, from its start (at
    least one batch's worth, else a ValueError saying how many fit)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // cfg.seq_len
    if n < cfg.batch:
        raise ValueError(
            f"the training text has {len(ids)} tokens: {n} windows of {cfg.seq_len}, fewer than "
            f"one batch of {cfg.batch}; pass a longer --text or a smaller --seq-len / --batch"
        )
    return torch.tensor(ids[: n * cfg.seq_len], dtype=torch.int64).reshape(n, cfg.seq_len)


class Trainer:
    """One optimizer over `model`'s trainable parameters; `step()` takes the next batch of
    `windows` (a fixed shuffled order, seeded, cycled) and returns (loss, seconds). The
    benchmark steps several trainers in turn, so their step times share the machine's load."""

    def __init__(self, model: Any, windows: torch.Tensor, cfg: TrainConfig) -> None:
        self.model, self.windows, self.cfg = model, windows, cfg
        g = torch.Generator().manual_seed(cfg.seed)
        self.order = torch.randperm(windows.shape[0], generator=g)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.pos = 0
        self.log = TrainLog()

    def step(self) -> tuple[float, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.model.train()
        idx = self.order[(self.pos + torch.arange(cfg.batch)) % len(self.order)]
        self.pos += cfg.batch
        batch = self.windows[idx]
        if cfg.fused_loss:
            loss = causal_lm_loss(self.model, batch)
        else:
            loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.eval()
        dt = time.perf_counter() - t0
        self.log.losses.append(float(loss.detach()))
        self.log.step_seconds.append(dt)
        return self.log.losses[-1], dt


def train(
    model: Any,
    windows: torch.Tensor,
    cfg: TrainConfig,
    on_step: Callable[[int, float, float], None] | None = None,
) -> TrainLog:
    """`cfg.steps` optimizer steps of next-token loss; `on_step(step, loss, seconds)` after each."""
    t = Trainer(model, windows, cfg)
    for i in range(cfg.steps):
        loss, dt = t.step()
        if on_step is not None:
            on_step(i, loss, dt)
    return t.log


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, ctx: int = 512, max_tokens: int = 0) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `ctx` tokens of `ids` (1-D; the
    first `max_tokens` of it when > 0), each window scored from its start."""
    ids = ids.reshape(-1)
    if max_tokens > 0:
        ids = ids[:max_tokens]
    nll, count = 0.0, 0
    model.eval()
    for s in range(0, ids.numel() - 1, ctx):
        w = ids[s : s + ctx].unsqueeze(0)
        if w.shape[1] < 2:
            break
        logits = model(input_ids=w).logits.float()
        lp = torch.log_softmax(logits[0, :-1], dim=-1)
        nll -= float(lp.gather(1, w[0, 1:].unsqueeze(1)).sum())
        count += w.shape[1] - 1
    if count == 0:
        raise ValueError("the held-out text is too short to score (needs at least 2 tokens)")
    return math.exp(nll / count)
