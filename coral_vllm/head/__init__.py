"""The CORAL head as math: the router, the grouped LM head (torch reference; CUDA ->
`coral_vllm.kernels`), its tensor-parallel shards and the static-vocabulary baseline.
Plain torch, shared by the vLLM drafter, training and the offline evaluation."""
