"""A tiny random Llama with SmolLM2's tokenizer (from the shipped GGUF), for the imatrix and
allocation tests: 2 layers, hidden 256 (K-quant rows), ffn 288 (ffn_down rows of 288: the
legacy fallbacks), 4 query heads on 1 kv head, tied embeddings."""

from __future__ import annotations

from pathlib import Path

import peers


def make_tiny_llama(out: Path, tied: bool = True, seed: int = 0) -> Path:
    torch = peers.require("torch")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = peers.smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=288, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=tied,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a less flat output distribution than the default init gives
        model.get_input_embeddings().weight.mul_(8.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
