"""The training data directory: token shards per split, token counts and a manifest.

    DIR/manifest.json              format, counts, sources, filters, cuts, shard hashes
    DIR/shard-00000.safetensors    training split      (manifest "shards")
    DIR/heldout-00000.safetensors  held-out split       (manifest "heldout_shards")
    DIR/dev.safetensors            dev prompts + the target's greedy continuations
    DIR/token_counts.safetensors   response-token counts per id, training split only

A shard holds three flat tensors: `input_ids` int32 [T], `loss_mask` uint8 [T] and
`offsets` int64 [n + 1] (sample i is [offsets[i], offsets[i+1])); the loss mask is 1 on
tokens the target generated. The dev file has the same three tensors plus
`prompt_lens` int64 [n]: sample i is a prompt followed by its greedy continuation, what
the offline chain tau replays (`training.validate`). The held-out split and the dev prompts are
made from conversations that training never sees. Data without a held-out split (made
before it existed) holds out the last `holdout` share of the training samples instead.
`data.self_distill` makes the data; this module only writes and reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np

from coral_vllm.downloads import sha256
from coral_vllm.data.batches import TokenTable

FORMAT = "coral-vllm-data/2"
MANIFEST = "manifest.json"
COUNTS_FILE = "token_counts.safetensors"
DEV_FILE = "dev.safetensors"
Sample = tuple[Sequence[int], Sequence[int]]  # (token ids, loss mask)


# ------------------------------------------------------------------------- writing
def _pack(samples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    lens = np.array([0] + [len(ids) for ids, _ in samples], dtype=np.int64)
    return {"input_ids": np.concatenate([s[0] for s in samples]).astype(np.int32),
            "loss_mask": np.concatenate([s[1] for s in samples]).astype(np.uint8),
            "offsets": np.cumsum(lens)}


def _clean(samples: Iterable[Sample]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Samples as arrays; ones with mismatched lengths or no generated token dropped."""
    out = []
    for ids, mask in samples:
        ids_a, mask_a = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64)
        if len(ids_a) == len(mask_a) and len(ids_a) >= 3 and mask_a.any():
            out.append((ids_a, mask_a))
    return out


def _write_shards(out: Path, prefix: str, samples: list[tuple[np.ndarray, np.ndarray]],
                  shard_size: int) -> list[dict[str, Any]]:
    shards = []
    for i in range(0, len(samples), shard_size):
        name = f"{prefix}-{len(shards):05d}.safetensors"
        part = samples[i:i + shard_size]
        packed = _pack(part)
        save_np(packed, str(out / name))
        shards.append({"file": name, "samples": len(part),
                       "tokens": int(len(packed["input_ids"])), "sha256": sha256(out / name)})
    return shards


