"""The target's features for every token of a table, computed once and kept on the device.

A drafter learns from the target's last hidden state after the final norm (what vLLM
hands an EAGLE drafter), and an EAGLE-3-style one also reads a few layers' residual
streams (`target.target_features`); the store then holds both, k + 1 times as wide. The target is frozen, so these features never change during
training: computing them once, instead of running the target on every batch of every
epoch of every preset, removes the target's forward from the training step. SmolLM2-135M
at 6M tokens x 576 x 2 bytes (bf16) is 7 GB, well inside an H200; the store is placed on
the CPU instead when the device lacks the memory (`place="auto"`), and a batch is then
gathered there and copied over.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from coral_vllm.training.batches import TokenTable, epoch_batches
from coral_vllm.training.target import target_features

FEATURE_BATCH_TOKENS = 1 << 16
DEVICE_MEMORY_SHARE = 0.5  # at most this share of the free device memory for the store


def store_device(num_rows: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 place: str = "auto") -> torch.device:
    """Where a [num_rows, hidden] store lives: the training device if it fits."""
    if place not in ("auto", "device", "host"):
        raise ValueError(f"feature_store={place!r}: choose auto, device or host")
    if device.type != "cuda" or place == "device":
        return device
    if place == "host":
        return torch.device("cpu")
    need = num_rows * hidden * torch.tensor([], dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return device if need <= DEVICE_MEMORY_SHARE * free else torch.device("cpu")


@torch.no_grad()
def compute_features(target, table: TokenTable, device: torch.device | str, *,
                     place: str = "auto", batch_tokens: int = FEATURE_BATCH_TOKENS,
                     fused_layers: Sequence[int] | None = None) -> torch.Tensor:
    """[T + 1, d] features of every table row (the pad row stays zero), in the target's
    dtype, on `store_device(...)`; with `fused_layers`, [T + 1, (1 + k) * d] (the fused
    layers after the last hidden state: `target.split_features`)."""
    device = torch.device(device)
    dtype = next(target.parameters()).dtype
    hidden = target.config.hidden_size * (1 + len(fused_layers or ()))
    where = store_device(len(table.tokens), hidden, dtype, device, place)
    store = torch.zeros(len(table.tokens), hidden, dtype=dtype, device=where)
    for idx in epoch_batches(table.lengths, batch_tokens, seed=0, epoch=0):
        lens = table.lengths[idx]
        s = int(lens.max())
        t = np.arange(s)
        valid = t[None, :] < lens[:, None]
        rows = np.where(valid, table.starts[idx][:, None] + t[None, :], table.pad_row)
        ids = torch.from_numpy(table.tokens[rows]).to(device)
        attn = torch.from_numpy(valid.astype(np.int64)).to(device)
        feats = target_features(target, ids, attn, fused_layers)
        sel = torch.from_numpy(valid)
        store[torch.from_numpy(rows[valid]).to(where)] = feats[sel.to(device)].to(where)
    return store
