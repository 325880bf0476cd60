"""The tiny transformers Llama of the client and compile tests: 2 decoder layers whose GEMMs
cover every projection kind (q, k/v with GQA, o, gate/up, down), small enough for CPU CI."""

from __future__ import annotations

from typing import Any

import torch


def tiny_llama_config(**changes: Any) -> Any:
    import transformers

    fields: dict[str, Any] = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
        tie_word_embeddings=False)
    return transformers.LlamaConfig(**{**fields, **changes})


def tiny_llama(seed: int) -> Any:
    """A freshly initialised tiny Llama in eval mode (same seed, same weights)."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config()).eval()