def write_dataset(out_dir: str | Path, samples: Iterable[Sample], vocab_size: int, *,
                  heldout: Iterable[Sample] = (),
                  dev: Iterable[tuple[Sequence[int], Sequence[int]]] = (),
                  shard_size: int = 4000, meta: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Writes the splits + token counts + manifest; returns the manifest.

    `samples`/`heldout`: (ids, loss mask); `dev`: (prompt ids, continuation ids).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = _clean(samples)
    held = _clean(heldout)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids, mask in train:
        counts += np.bincount(ids[mask.astype(bool)], minlength=vocab_size)[:vocab_size]
    save_np({"token_counts": counts}, str(out / COUNTS_FILE))
    manifest: dict[str, Any] = {
        "format": FORMAT, "vocab_size": vocab_size, "samples": len(train),
        "tokens": int(sum(len(i) for i, _ in train)),
        "loss_tokens": int(sum(int(m.sum()) for _, m in train)),
        "shards": _write_shards(out, "shard", train, shard_size),
        "heldout_samples": len(held),
        "heldout_shards": _write_shards(out, "heldout", held, shard_size),
        "token_counts": {"file": COUNTS_FILE, "sha256": sha256(out / COUNTS_FILE)}}
    dev = [(np.asarray(p, dtype=np.int64), np.asarray(c, dtype=np.int64)) for p, c in dev]
    dev = [(p, c) for p, c in dev if len(p) and len(c)]
    if dev:
        packed = _pack([(np.concatenate([p, c]), np.r_[np.zeros(len(p)), np.ones(len(c))])
                        for p, c in dev])
        packed["prompt_lens"] = np.array([len(p) for p, _ in dev], dtype=np.int64)
        save_np(packed, str(out / DEV_FILE))
        manifest["dev"] = {"file": DEV_FILE, "samples": len(dev),
                           "tokens": int(len(packed["input_ids"])),
                           "sha256": sha256(out / DEV_FILE)}
    manifest["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest.update(meta or {})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ------------------------------------------------------------------------- reading
def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make the data with `coral-vllm train "
                                "data` (or pass the directory it wrote).")
    return json.loads(path.read_text())


def _load_checked(path: Path, expected_sha: str | None, verify: bool) -> dict[str, np.ndarray]:
    if verify and expected_sha and sha256(path) != expected_sha:
        raise ValueError(f"{path}: sha256 differs from {MANIFEST}; rebuild the data.")
    return load_np(str(path))


def read_samples(data_dir: str | Path, key: str = "shards", verify: bool = False
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss mask) of every sample of the shards listed under `key`."""
    d = Path(data_dir)
    samples = []
    for shard in read_manifest(d).get(key, []):
        t = _load_checked(d / shard["file"], shard.get("sha256"), verify)
        off = t["offsets"]
        samples += [(t["input_ids"][a:b], t["loss_mask"][a:b])
                    for a, b in zip(off[:-1], off[1:])]
    return samples


def data_fingerprint(data_dir: str | Path) -> str:
    """One hash of every file a training run reads (from the manifest's hashes)."""
    m = read_manifest(data_dir)
    files = [s["sha256"] for s in m.get("shards", []) + m.get("heldout_shards", [])]
    files.append(m.get("dev", {}).get("sha256", ""))
    return hashlib.sha256(" ".join(files).encode()).hexdigest()


def holdout_split(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """(train, held-out): the last ceil(holdout * n) samples are held out (>= 1 if n > 1)."""
    h = min(n - 1, max(1, math.ceil(holdout * n))) if n > 1 and holdout > 0 else 0
    return list(range(n - h)), list(range(n - h, n))


def load_splits(data_dir: str | Path, max_len: int, holdout: float = 0.1,
                verify: bool = False) -> tuple[TokenTable, TokenTable]:
    """(training table, held-out table), samples cut to `max_len` tokens."""
    samples = read_samples(data_dir, "shards", verify)
    held = read_samples(data_dir, "heldout_shards", verify)
    if not held:  # older data: hold out the tail of the training shards
        keep, out = holdout_split(len(samples), holdout)
        samples, held = [samples[i] for i in keep], [samples[i] for i in out]
    return TokenTable.from_samples(samples, max_len), TokenTable.from_samples(held, max_len)


def load_dev(data_dir: str | Path, max_len: int
             ) -> tuple[TokenTable | None, np.ndarray | None]:
    """(dev table, prompt lengths), or (None, None) if the data has no dev prompts."""
    entry = read_manifest(data_dir).get("dev")
    if not entry:
        return None, None
    t = _load_checked(Path(data_dir) / entry["file"], entry.get("sha256"), False)
    off = t["offsets"]
    samples = [(t["input_ids"][a:b], t["loss_mask"][a:b]) for a, b in zip(off[:-1], off[1:])]
    table = TokenTable.from_samples(samples, max_len)
    return table, np.minimum(t["prompt_lens"], table.lengths)


def train_token_counts(table: TokenTable, vocab_size: int) -> torch.Tensor:
    """Response-token counts per id over a table (the frequency partition's input)."""
    ids = table.tokens[:-1][table.loss_mask[:-1].astype(bool)]
    return torch.from_numpy(np.bincount(ids, minlength=vocab_size)[:vocab_size])
