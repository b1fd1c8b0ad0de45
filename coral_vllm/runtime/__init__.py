"""Running vLLM from our code: engine defaults, offline engines, `vllm serve`, counters."""
