"""The target's features for every token of a table, computed once and kept on the device;
or, when no memory can hold them, a batch's features computed as it is trained on.

A drafter learns from the target's last hidden state after the final norm (what vLLM
hands an EAGLE drafter), and an EAGLE-3-style one also reads a few layers' residual
streams (`target.target_features`); the store then holds both, k + 1 times as wide. The
target is frozen, so these features never change during training: computing them once,
instead of running the target on every batch of every epoch of every preset, removes
the target's forward from the training step. SmolLM2-135M at 6M tokens x 576 x 2 bytes
(bf16) is 7 GB, well inside an H200; the store is placed on the CPU instead when the
device lacks the memory (`place="auto"`), and a batch is then gathered there and copied
over; one the host cannot hold either is refused before the target runs. EAGLE-3-style
fused features on SmolLM2 at 25M tokens need 115 GB, more than either: the trainer's
`feature_store="online"` then keeps no store and runs the target on each micro-batch
(`features_of_rows`, the function the store is computed with), one target forward per
micro-batch instead of the memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from coral_vllm.data.batches import TokenTable, epoch_batches, to_device
from coral_vllm.data.target import target_features

FEATURE_BATCH_TOKENS = 1 << 16
DEVICE_MEMORY_SHARE = 0.5  # at most this share of the free device memory for the store
HOST_MEMORY_SHARE = 0.8    # and of the host's available memory, when it lives there


class FeatureStoreTooLarge(MemoryError):
    """Neither the device nor the host can hold a run's feature store."""


def host_available_bytes() -> int:
    """The host memory a new allocation can take (Linux `MemAvailable`)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def store_device(num_rows: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 place: str = "auto") -> torch.device:
    """Where a [num_rows, hidden] store lives: the training device if it fits, else the
    host. A store the host cannot hold either fails here, with its size and the fixes,
    instead of the kernel killing the run halfway through computing it."""
    if place not in ("auto", "device", "host"):
        raise ValueError(f"feature_store={place!r}: choose auto, device or host")
    need = num_rows * hidden * dtype.itemsize
    if device.type == "cuda" and place != "host":
        free, _ = torch.cuda.mem_get_info(device)
        if place == "device" or need <= DEVICE_MEMORY_SHARE * free:
            return device
    available = host_available_bytes()
    if need > HOST_MEMORY_SHARE * available:
        raise FeatureStoreTooLarge(
            f"the target feature store needs {need / 2**30:.1f} GiB ({num_rows:,} tokens x "
            f"{hidden} features x {dtype.itemsize} bytes) and the host has "
            f"{available / 2**30:.1f} GiB available, of which {HOST_MEMORY_SHARE:.0%} may "
            "be used: compute each micro-batch's features as it is trained on instead "
            "(train train --feature-store online: a target forward per micro-batch), train "
            "on less data (train data --max-conversations N) or read fewer target layers "
            "(--fused-layers).")
    return torch.device("cpu")


@torch.no_grad()
def features_of_rows(target, table: TokenTable, rows: np.ndarray, device: torch.device,
                     fused_layers: Sequence[int] | None = None) -> torch.Tensor:
    """[B, S, width] target features of table rows [B, S] laid out as `TokenTable.rows`
    lays them out (each sample from its first token, right-padded with `pad_row`), on
    `device` in the target's dtype: what a store computed by `compute_features` holds
    for those rows, zero at the pad positions as its pad row is.

    The target reads each row without a padding mask: padding is on the right and
    attention is causal, so no real token attends to a pad (its features are those the
    sample alone gives). A mask would cost more: transformers (5.19 here) reads it back
    from the device to decide whether SDPA may take its causal kernel, and with padding
    it may not. Without one it still reads the position ids back once per forward (its
    check for packed sequences), so a training step that calls this waits for the device
    there once per micro-batch; gathering from a store does not."""
    ids = to_device(torch.from_numpy(table.tokens[rows]), device)
    pad = to_device(torch.from_numpy(rows == table.pad_row), device)
    return target_features(target, ids, None, fused_layers).masked_fill_(pad[..., None], 0)


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
        rows = table.rows(idx, int(table.lengths[idx].max()))
        # pad positions write the pad row, with the zero they hold
        store[torch.from_numpy(rows).to(where)] = features_of_rows(
            target, table, rows, device, fused_layers).to(where)
    return store
