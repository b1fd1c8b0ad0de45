"""Target shapes the systems benchmarks run at: the public config.json values of real
models (sizes only; the benchmarks use dummy weights), in one place so that `bench
synthetic` (whole engines) and `bench lm-head` (the head alone) time the same heads."""

from __future__ import annotations

from typing import Any

TARGET_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "use_sliding_window": False, "tie_word_embeddings": True,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"},
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128009,
        "torch_dtype": "bfloat16"},
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "sliding_window": 131072, "max_window_layers": 28, "use_sliding_window": False,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": "bfloat16"},
}

# (hidden size d, vocabulary V) of the heads `bench lm-head` times: two small-model heads
# (no engine runs at these) and every target shape's
HEAD_SHAPES: dict[str, tuple[int, int]] = {
    "smollm2-135m": (576, 49152), "gemma-3-270m": (640, 262144),
    **{name: (s["hidden_size"], s["vocab_size"]) for name, s in TARGET_SHAPES.items()},
}
