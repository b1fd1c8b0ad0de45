"""Triton kernels, each beside its torch reference in `coral_vllm.head`."""
