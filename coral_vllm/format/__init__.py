"""What a CORAL drafter is on disk: its config, partition, checkpoint, and the checks
that run before any engine starts. No vLLM needed to import any of it."""
