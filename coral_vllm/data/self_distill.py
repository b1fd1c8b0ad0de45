"""Self-distilled conversations: the target regenerates every assistant turn.

    conversations (user turns only; data/conversations.py, test-set overlap removed)
      -> split by a hash of the conversation id: dev / held-out / train
      -> round r: every live conversation's history (its user turns, each followed by
         the target's OWN reply from the earlier rounds) + user turn r in the chat
         template -> the target's greedy reply (vLLM on a GPU; transformers elsewhere)
      -> looping replies kept whole, as vLLM serves them, or trimmed to one copy
         (`loops`, data/loops.py; the same generation serves both)
      -> token shards + manifest (data/shards.py)

A base target (no chat template) takes plain-text passages instead (data/texts.py):
each is a one-turn conversation whose prompt is the passage's first `prompt_tokens`
tokens and whose reply is the target's continuation; the same loop, splits and files
serve both (a splicer, data/splicers.py, turns turns + replies into ids).

Replies are spliced into the chat template as the ids the target generated (never
decoded and re-tokenized), so the drafter trains on exactly the token sequences the
target produced. The dev prompts get one greedy continuation each, uncut: the offline
chain tau replays it (`training.validate`), and vLLM serving the same prompts must
produce it.

Generation runs round by round in parts of `chunk_prompts` prompts saved under
`out/parts/`; a rerun loads the parts already there and generates only what is missing.
A run cut by `time_limit_min` starts no part it cannot finish and still writes the data
of every reply generated so far (manifest "complete": false), so it can be trained on
and resumed. A small target leaves one vLLM engine CPU-bound, so the conversations can
be split over several engine processes on one GPU (`shards`, `shard`), merged after.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from coral_vllm.data.conversations import Conversation, read_conversations
from coral_vllm.data.generators import Generate, Reply, hf_generator, strip_end, vllm_generator
from coral_vllm.data.loops import DEFAULT_LOOPS, LOOP_MODES, Turn, apply_loops, loop_start
from coral_vllm.data.shards import write_dataset
from coral_vllm.data.splicers import ChatSplicer, TextSplicer
from coral_vllm.data.splits import DEV_SHARE, HELDOUT_SHARE, split_of
from coral_vllm.data.target import target_config_dict
from coral_vllm.data.texts import PROMPT_TOKENS, read_passages
from coral_vllm.runtime.engine_args import GPU_SHARE

MIN_REPLY_ROOM = 32  # a turn is asked only if this many reply tokens (or max_new_tokens) fit
# time a vLLM engine's start (~100 s compiling on an H200) and its first part need; a
# part is not started with less left before the time limit, until there is a rate
FIRST_VLLM_PART_S = 240.0


class Parts:
    """Saved generation results: one file per (stage, chunk), written atomically.

    Replies are stored as flat tensors (int32 ids, offsets, ended flags), not Python
    lists, so that a stopped run's parts are small enough to travel back from the GPU
    host and resume there on a later lease."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, stage: str, chunk: int) -> Path:
        return self.root / f"{stage}-{chunk:05d}.pt"

    def load(self, stage: str, chunk: int) -> dict[str, Any] | None:
        p = self.path(stage, chunk)
        if not p.is_file():
            return None
        obj = torch.load(p)
        ids, offsets, ended = obj.pop("ids"), obj.pop("offsets").tolist(), obj.pop("ended")
        obj["replies"] = [(ids[a:b].tolist(), bool(e))
                          for a, b, e in zip(offsets, offsets[1:], ended.tolist())]
        return obj

    def save(self, stage: str, chunk: int, obj: dict[str, Any]) -> None:
        p = self.path(stage, chunk)
        tmp = p.with_suffix(".tmp")
        replies = obj["replies"]
        lens = torch.tensor([0] + [len(ids) for ids, _ in replies], dtype=torch.int64)
        packed = {k: v for k, v in obj.items() if k != "replies"}
        packed.update(ids=torch.tensor([t for ids, _ in replies for t in ids],
                                       dtype=torch.int32),
                      offsets=lens.cumsum(0), ended=torch.tensor([e for _, e in replies]))
        torch.save(packed, tmp)
        os.replace(tmp, p)


