"""Small random-weight targets of other architectures, with SmolLM2's tokenizer.

They stand in for real models the CPU cannot run in test time: same architecture and
layer layout, SmolLM2's vocabulary (49,152 tokens) and ChatML template, a few layers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# SmolLM2's tokenizer, chat template and generation config (stop ids) files
TOKENIZER_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "generation",
                   "chat_template")


def copy_tokenizer(src: Path, dest: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(TOKENIZER_FILES):
            shutil.copy(f, dest / f.name)


def write_qwen2_target(dest: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 (d=128, GQA 4/2 heads, untied LM head like the real
    Qwen2.5-Coder GGUF's) with random q/k/v biases, so the attention biases Qwen2 has
    and Llama lacks take part; weights drawn at std 0.3 so that next-token distributions
    are peaked (the T=1 test can tell T=0.7 from T=1)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                      tie_word_embeddings=False, max_position_embeddings=2048,
                      initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.3)
    dest.mkdir(parents=True)
    model.save_pretrained(dest)
    copy_tokenizer(tokenizer_dir, dest)
    return dest


def write_tiny_llama_target(dest: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (d=256) with 4 attention heads, so that TP=2 splits them
    (SmolLM2-135M's 9 cannot be), and a tied head: 49,152 rows, 24,576 per rank at TP=2.
    Weights at std 0.3: peaked next-token distributions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                      tie_word_embeddings=True, max_position_embeddings=2048,
                      initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(dest)
    copy_tokenizer(tokenizer_dir, dest)
    return dest
