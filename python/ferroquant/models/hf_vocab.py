"""A Hugging Face tokenizer folder -> GGUF tokenizer metadata, as llama.cpp's
convert_hf_to_gguf.py writes it (`_set_vocab_gpt2` / `get_vocab_base` for BPE tokenizers,
`_set_vocab_llama_hf` for SentencePiece-style ones), with gguf-py's `SpecialVocab` for merges,
special token ids, add_bos/add_eos and the chat template."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

# convert_hf_to_gguf.py's get_vocab_base_pre: the tokens of this text identify the BPE
# pre-tokenizer (tokenizer.ggml.pre), by the sha256 of str(token ids).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# the llama-family entries of convert_hf_to_gguf.py's table (hash -> llama.cpp pre name)
PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
}


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def bpe_pre_name(tokenizer: Any) -> str:
    """tokenizer.ggml.pre of a BPE tokenizer, identified as convert_hf_to_gguf.py does."""
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    try:
        return PRE_BY_HASH[chkhsh]
    except KeyError:
        raise ValueError(
            f"BPE pre-tokenizer not recognized (hash {chkhsh}); known: "
            f"{sorted(set(PRE_BY_HASH.values()))}"
        ) from None


def _is_bpe(hf_dir: Path) -> bool:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return False
    model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    return model.get("type") == "BPE" and not model.get("byte_fallback", False)


def add_vocab(
    writer: Any, hf_dir: str | Path, vocab_size: int | None, pre: str | None = None
) -> None:
    """Add tokenizer.ggml.* to `writer` (gguf-py's writer methods) from the tokenizer files;
    `pre` names llama.cpp's pre-tokenizer for a BPE tokenizer `bpe_pre_name` does not know."""
    import gguf
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    if _is_bpe(hf_dir):
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        vocab = tokenizer.get_vocab()
        n = vocab_size or len(vocab)
        if max(vocab.values()) >= n:
            raise ValueError(f"{hf_dir}: token id {max(vocab.values())} >= vocab_size {n}")
        reverse = {i: t for t, i in vocab.items()}
        added = tokenizer.get_added_vocab()
        decoder = tokenizer.added_tokens_decoder
        tokens: list[str] = []
        types: list[int] = []
        for i in range(n):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                continue
            token = reverse[i]
            if token in added:
                if not decoder[i].normalized:
                    token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
                if decoder[i].special or _looks_special(token):
                    types.append(gguf.TokenType.CONTROL)
                else:
                    token = token.replace("\u2581", " ")
                    types.append(gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
            tokens.append(token)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or bpe_pre_name(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types([int(t) for t in types])
        special = gguf.SpecialVocab(hf_dir, load_merges=True)
        if "bos" not in special.add_special_token and tokenizer.bos_token_id is not None:
            # tokenizer.json says nothing gguf-py understands: write what the tokenizer does
            ids = tokenizer("a")["input_ids"]
            special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    else:
        try:
            hf_vocab = gguf.LlamaHfVocab(hf_dir)
        except (FileNotFoundError, TypeError) as e:
            raise ValueError(f"{hf_dir}: no tokenizer llama.cpp can take ({e})") from None
        tokens, scores, types = [], [], []
        for text, score, toktype in hf_vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(int(toktype))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(hf_dir, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