def _prompt_set(conversations: str | None, texts: str | None, tok, eos: set[int],
                prompt_tokens: int, target: str
                ) -> tuple[str, str, list[Any], dict[str, Any], ChatSplicer | TextSplicer]:
    """(kind, file, conversations, the file's stats, splicer): user turns in the chat
    template for a chat target, or plain-text passages as one-turn conversations."""
    if (conversations is None) == (texts is None):
        raise ValueError("train data: pass one of --conversations FILE (a chat target) and "
                         "--texts FILE (a base target's plain-text passages)")
    if texts is not None:
        passages, stats = read_passages(texts)
        convs = [Conversation(p.id, p.source, (p.text,)) for p in passages]
        return "texts", texts, convs, stats, TextSplicer(tok, eos, prompt_tokens)
    if tok.chat_template is None:
        raise ValueError(f"{target} has no chat template (a base model): make its data "
                         "from plain text, --texts FILE from `coral-vllm train texts`")
    convs, stats = read_conversations(conversations)
    return "conversations", conversations, convs, stats, ChatSplicer(tok, eos)


def shard_of(conv_id: str, shards: int) -> int:
    """Which of `shards` generation engines a conversation goes to (fixed by its id, and
    independent of its split)."""
    return int(hashlib.sha1(("shard:" + conv_id).encode()).hexdigest()[:8], 16) % shards


class Generation:
    """Stages of prompts through the target, in saved parts, within a time limit.

    A part is started only if it is expected to end before `deadline`: from this
    process's rate once it has generated a part's worth of prompts, before that if at
    least `first_part_s` (an engine start and a first part) are left. So a run cut by
    the limit loses no generated reply, and the parts that exist are always usable.
    `generate=False` uses the saved parts only (a part missing stops the run as the
    time limit would)."""

    def __init__(self, start_engine: Callable[[], Generate], chunk_prompts: int,
                 deadline: float | None, first_part_s: float = 0.0,
                 generate: bool = True) -> None:
        self.start_engine, self.chunk, self.deadline = start_engine, chunk_prompts, deadline
        self.first_part_s, self.generate = first_part_s, generate
        self.fn: Generate | None = None
        self.engine_start_s = 0.0
        self.stopped: str | None = None      # the first part not generated for lack of time
        self.seconds, self.output_tokens = 0.0, 0     # over every part used
        self._fresh_s, self._fresh_prompts = 0.0, 0   # parts generated by this process

    def run(self, parts: Parts, stage: str, prompts: list[list[int]], limits: list[int]
            ) -> list[Reply]:
        """Replies to a prefix of `prompts`: all, or those of the parts done in time."""
        replies: list[Reply] = []
        for c, a in enumerate(range(0, len(prompts), self.chunk)):
            saved = parts.load(stage, c)
            if saved is None:
                if not self._fits(len(prompts[a:a + self.chunk])):
                    self.stopped = self.stopped or f"{parts.root.name}/{stage} part {c}"
                    print(f"{stage} part {c} not generated"
                          + ("; rerun to resume." if self.generate else " (write only)."))
                    return replies
                saved = self._generate(prompts[a:a + self.chunk], limits[a:a + self.chunk])
                parts.save(stage, c, saved)
                print(f"{stage} part {c}: {len(saved['replies'])} replies, "
                      f"{saved['output_tokens']} tokens, "
                      f"{saved['output_tokens'] / max(1e-9, saved['seconds']):.0f} tok/s",
                      flush=True)
            replies += saved["replies"]
            self.seconds += saved["seconds"]
            self.output_tokens += saved["output_tokens"]
        return replies

    def _fits(self, n_prompts: int) -> bool:
        if not self.generate:
            return False
        if self.deadline is None:
            return True
        if self._fresh_prompts < self.chunk:  # no rate to go by yet
            expected = self.first_part_s
        else:
            expected = n_prompts * self._fresh_s / self._fresh_prompts
        return time.time() + expected < self.deadline

    def _generate(self, prompts: list[list[int]], limits: list[int]) -> dict[str, Any]:
        if self.fn is None:  # the engine starts outside the timed region
            t = time.time()
            self.fn = self.start_engine()
            self.engine_start_s = time.time() - t
        t = time.time()
        got = self.fn(prompts, limits)
        seconds = time.time() - t
        self._fresh_s += seconds
        self._fresh_prompts += len(prompts)
        return {"replies": got, "seconds": seconds,
                "output_tokens": sum(len(r) for r, _ in got)}

    def summary(self) -> dict[str, Any]:
        """What the manifest records of the generation: output tokens, seconds, the rate
        per engine and the engine's start-up."""
        return {"output_tokens": self.output_tokens,
                "generation_seconds": round(self.seconds, 1),
                "output_tokens_per_s_per_engine": round(self.output_tokens
                                                        / max(1e-9, self.seconds)),
                "engine_start_seconds": round(self.engine_start_s, 1)}


