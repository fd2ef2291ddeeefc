"""A GGUF file's own tokenizer, built with the `tokenizers` library from its `tokenizer.ggml.*`
metadata (no transformers, no gguf-py, no torch), and its chat template rendered with jinja2.

    from ferroquant.runtime.tokenizer import GGUFTokenizer
    tok = GGUFTokenizer.from_gguf("model.gguf")
    ids = tok.encode("Hello world")                 # BOS first when the file asks for it
    tok.decode(ids)                                 # control tokens skipped
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

Two vocabulary types (`tokenizer.ggml.model`), as llama.cpp reads them:
- "gpt2": byte-level BPE. The text is split by the regexes llama.cpp uses for the file's
  `tokenizer.ggml.pre` (`PRE_TOKENIZER_SPLITS`; each regex splits the pieces the previous one
  left, keeping the matches and the text between them), then mapped to GPT-2's byte alphabet and
  merged by `tokenizer.ggml.merges`. For the llama3 and tekken families a word that is itself in
  the vocabulary is taken whole (llama.cpp's and the original tokenizers' `ignore_merges`).
- "llama": SentencePiece BPE. Spaces become "▁" and one is put before the text
  (`tokenizer.ggml.add_space_prefix`, default true); pairs merge in the order of the merged
  token's score (the merges are derived from `tokenizer.ggml.scores`, as transformers derives
  them); a character with no token becomes its UTF-8 bytes as `<0xNN>` tokens.
Tokens of type control (3) are special tokens and user-defined ones (4) added tokens: both are
matched whole in the text; control tokens are dropped by `decode(skip_special_tokens=True)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from .. import gguf as _gguf

FormatError = _gguf.FormatError

# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_CJK = "[一-龥ࠀ-一가-퟿]+"

# tokenizer.ggml.pre -> the regexes llama.cpp (src/llama-vocab.cpp) splits the text with, in
# order. The names llama-family GGUFs carry; others raise FormatError.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT,
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo"), (_GPT2,)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        (r"\p{N}", _GPT2),
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), (_LLAMA3,)
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (_QWEN2,)),
    "tekken": (_TEKKEN,),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
}
# The pre-tokenizers whose vocabularies take a word whole when it is a token (llama.cpp's
# ignore_merges), and that add BOS when the file does not say.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "tekken"}
_ADD_BOS = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "tekken"}


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the spelling of byte-level BPE tokens)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


def _field(md: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return md.get(f"tokenizer.ggml.{key}", default)


def _token_id(md: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    v = _field(md, key)
    if v is None:
        return None
    v = int(v)
    if not 0 <= v < n_vocab:
        raise FormatError(f"tokenizer.ggml.{key} = {v} is not a token id (vocabulary of {n_vocab})")
    return v


class GGUFTokenizer:
    """A GGUF's tokenizer: `tokenizer` (a `tokenizers.Tokenizer`), the special token ids,
    `add_bos_token` / `add_eos_token` and `chat_template` as the file gives them."""

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        md = metadata
        kind = _field(md, "model")
        if kind is None:
            raise FormatError("no tokenizer in this GGUF: tokenizer.ggml.model is missing")
        tokens = _field(md, "tokens")
        if tokens is None or len(tokens) == 0:
            raise FormatError("tokenizer.ggml.tokens is missing or empty")
        tokens = [str(t) for t in tokens]
        n = len(tokens)
        types = _field(md, "token_type")
        types = [NORMAL] * n if types is None else [int(t) for t in types]
        if len(types) != n:
            raise FormatError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        self.model_type: str = str(kind)
        self.pre: str | None = None
        self.bos_token_id = _token_id(md, "bos_token_id", n)
        self.eos_token_id = _token_id(md, "eos_token_id", n)
        self.unk_token_id = _token_id(md, "unknown_token_id", n)
        self.pad_token_id = _token_id(md, "padding_token_id", n)
        eot, eom = _token_id(md, "eot_token_id", n), _token_id(md, "eom_token_id", n)
        ends = (self.eos_token_id, eot, eom)
        # The tokens that end a generation: eos, and end-of-turn / end-of-message where given.
        self.stop_ids: list[int] = sorted({i for i in ends if i is not None})
        self.chat_template: str | None = md.get("tokenizer.chat_template")
        if kind == "gpt2":
            self.tokenizer = self._byte_level_bpe(md, tokens, types)
            add_bos_default = self.pre in _ADD_BOS
        elif kind == "llama":
            self.tokenizer = self._sentencepiece_bpe(md, tokens, types)
            add_bos_default = True
        else:
            raise FormatError(
                f"tokenizer.ggml.model = {kind!r} is not supported (supported: gpt2, llama)"
            )
        self.add_bos_token = bool(_field(md, "add_bos_token", add_bos_default))
        self.add_eos_token = bool(_field(md, "add_eos_token", False))
        self._add_special(tokens, types)
        self._post_processor(tokens)
        self.tokens = tokens

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> GGUFTokenizer:
        """Read `path`'s metadata (the tensors are not touched)."""
        with _gguf.open(path) as f:
            return cls(f.metadata)

    def _byte_level_bpe(self, md: Mapping[str, Any], tokens: list[str], types: list[int]) -> Any:
        pre = _field(md, "pre", "default")
        splits = PRE_TOKENIZER_SPLITS.get(pre)
        if splits is None:
            known = ", ".join(sorted(PRE_TOKENIZER_SPLITS))
            raise FormatError(f"tokenizer.ggml.pre = {pre!r} is not supported (supported: {known})")
        self.pre = pre
        spell = byte_alphabet()
        alphabet = set(spell.values())
        vocab: dict[str, int] = {}
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True)):
            if ty not in (CONTROL, USER_DEFINED) and not set(t) <= alphabet:
                t = "".join(spell[b] for b in t.encode("utf-8"))
            vocab[t] = i
        merges = _merges(md)
        tok = Tokenizer(
            models.BPE(vocab, merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES)
        )
        steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
        tok.decoder = decoders.ByteLevel()
        return tok

    def _sentencepiece_bpe(self, md: Mapping[str, Any], tokens: list[str], types: list[int]) -> Any:
        scores = _field(md, "scores")
        if scores is None and _field(md, "merges") is None:
            raise FormatError("a llama (SentencePiece) vocabulary needs tokenizer.ggml.scores")
        if scores is not None and len(scores) != len(tokens):
            raise FormatError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)}")
        vocab = {t: i for i, t in enumerate(tokens)}
        if _field(md, "merges") is not None:
            merges = _merges(md)
        else:
            merges = _merges_from_scores(vocab, dict(zip(tokens, map(float, scores), strict=True)))
        unk = tokens[self.unk_token_id] if self.unk_token_id is not None else None
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        # llama.cpp puts the space before every stretch of text that starts the input or follows
        # a special token, also when the text starts with a space (unlike Metaspace's "first").
        prefix = bool(_field(md, "add_space_prefix", True))
        steps_n = [normalizers.Prepend("▁")] if prefix else []
        tok.normalizer = normalizers.Sequence([*steps_n, normalizers.Replace(" ", "▁")])
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        return tok

    def _add_special(self, tokens: list[str], types: list[int]) -> None:
        special = {i for i, ty in enumerate(types) if ty == CONTROL}
        special |= {i for i in (self.bos_token_id, self.eos_token_id) if i is not None}
        if self.model_type == "llama" and self.unk_token_id is not None:
            special.add(self.unk_token_id)
        added = [i for i, ty in enumerate(types) if ty == USER_DEFINED and i not in special]
        self.tokenizer.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)]
        )
        self.tokenizer.add_tokens(
            [AddedToken(tokens[i], special=False, normalized=False) for i in added]
        )
        self.special_ids = frozenset(special)

    def _post_processor(self, tokens: list[str]) -> None:
        """BOS / EOS around the text when the file asks for them (`add_special_tokens=True`)."""
        first = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        last = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        if first or last:
            f, la = [tokens[i] for i in first], [tokens[i] for i in last]
            self.tokenizer.post_processor = processors.TemplateProcessing(
                single=[*f, "$A", *la],
                pair=[*f, "$A", *la, *f, "$B:1", *la],
                special_tokens=sorted({(tokens[i], i) for i in first + last}),
            )

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.tokens[self.bos_token_id]

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.tokens[self.eos_token_id]

    @property
    def unk_token(self) -> str | None:
        return None if self.unk_token_id is None else self.tokens[self.unk_token_id]

    @property
    def pad_token(self) -> str | None:
        return None if self.pad_token_id is None else self.tokens[self.pad_token_id]

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS / EOS as the file asks. Control
        tokens written in the text (`<|im_start|>`) become their ids."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:  # fmt: skip
        """`tokenizer.chat_template` rendered as transformers renders it: a sandboxed jinja2
        environment, `messages`, `add_generation_prompt` and the special tokens (`bos_token`,
        `eos_token`, `unk_token`, `pad_token`) as variables; `kwargs` are further variables."""
        if not self.chat_template:
            raise FormatError("this GGUF has no chat template (tokenizer.chat_template)")
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "unk_token": self.unk_token, "pad_token": self.pad_token}  # fmt: skip
        variables = {k: v for k, v in names.items() if v is not None}
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        template = _compile_chat_template(self.chat_template)
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{**variables, **kwargs},
        )  # fmt: skip

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:  # fmt: skip
        """The rendered chat template's token ids (no BOS added: templates write their own)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), False)

    def __repr__(self) -> str:
        pre = f", pre={self.pre!r}" if self.pre else ""
        return (
            f"GGUFTokenizer({self.model_type!r}{pre}, vocab={self.vocab_size}, "
            f"bos={self.bos_token_id}, eos={self.eos_token_id}, add_bos={self.add_bos_token})"
        )


def _merges(md: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(_field(md, "merges", ())):
        pair = str(m).split(" ")
        if len(pair) != 2:
            raise FormatError(f"tokenizer.ggml.merges[{i}] = {m!r} is not two tokens and a space")
        out.append((pair[0], pair[1]))
    return out


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece BPE as pair merges: every split of a token into two tokens, best merged
    score first (ties: shorter left piece, then shorter right one), as transformers'
    `generate_merges` orders them."""
    merges = []
    for token, score in scores.items():
        local = [
            (token[:k], token[k:], score)
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        ]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


@lru_cache(maxsize=8)
def _compile_chat_template(source: str) -> Any:
    """The template in a sandboxed jinja2 environment set up as transformers sets it up
    (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `tojson`, `strftime_now`)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise FormatError(f"tokenizer.chat_template does not parse: {e}") from None


__all__ = ["PRE_TOKENIZER_SPLITS", "GGUFTokenizer", "byte_alphabet"]
