"""Only what vLLM loads: the plugin entry point and the drafter model."""