def converse(gen: Generation, parts: Parts, convs: Sequence[Any], members: list[int],
             splicer: ChatSplicer | TextSplicer, eos: set[int], max_turns: int,
             max_len: int, max_new_tokens: int, counts: dict[str, int]
             ) -> dict[int, list[Turn]]:
    """Round r asks every live conversation of `members` its user turn r after the
    target's own earlier replies. A conversation lives on while its replies end by
    themselves and do not loop, whatever the data later does with loops, so one
    generation serves both `loops` modes. Replies are returned uncut."""
    turns: dict[int, list[Turn]] = {i: [] for i in members}
    live = list(members)
    for r in range(1, max_turns + 1):
        asked, prompts, limits = [], [], []
        for i in live:
            if len(convs[i].turns) < r:
                continue
            ids, _ = splicer.sequence(convs[i].turns[:r], [t[:2] for t in turns[i]])
            room = min(max_new_tokens, max_len - len(ids))
            if room < min(MIN_REPLY_ROOM, max_new_tokens):
                counts["turns_dropped_for_length"] += len(convs[i].turns) - r + 1
                continue
            asked.append(i)
            prompts.append(ids)
            limits.append(room)
        if not asked:
            break
        got = gen.run(parts, f"round{r:02d}", prompts, limits)
        live = []
        for i, reply in zip(asked, got):
            ids, ended = strip_end(reply, eos)
            cut = loop_start(ids)
            turns[i].append((ids, ended, cut))
            if ended and cut is None:
                live.append(i)
            elif cut is None:
                counts["conversations_ended_by_max_tokens"] += 1
        if len(got) < len(prompts):  # out of time: later rounds need this one
            break
    return turns


class _DataSetup:
    """The target's tokenizer and end tokens, the prompt set, its splits and splicer."""

    def __init__(self, target: str, conversations: str | None, texts: str | None,
                 prompt_tokens: int, max_conversations: int | None, dev_share: float,
                 heldout_share: float) -> None:
        from transformers import AutoTokenizer

        self.target = target
        self.tok = AutoTokenizer.from_pretrained(target)
        gen_file = Path(target) / "generation_config.json"
        gen_cfg = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        eos_cfg = gen_cfg.get("eos_token_id", self.tok.eos_token_id)
        self.eos = set([eos_cfg] if isinstance(eos_cfg, int)
                       else eos_cfg or [self.tok.eos_token_id])
        self.kind, self.prompt_file, convs, self.file_stats, self.splicer = _prompt_set(
            conversations, texts, self.tok, self.eos, prompt_tokens, target)
        if max_conversations is not None:  # a uniform, deterministic subset
            key = lambda c: hashlib.sha1(("subset:" + c.id).encode()).hexdigest()  # noqa: E731
            convs = sorted(sorted(convs, key=key)[:max_conversations], key=lambda c: c.id)
        self.convs = convs
        self.split = [split_of(c.id, dev_share, heldout_share) for c in convs]


