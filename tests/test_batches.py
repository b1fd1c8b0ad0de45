"""Token tables, token-budget batches and the feature store's placement (CPU, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coral_vllm.data import feature_store as features
from coral_vllm.data.batches import Batch, TokenTable, epoch_batches, padded_len

pytestmark = pytest.mark.usefixtures("one_thread")


def test_batches_cover_every_sample_once_within_budget():
    lengths = np.random.default_rng(0).integers(3, 300, size=500)
    batches = epoch_batches(lengths, budget=1024, seed=1, epoch=0)
    seen = np.sort(np.concatenate(batches))
    assert np.array_equal(seen, np.arange(500))
    for b in batches:
        longest = padded_len(int(lengths[b].max()))
        assert len(b) == 1 or len(b) * longest <= 1024
    again = epoch_batches(lengths, budget=1024, seed=1, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = epoch_batches(lengths, budget=1024, seed=1, epoch=1)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def test_batch_alignment():
    """Position t reads x_{t+1} and is trained where x_{t+2} is a response token."""
    samples = [(np.arange(10, 20), np.r_[np.zeros(4), np.ones(6)]),
               (np.arange(30, 35), np.r_[np.zeros(3), np.ones(2)])]
    table = TokenTable.from_samples(samples, max_len=64)
    b = Batch.build(table, np.array([0, 1]))
    s1 = b.ids_in.shape[1]
    assert b.rows.shape == (2, s1 + 1) and b.tokens == 15 and b.loss_tokens == 6 + 2
    assert b.ids_in[0, :9].tolist() == list(range(11, 20))
    for p in b.loss_pos.tolist():
        i, t = divmod(p, s1)
        assert table.loss_mask[int(b.rows[i, t + 2])] == 1
    assert (b.rows[1, 5:] == table.pad_row).all() and table.tokens[table.pad_row] == 0


def test_a_feature_store_the_host_cannot_hold_is_refused_up_front(monkeypatch):
    """Where the device cannot take the store it goes to the host; one too large for the
    host too fails before it is allocated, naming its size and the fixes."""
    assert features.host_available_bytes() > 0
    monkeypatch.setattr(features, "host_available_bytes", lambda: 10 * 2**30)
    cpu = torch.device("cpu")
    assert features.store_device(1000, 2304, torch.bfloat16, cpu) == cpu
    with pytest.raises(features.FeatureStoreTooLarge,
                       match=r"needs 8\.6 GiB \(2,000,000 tokens x 2304 features x 2 bytes\)"
                             r".*10\.0 GiB available.*--feature-store online.*--max-conversations"
                             r".*--fused-layers"):
        features.store_device(2_000_000, 2304, torch.bfloat16, cpu, place="host")
