"""Token tables and token-budget batches: what one training step reads, built on the host.

A `TokenTable` holds every sample of a split back to back (token ids, loss mask) with
its start and length, each sample cut to `max_len`. Row `pad_row` (one past the last
token) stands for padding: its token is 0, its loss mask 0 and its target feature zero.

`epoch_batches` groups samples of similar length so that B x S (S = longest sample in
the batch, rounded up to a multiple of 64) stays within a token budget: little padding,
steady memory, and batches whose number of real tokens varies far less than a fixed
number of sequences would. `Batch.build` turns sample indices into the index tensors a
step gathers with on the device: everything that depends on lengths and masks is
computed here with numpy, so the step itself never reads a value back from the GPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

SEQ_MULTIPLE = 64  # few distinct shapes: the CUDA allocator reuses its blocks
SORT_WINDOW = 64  # batches' worth of samples sorted by length together before cutting


@dataclasses.dataclass
class TokenTable:
    tokens: np.ndarray      # int64 [T + 1] (the last entry is the pad row)
    loss_mask: np.ndarray   # uint8 [T + 1]
    starts: np.ndarray      # int64 [n]
    lengths: np.ndarray     # int64 [n]

    @classmethod
    def from_samples(cls, samples: list[tuple[np.ndarray, np.ndarray]], max_len: int
                     ) -> "TokenTable":
        """Samples (ids, loss mask) cut to max_len, concatenated."""
        lengths = np.array([min(len(ids), max_len) for ids, _ in samples], dtype=np.int64)
        starts = np.zeros(len(samples), dtype=np.int64)
        if len(samples):
            starts[1:] = np.cumsum(lengths)[:-1]
        total = int(lengths.sum())
        tokens = np.zeros(total + 1, dtype=np.int64)
        mask = np.zeros(total + 1, dtype=np.uint8)
        for (ids, m), a, n in zip(samples, starts, lengths):
            tokens[a:a + n], mask[a:a + n] = ids[:n], m[:n]
        return cls(tokens, mask, starts, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, n = int(self.starts[i]), int(self.lengths[i])
        return self.tokens[a:a + n], self.loss_mask[a:a + n]

    def rows(self, idx: np.ndarray, seq_len: int) -> np.ndarray:
        """[len(idx), seq_len] table rows of the samples `idx`, each from its first token,
        right-padded with `pad_row` (its token 0): a batch's layout, and the target's."""
        t = np.arange(seq_len)
        return np.where(t[None, :] < self.lengths[idx][:, None],
                        self.starts[idx][:, None] + t[None, :], self.pad_row)

    def subset(self, indices: np.ndarray) -> "TokenTable":
        """The samples `indices`, in that order, as a table of their own."""
        return TokenTable.from_samples([self.sample(int(i)) for i in indices],
                                       int(self.lengths.max(initial=1)))

    @property
    def pad_row(self) -> int:
        return len(self.tokens) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def loss_tokens(self) -> np.ndarray:
        """[n] response tokens per sample."""
        c = np.concatenate([[0], np.cumsum(self.loss_mask[:-1], dtype=np.int64)])
        return c[self.starts + self.lengths] - c[self.starts]


def padded_len(n: int) -> int:
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


def epoch_batches(lengths: np.ndarray, budget: int, seed: int, epoch: int,
                  max_batch: int = 1024) -> list[np.ndarray]:
    """Shuffled batches of sample indices covering every sample once.

    Samples are shuffled (by seed and epoch), sorted by length within windows, and cut
    into batches with (batch size) x padded_len(longest) <= budget; a sample longer than
    the budget gets a batch of its own. The batch order is shuffled again, so lengths
    do not drift through the epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    typical = max(1, budget // max(1, padded_len(int(np.median(lengths)) if len(lengths) else 1)))
    window = typical * SORT_WINDOW
    batches: list[np.ndarray] = []
    for w in range(0, len(order), window):
        part = order[w:w + window]
        part = part[np.argsort(lengths[part], kind="stable")]
        cur: list[int] = []
        longest = 0
        for i in part:
            longest_if = max(longest, padded_len(int(lengths[i])))
            if cur and (longest_if * (len(cur) + 1) > budget or len(cur) >= max_batch):
                batches.append(np.array(cur))
                cur, longest_if = [], padded_len(int(lengths[i]))
            cur.append(int(i))
            longest = longest_if
        if cur:
            batches.append(np.array(cur))
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclasses.dataclass
class Batch:
    """One step's inputs as index tensors (gather from the table's feature store)."""
    rows: torch.Tensor       # [B, S] rows of the table / feature store (pad -> pad_row)
    ids_in: torch.Tensor     # [B, S-1] token x_{t+1} at drafter position t
    loss_pos: torch.Tensor   # [N] flat positions in [B, S-1] whose x_{t+2} is a response token
    tokens: int              # real (non-pad) tokens in the batch
    loss_tokens: int

    @classmethod
    def build(cls, table: TokenTable, idx: np.ndarray) -> "Batch":
        lens = table.lengths[idx]
        rows = table.rows(idx, max(3, padded_len(int(lens.max()))))
        ids = table.tokens[rows]
        # EAGLE alignment: position t reads (f_t, x_{t+1}) and predicts f_{t+1}, x_{t+2}
        want = np.zeros((len(idx), rows.shape[1] - 1), dtype=bool)
        want[:, :-1] = table.loss_mask[rows[:, 2:]].astype(bool)
        loss_pos = np.flatnonzero(want)
        return cls(torch.from_numpy(rows), torch.from_numpy(ids[:, 1:].copy()),
                   torch.from_numpy(loss_pos), int(lens.sum()), len(loss_pos))

    def to(self, device: torch.device | str) -> "Batch":
        """Host -> device without waiting (pinned memory on CUDA)."""
        device = torch.device(device)
        if device.type != "cuda":
            return self
        return dataclasses.replace(self, rows=to_device(self.rows, device),
                                   ids_in=to_device(self.ids_in, device),
                                   loss_pos=to_device(self.loss_pos, device))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without the host waiting for the device: on CUDA the
    copy goes through pinned memory (non_blocking), queued behind the work before it."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
