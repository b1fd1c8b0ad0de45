"""Which split a training prompt belongs to, fixed by its id alone.

Its own module (no numpy or torch) because the data builder and the benchmarks both
need it: the benchmark's held-out prompts must be exactly the data's dev split.
"""

from __future__ import annotations

import hashlib

SPLIT_BUCKETS = 10_000
DEV_SHARE, HELDOUT_SHARE = 0.005, 0.02  # `train data`'s defaults; bench texts:FILE's split


def split_of(conv_id: str, dev_share: float, heldout_share: float) -> str:
    """'dev', 'heldout' or 'train', fixed by the conversation (or passage) id alone."""
    bucket = int(hashlib.sha1(conv_id.encode()).hexdigest()[:8], 16) % SPLIT_BUCKETS
    if bucket < dev_share * SPLIT_BUCKETS:
        return "dev"
    if bucket < (dev_share + heldout_share) * SPLIT_BUCKETS:
        return "heldout"
    return "train"
