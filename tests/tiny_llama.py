"""Tiny random Llamas for the tests.

`make_tiny_llama`: SmolLM2's tokenizer (from the shipped GGUF), for the imatrix, allocation and
calibration tests: 2 layers, hidden 256 (K-quant rows), ffn 288 (ffn_down rows of 288: the
legacy fallbacks), 4 query heads on 1 kv head, tied embeddings. `make_small_llama` /
`write_small_word_llama`: hidden 128, for the KV-cache and checkpoint tests."""

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


def _small_config(**extra):
    """2 layers, hidden 128, ffn 256, 4 query heads on 2 kv heads, vocab 256 unless given."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaConfig(**(kw | extra))


def make_small_llama(seed: int = 0):
    """The KV-cache tests' model: a small random Llama (head_dim 32), in eval mode."""
    torch = peers.require("torch")
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_small_config(max_position_embeddings=512)).eval()


def write_small_word_llama(out: Path, vocab: int = 256) -> Path:
    """The checkpoint tests' folder: the small Llama in float16 with a word-level tokenizer of
    `vocab` words t0..t{vocab-1} (GPTQModel and llm-compressor want a tokenizer beside it)."""
    torch = peers.require("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t3"
    ).save_pretrained(out)
    torch.manual_seed(0)
    cfg = _small_config(vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2)  # fmt: skip
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(out)
    return out


def quantized_bytes(model) -> dict[str, tuple]:
    """Each QuantLinear's qtype and stored bytes (codes, block statistics), by module name."""
    import numpy as np

    from ferroquant.nn import QuantLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            qt = mod.qtensor()
            out[name] = (qt.qtype, np.asarray(qt.data).tobytes(), np.asarray(qt.stats).tobytes())
    return out


def greedy_logits(model, cache, ids, steps: int, mask=None):
    """`steps` greedy tokens through `generate` with `cache`: (sequences, logits per step)."""
    torch = peers.require("torch")
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        past_key_values=cache,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits, 1)
