"""Every benchmark and check, each `coral-vllm bench NAME` (module NAME with `_`)."""