def _engine(backend: str, target: str, max_len: int, temperature: float, seed: int,
            batch_size: int, setup: _DataSetup, gpu_share: float) -> Generate:
    if backend == "vllm":
        return vllm_generator(target, max_len, temperature, seed, gpu_share)
    return hf_generator(target, temperature, seed, batch_size, sorted(setup.eos),
                        setup.tok.pad_token_id or 0)


def _dev_continuations(gen: Generation, parts: Parts, setup: _DataSetup, members: list[int],
                       max_len: int, max_new_tokens: int
                       ) -> list[tuple[list[int], list[int]]]:
    """(prompt, greedy continuation) of the dev conversations' first turns, as served:
    no cuts, what the offline chain tau replays and vLLM must reproduce."""
    prompts = [setup.splicer.sequence(setup.convs[i].turns[:1], [])[0]
               for i in members if setup.split[i] == "dev"]
    prompts = [p for p in prompts if len(p) + max_new_tokens <= max_len]
    got = gen.run(parts, "dev", prompts, [max_new_tokens] * len(prompts))
    return [(p, list(ids)) for p, (ids, _) in zip(prompts, got)]


def _write(out_dir: str, setup: _DataSetup, turns: dict[int, list[Turn]],
           dev: list[tuple[list[int], list[int]]], loops: str, counts: dict[str, int],
           progress: dict[str, Any], dev_share: float, heldout_share: float
           ) -> dict[str, Any]:
    """Every conversation with a reply as one sample of its split; the manifest."""
    cuts = {"loops": loops, "replies": 0, "replies_looping": 0, "loop_tokens": 0, **counts}
    samples: dict[str, list[tuple[list[int], list[int]]]] = {"train": [], "heldout": []}
    turns_used = {"train": 0, "heldout": 0}
    for i in sorted(turns):
        if turns[i]:
            reps = apply_loops(turns[i], loops, cuts)
            split = setup.split[i]
            samples[split].append(setup.splicer.sequence(setup.convs[i].turns[:len(reps)],
                                                         reps))
            turns_used[split] += len(reps)
    cuts["share_of_replies_looping"] = cuts["replies_looping"] / max(1, cuts["replies"])
    meta = {"target": str(setup.target), **progress,
            setup.kind: {"file": Path(setup.prompt_file).name,
                         "sources": setup.file_stats.get("sources", setup.file_stats),
                         "total": len(setup.convs)},
            "splits": {"rule": "sha1(conversation id) % 10000", "dev_share": dev_share,
                       "heldout_share": heldout_share,
                       "train_conversations": len(samples["train"]),
                       "heldout_conversations": len(samples["heldout"]),
                       "dev_prompts": len(dev), "train_turns": turns_used["train"],
                       "heldout_turns": turns_used["heldout"]},
            "cuts": cuts}
    vocab = target_config_dict(setup.target)["vocab_size"]
    return write_dataset(out_dir, samples["train"], vocab, heldout=samples["heldout"],
                         dev=dev, meta=meta)


