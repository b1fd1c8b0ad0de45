"""A few everyday chat prompts for smoke tests and serving checks.

Not evaluation prompts (MT-bench, HumanEval, GSM8K live in `coral_vllm.data.eval_sets` and stay
out of training data); these only exercise the engine.
"""

SMOKE_PROMPTS = [
    "Write a haiku about autumn leaves.",
    "What is the capital of Japan? Answer in one sentence.",
    "Give me three tips for learning to play the guitar.",
    "Explain what a hash table is to a ten-year-old.",
    "Write a Python function that reverses a string.",
    "List the planets of the solar system in order.",
    "How do I boil an egg?",
    "Translate 'good morning, my friend' into French.",
]
