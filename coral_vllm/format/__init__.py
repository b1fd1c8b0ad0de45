"""What a CORAL drafter is, on disk and as math: no vLLM needed to import any of it."""
