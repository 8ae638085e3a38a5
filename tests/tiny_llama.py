"""A tiny random Llama for CPU tests of the evaluation and calibration paths."""

import torch

TINY_LLAMA = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def build_tiny_llama(path, edit=None, **config_overrides) -> str:
    """A 3-layer random Llama (seed 0) with the word tokenizer, saved to `path`, for CPU tests of the
    evaluation and calibration paths; `edit(model)` may change its weights before saving."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evaluation.random_model import make_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config_overrides}))
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(path)
    make_tokenizer(path)
    return str(path)
