"""The scoring of `ferroquant eval`: windows over the text and the metrics against the baseline
(perplexity, mean KL divergence, top-1 agreement), summed in float64 from log-softmax."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Window:
    """Feed tokens[start:end]; score the targets tokens[first:end] (first > start)."""

    start: int
    end: int
    first: int

    @property
    def n_scored(self) -> int:
        return self.end - self.first


def make_windows(n_tokens: int, ctx: int, stride: int, max_tokens: int = 0) -> list[Window]:
    """Windows of at most `ctx` tokens every `stride` tokens; each token is scored once, in the
    first window that reaches it (a window scores the tokens past those scored before, as Hugging
    Face's sliding-window perplexity does); at most `max_tokens` scored (0: all)."""
    if ctx < 2:
        raise ValueError(f"--ctx must be at least 2, got {ctx}")
    if not 1 <= stride <= ctx:
        raise ValueError(f"--stride must be between 1 and ctx={ctx}, got {stride}")
    if max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0 (0: the whole text), got {max_tokens}")
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s); at least 2 are needed to score one")
    out: list[Window] = []
    scored = 0
    done_until = 0  # every target below this position is scored already
    start = 0
    while True:
        end = min(start + ctx, n_tokens)
        first = max(start + 1, done_until)
        if max_tokens:
            end = min(end, first + max_tokens - scored)
        if first < end:
            out.append(Window(start, end, first))
            scored += end - first
            done_until = end
        if start + ctx >= n_tokens or (max_tokens and scored >= max_tokens):
            return out
        start += stride


@dataclass
class Scores:
    """Running sums over scored tokens (float64)."""

    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    n: int = 0

    def add(self, logits: Any, base_logits: Any, targets: Any, chunk: int = 128) -> None:
        """Add tokens: `logits`/`base_logits` [T, V] predict `targets` [T] (token ids)."""
        import torch

        for i in range(0, targets.shape[0], chunk):
            lq = torch.log_softmax(logits[i : i + chunk].to(torch.float64), dim=-1)
            lp = torch.log_softmax(base_logits[i : i + chunk].to(torch.float64), dim=-1)
            t = targets[i : i + chunk].to(torch.int64)
            self.nll -= float(lq.gather(-1, t[:, None]).sum())
            p = lp.exp()
            # p * (log p - log q), with 0 where p underflowed to 0 (0 log 0 = 0)
            terms = torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=torch.float64))
            self.kl += float(terms.sum())
            same = logits[i : i + chunk].argmax(-1) == base_logits[i : i + chunk].argmax(-1)
            self.top1 += int(same.sum())
            self.n += int(t.shape[0])

    def ppl(self) -> float:
        return math.exp(self.nll / self.n)

    def mean_kl(self) -> float:
        return self.kl / self.n

    def top1_rate(self) -> float:
        return self.top1 / self.n
