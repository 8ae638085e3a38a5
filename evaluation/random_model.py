"""A Llama-shaped model with random weights and a word-level tokenizer.

For engine tests and capacity benchmarks where no real checkpoint is needed
(no model hub is reachable). Weights follow transformers' init (normal, std
0.02), so logits are spread enough for greedy decoding to be reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

SHAPES = {
    # ~1B, the shape of ../shared/gpu's stock reference figures
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
    # Llama-3.1-8B-shaped (KV capacity is the limit)
    "llama-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    ),
    # the 8B layer shape with 8 layers: long-prompt memory tests without loading 16 GB of weights
    "llama-8b-8l": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8
    ),
    # tiny, for smoke tests
    "llama-tiny": dict(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2
    ),
}

VOCAB = 32000
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def kv_bytes_per_token(shape: str, dtype_bytes: int = 2) -> int:
    """KV cache bytes of one token over all layers (K and V, every KV head) for a shape of SHAPES."""
    s = SHAPES[shape]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    return s["num_hidden_layers"] * 2 * s["num_key_value_heads"] * head_dim * dtype_bytes


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def make_random_model(path: str | Path, shape: str = "llama-1b", max_position: int = 32768, seed: int = 0) -> Path:
    """Write config, random bf16 weights and a tokenizer to `path` (idempotent)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    marker = path / "kvcomp_model.json"
    if marker.exists() and json.loads(marker.read_text()) == {"shape": shape, "seed": seed}:
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=max_position,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
        **SHAPES[shape],
    )
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    if device == "cuda":
        # The caching allocator would keep the build's memory (28 GiB at the 8B shape) from the
        # engine started next in this process tree: vLLM refuses to start below its free-memory share.
        torch.cuda.empty_cache()
    make_tokenizer(path)
    marker.write_text(json.dumps({"shape": shape, "seed": seed}))
    return path