def build_data(target: str, out_dir: str, conversations: str | None = None, *,
               texts: str | None = None, prompt_tokens: int = PROMPT_TOKENS,
               max_turns: int = 8,
               max_len: int = 2048, max_new_tokens: int = 512, dev_max_new_tokens: int = 256,
               dev_share: float = DEV_SHARE, heldout_share: float = HELDOUT_SHARE,
               max_conversations: int | None = None, temperature: float = 0.0,
               loops: str = DEFAULT_LOOPS, shards: int = 1, shard: int | None = None,
               backend: str = "auto", seed: int = 0, batch_size: int = 8,
               chunk_prompts: int = 6000, time_limit_min: float = 0.0,
               write_only: bool = False, generator: Generate | None = None
               ) -> dict[str, Any]:
    """The `train data` command, from `conversations` or plain-text `texts` (one of the
    two files; `prompt_tokens` is the texts' prompt length). Returns the manifest, whose
    "complete" is False when the time limit stopped generation (the data written holds
    every reply generated so far; rerun to resume and rewrite it).

    With `shards` > 1 the conversations are split by id over that many generation
    engines: `shard` = s generates shard s only (one process per engine, side by side
    on one GPU) and writes no data (its summary is returned); `shard` None writes the
    data from every shard's parts, generating what is missing. `generator` replaces the
    model (tests); `write_only` writes the data from the saved parts, generating none.
    """
    _check_plan(out_dir, loops, shards, shard)
    deadline = time.time() + time_limit_min * 60 if time_limit_min > 0 else None
    setup = _DataSetup(target, conversations, texts, prompt_tokens, max_conversations,
                       dev_share, heldout_share)
    if backend == "auto":
        backend = "vllm" if generator is None and _vllm_on_gpu() else "transformers"
    gpu_share = GPU_SHARE / (shards if shard is not None else 1)  # engines share one GPU
    gen = Generation((lambda: generator) if generator is not None else
                     lambda: _engine(backend, target, max_len, temperature, seed, batch_size,
                                     setup, gpu_share),
                     chunk_prompts, deadline,
                     first_part_s=FIRST_VLLM_PART_S if backend == "vllm" else 0.0,
                     generate=not write_only)
    counts = {"turns_dropped_for_length": 0, "conversations_ended_by_max_tokens": 0}
    dev: list[tuple[list[int], list[int]]] = []
    turns: dict[int, list[Turn]] = {}
    for s in (range(shards) if shard is None else [shard]):
        members = [i for i in range(len(setup.convs))
                   if shards == 1 or shard_of(setup.convs[i].id, shards) == s]
        parts = Parts(Path(out_dir) / "parts" / (f"shard{s}-of-{shards}" if shards > 1 else ""))
        dev += _dev_continuations(gen, parts, setup, members, max_len, dev_max_new_tokens)
        rest = [i for i in members if setup.split[i] != "dev"]
        turns.update(converse(gen, parts, setup.convs, rest, setup.splicer, setup.eos,
                              max_turns, max_len, max_new_tokens, counts))
    settings = {"temperature": temperature, "max_new_tokens": max_new_tokens,
                "dev_max_new_tokens": dev_max_new_tokens, "max_len": max_len,
                "max_turns": max_turns, "seed": seed, "engines": shards,
                "chat_template": isinstance(setup.splicer, ChatSplicer),
                **({"prompt_tokens": prompt_tokens} if setup.kind == "texts" else {})}
    progress = {"complete": gen.stopped is None, "stopped_before": gen.stopped,
                "backend": backend, "generation": {**settings, **gen.summary()}}
    if shard is not None:
        return {**progress, "shard": shard, "shards": shards,
                "conversations_in_shard": len(turns)}
    return _write(out_dir, setup, turns, dev, loops, counts, progress, dev_share,
                  heldout_share)


def _check_plan(out_dir: str, loops: str, shards: int, shard: int | None) -> None:
    """Refuses settings `build_data` cannot follow, before the target is loaded."""
    if loops not in LOOP_MODES:
        raise ValueError(f"loops={loops!r}: choose one of {LOOP_MODES}")
    if shard is not None and not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: give 0 <= shard < shards")
    other = sorted({d.name.split("-of-")[1] for d in (Path(out_dir) / "parts").glob("shard*-of-*")}
                   - {str(shards)})
    if other:
        raise ValueError(f"{out_dir}/parts holds the parts of a run over {', '.join(other)} "
                         f"engines: resume it with --shards {other[0]} (the conversations "
                         "of a shard depend on the number of shards)")


def _vllm_on_gpu() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()
