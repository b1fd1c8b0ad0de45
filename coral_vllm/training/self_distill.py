"""Self-distilled conversations: the target regenerates every assistant turn.

    conversations (user turns only; training/conversations.py, test-set overlap removed)
      -> split by a hash of the conversation id: dev / held-out / train
      -> round r: every live conversation's history (its user turns, each followed by
         the target's OWN reply from the earlier rounds) + user turn r in the chat
         template -> the target's greedy reply (vLLM on a GPU; transformers elsewhere)
      -> degenerate repetition loops cut out of replies
      -> token shards + manifest (data.py)

A base target (no chat template) takes plain-text passages instead (training/texts.py):
each is a one-turn conversation whose prompt is the passage's first `prompt_tokens`
tokens (:class:`TextSplicer`) and whose reply is the target's continuation; the same
loop, cuts, splits and files serve both (a splicer turns turns + replies into ids).

Replies are spliced into the chat template as the ids the target generated (never
decoded and re-tokenized), so the drafter trains on exactly the token sequences the
target produced. The dev prompts get one greedy continuation each, uncut: the offline
chain tau replays it (validate.py), and vLLM serving the same prompts must produce it.

Generation runs round by round in parts of `chunk_prompts` prompts saved under
`out/parts/`; a rerun loads the parts already there and generates only what is missing,
so a run cut by `time_limit_min` resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from coral_vllm.training.data import write_dataset
from coral_vllm.training.splits import DEV_SHARE, HELDOUT_SHARE, split_of
from coral_vllm.training.texts import PROMPT_TOKENS, TextPrompter

SENTINEL = "\x00REPLY{}\x00"
_SENTINEL_RE = re.compile("\x00REPLY\\d+\x00")
# a reply is called looping when its tail repeats one unit of <= MAX_PERIOD tokens for
# at least LOOP_MIN_TOKENS tokens beyond the first copy (at least three copies in all)
MAX_PERIOD = 256
LOOP_MIN_TOKENS = 16
MIN_REPLY_ROOM = 32  # a turn is asked only if this many reply tokens (or max_new_tokens) fit

Reply = tuple[list[int], bool]  # generated ids without the end-of-turn token, ended?
Generate = Callable[[list[list[int]], list[int]], list[Reply]]


# ---------------------------------------------------------------- chat template ids
class ChatSplicer:
    """Token ids of a chat whose assistant turns are given as generated ids.

    The template is rendered once with a sentinel in place of each reply; the text
    around the sentinels is tokenized piece by piece (special tokens delimit the pieces,
    so this equals tokenizing the whole) and the replies' own ids go in between.
    """

    def __init__(self, tokenizer, eos_ids: Sequence[int]) -> None:
        self.tok = tokenizer
        self.eos = set(int(e) for e in eos_ids)

    def segments(self, turns: Sequence[str]) -> list[list[int]]:
        """len(turns) pieces: piece i precedes reply i + 1; the last ends with the
        generation prompt for turns[-1]."""
        msgs: list[dict[str, str]] = []
        for i, t in enumerate(turns):
            msgs.append({"role": "user", "content": t})
            if i < len(turns) - 1:
                msgs.append({"role": "assistant", "content": SENTINEL.format(i)})
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        pieces = _SENTINEL_RE.split(text)
        if len(pieces) != len(turns):
            raise ValueError("the chat template does not render assistant turns verbatim; "
                             "multi-turn self-distillation needs it to")
        return [self.tok.encode(p, add_special_tokens=False) for p in pieces]

    def sequence(self, turns: Sequence[str], replies: Sequence[Reply]
                 ) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of turns[0], replies[0], turns[1], ...; with one reply fewer
        than turns it ends with the generation prompt of the last turn. The loss mask is
        1 on the generated tokens, including the end-of-turn token of a reply that ended
        (the template's own token where it follows the reply)."""
        segs = self.segments(turns)
        ids, mask = list(segs[0]), [0] * len(segs[0])
        for i, (reply, ended) in enumerate(replies):
            ids += reply
            mask += [1] * len(reply)
            nxt = segs[i + 1] if i + 1 < len(segs) else []
            if i + 1 < len(segs):
                ids += nxt
                mask += [int(ended and bool(nxt) and nxt[0] in self.eos)] + [0] * (len(nxt) - 1)
            elif ended:
                ids.append(min(self.eos))
                mask.append(1)
        return ids, mask


class TextSplicer:
    """Token ids of a plain-text prompt (:class:`~coral_vllm.training.texts.TextPrompter`)
    followed by the target's continuation, for a base target (no chat template); the same
    interface as ChatSplicer, `turns` holding the one passage."""

    def __init__(self, tokenizer, eos_ids: Sequence[int], prompt_tokens: int) -> None:
        self.prompt = TextPrompter(tokenizer, prompt_tokens)
        self.eos = set(int(e) for e in eos_ids)

    def sequence(self, turns: Sequence[str], replies: Sequence[Reply]
                 ) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of the prompt and, if given, its continuation; the mask is 1
        on the continuation and on the end token of one that ended."""
        if len(turns) != 1 or len(replies) > 1:
            raise ValueError(f"a passage is one prompt with at most one continuation, not "
                             f"{len(turns)} turns and {len(replies)} replies")
        ids = self.prompt(turns[0])
        mask = [0] * len(ids)
        for reply, ended in replies:
            ids += reply
            mask += [1] * len(reply)
            if ended:
                ids.append(min(self.eos))
                mask.append(1)
        return ids, mask


# ----------------------------------------------------------------- repetition loops
def loop_start(ids: Sequence[int], max_period: int = MAX_PERIOD,
               min_tokens: int = LOOP_MIN_TOKENS) -> int | None:
    """Length to cut a reply to so one copy of a repeating tail remains, or None.

    A tail is looping with period p when its last L >= max(2p, min_tokens) tokens each
    equal the token p before them (>= 3 copies); the longest such L over p wins.
    """
    x = np.asarray(ids)
    n = len(x)
    if n < min_tokens + 1:
        return None
    periods = np.arange(1, min(max_period, n // 3) + 1)
    if not len(periods):
        return None
    window = min(n, 3 * max_period)
    t = np.arange(n - window, n)
    valid = t[None, :] - periods[:, None] >= 0
    same = (x[t][None, :] == x[np.maximum(t[None, :] - periods[:, None], 0)]) & valid
    # trailing run of equal positions per period
    run = np.argmin(np.concatenate([same[:, ::-1], np.zeros((len(periods), 1), bool)], 1), 1)
    ok = (run >= np.maximum(2 * periods, min_tokens))
    if not ok.any():
        return None
    best = int(np.argmax(np.where(ok, run, -1)))
    return n - int(run[best])


# -------------------------------------------------------------------- generation
def vllm_generator(target: str, max_model_len: int, temperature: float, seed: int
                   ) -> Generate:
    """Many sequences in flight through vLLM's offline engine (the GPU path)."""
    from vllm import LLM, SamplingParams

    from coral_vllm.runtime.engine_args import engine_defaults

    # on a GPU: many sequences in flight (a 135M target leaves the card idle otherwise)
    llm = LLM(model=target, seed=seed, max_model_len=max_model_len, enable_prefix_caching=True,
              **engine_defaults(gpu_memory_utilization=0.9, max_num_seqs=1024,
                                max_num_batched_tokens=32768))

    def generate(prompts: list[list[int]], max_tokens: list[int]) -> list[Reply]:
        # token ids are all this needs: no detokenizing on vLLM's (busy) front-end thread
        params = [SamplingParams(temperature=temperature, max_tokens=m, seed=seed,
                                 detokenize=False) for m in max_tokens]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop")
                for o in outs]

    return generate


@torch.no_grad()
def generate_hf(model, prompts: list[list[int]], max_new_tokens: int | list[int],
                temperature: float, eos_token_id: int | list[int] | None,
                pad_token_id: int = 0, batch_size: int = 8, seed: int = 0
                ) -> list[list[int]]:
    """Responses with transformers generate (CPU, small runs): left-padded batches, each
    cut after its first end token (kept)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    limits = (max_new_tokens if isinstance(max_new_tokens, list)
              else [max_new_tokens] * len(prompts))
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk, lim = prompts[i: i + batch_size], limits[i: i + batch_size]
        s = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), s), pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, s - len(p):], attn[j, s - len(p):] = torch.tensor(p), 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=max(lim), do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None,
                             top_p=None, top_k=None,
                             eos_token_id=list(eos) or None, pad_token_id=pad_token_id)
        for row, m in zip(gen[:, s:].tolist(), lim):
            row = row[:m]
            cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def hf_generator(target: str, temperature: float, seed: int, batch_size: int,
                 eos_ids: Sequence[int], pad_id: int) -> Generate:
    from coral_vllm.training.target import load_target

    model, _, _ = load_target(target)

    def generate(prompts: list[list[int]], max_tokens: list[int]) -> list[Reply]:
        rows = generate_hf(model, prompts, max_tokens, temperature, list(eos_ids), pad_id,
                           batch_size, seed)
        return [(r, bool(r) and r[-1] in eos_ids) for r in rows]

    return generate


def strip_end(reply: Reply, eos: set[int]) -> Reply:
    ids, ended = reply
    if ids and ids[-1] in eos:
        return ids[:-1], True
    return ids, ended


# ------------------------------------------------------------------------ the job
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
    from coral_vllm.training.conversations import Conversation, read_conversations
    from coral_vllm.training.texts import read_passages

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


def build_data(target: str, out_dir: str, conversations: str | None = None, *,
               texts: str | None = None, prompt_tokens: int = PROMPT_TOKENS,
               max_turns: int = 8,
               max_len: int = 2048, max_new_tokens: int = 512, dev_max_new_tokens: int = 256,
               dev_share: float = DEV_SHARE, heldout_share: float = HELDOUT_SHARE,
               max_conversations: int | None = None, temperature: float = 0.0,
               backend: str = "auto", seed: int = 0, batch_size: int = 8,
               chunk_prompts: int = 20000, time_limit_min: float = 0.0,
               generator: Generate | None = None) -> dict[str, Any] | None:
    """The `train data` command, from `conversations` or plain-text `texts` (one of the
    two files; `prompt_tokens` is the texts' prompt length); returns the manifest, or
    None if stopped by the time limit (rerun to resume). `generator` replaces the model
    (tests)."""
    from transformers import AutoTokenizer

    from coral_vllm.training.target import target_config_dict

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(target)
    gen_cfg = json.loads((Path(target) / "generation_config.json").read_text()) \
        if (Path(target) / "generation_config.json").is_file() else {}
    eos_cfg = gen_cfg.get("eos_token_id", tok.eos_token_id)
    eos = set([eos_cfg] if isinstance(eos_cfg, int) else eos_cfg or [tok.eos_token_id])
    kind, prompt_file, convs, file_stats, splicer = _prompt_set(
        conversations, texts, tok, eos, prompt_tokens, target)
    if max_conversations is not None:  # a uniform, deterministic subset
        key = lambda c: hashlib.sha1(("subset:" + c.id).encode()).hexdigest()  # noqa: E731
        convs = sorted(sorted(convs, key=key)[:max_conversations], key=lambda c: c.id)
    split = [split_of(c.id, dev_share, heldout_share) for c in convs]
    parts = Parts(Path(out_dir) / "parts")
    if backend == "auto":
        backend = "vllm" if generator is None and _vllm_on_gpu() else "transformers"
    engine: dict[str, Any] = {"start_s": 0.0}

    def gen() -> Generate:
        if generator is not None:
            return generator
        if "fn" not in engine:
            t = time.time()
            engine["fn"] = (vllm_generator(target, max_len, temperature, seed)
                            if backend == "vllm" else
                            hf_generator(target, temperature, seed, batch_size, sorted(eos),
                                         tok.pad_token_id or 0))
            engine["start_s"] = time.time() - t
        return engine["fn"]

    def run_chunks(stage: str, prompts: list[list[int]], limits: list[int]
                   ) -> list[Reply] | None:
        """Replies for every prompt, from saved parts or generated now (None: out of time)."""
        replies: list[Reply] = []
        for c, a in enumerate(range(0, len(prompts), chunk_prompts)):
            saved = parts.load(stage, c)
            if saved is None:
                if time_limit_min > 0 and time.time() - t0 > time_limit_min * 60:
                    print(f"time limit: stopped before {stage} part {c}; rerun to resume.")
                    return None
                generate = gen()  # the engine starts outside the timed region
                t = time.time()
                got = generate(prompts[a:a + chunk_prompts], limits[a:a + chunk_prompts])
                saved = {"replies": got, "seconds": time.time() - t,
                         "output_tokens": sum(len(r) for r, _ in got)}
                parts.save(stage, c, saved)
                print(f"{stage} part {c}: {len(got)} replies, {saved['output_tokens']} tokens, "
                      f"{saved['output_tokens'] / max(1e-9, saved['seconds']):.0f} tok/s",
                      flush=True)
            replies += saved["replies"]
            stats["gen_seconds"] += saved["seconds"]
            stats["output_tokens"] += saved["output_tokens"]
        return replies

    stats = {"gen_seconds": 0.0, "output_tokens": 0}
    cuts = {"replies": 0, "replies_cut_for_loops": 0, "tokens_cut_for_loops": 0,
            "conversations_ended_by_max_tokens": 0, "turns_dropped_for_length": 0}

    # dev prompts: the first turn, one greedy continuation each, as served (no cuts)
    dev_idx = [i for i, s in enumerate(split) if s == "dev"]
    dev_prompts = [splicer.sequence(convs[i].turns[:1], [])[0] for i in dev_idx]
    keep = [j for j, p in enumerate(dev_prompts) if len(p) + dev_max_new_tokens <= max_len]
    dev_idx, dev_prompts = [dev_idx[j] for j in keep], [dev_prompts[j] for j in keep]
    dev_replies = run_chunks("dev", dev_prompts, [dev_max_new_tokens] * len(dev_prompts))
    if dev_replies is None:
        return None

    # train + held-out conversations, round by round
    live = [i for i, s in enumerate(split) if s != "dev"]
    replies: dict[int, list[Reply]] = {i: [] for i in live}
    for r in range(1, max_turns + 1):
        asked, prompts, limits = [], [], []
        for i in live:
            if len(convs[i].turns) < r:
                continue
            ids, _ = splicer.sequence(convs[i].turns[:r], replies[i])
            room = min(max_new_tokens, max_len - len(ids))
            if room < min(MIN_REPLY_ROOM, max_new_tokens):
                cuts["turns_dropped_for_length"] += len(convs[i].turns) - r + 1
                continue
            asked.append(i)
            prompts.append(ids)
            limits.append(room)
        if not asked:
            break
        got = run_chunks(f"round{r:02d}", prompts, limits)
        if got is None:
            return None
        live = []
        for i, reply in zip(asked, got):
            ids, ended = strip_end(reply, eos)
            cuts["replies"] += 1
            cut = loop_start(ids)
            if cut is not None:
                cuts["replies_cut_for_loops"] += 1
                cuts["tokens_cut_for_loops"] += len(ids) - cut
                ids, ended = ids[:cut], False
            replies[i].append((ids, ended))
            if ended:
                live.append(i)  # a reply cut short ends its conversation
            elif cut is None:
                cuts["conversations_ended_by_max_tokens"] += 1
    samples: dict[str, list[tuple[list[int], list[int]]]] = {"train": [], "heldout": []}
    turns_used = {"train": 0, "heldout": 0}
    for i, reps in replies.items():
        if reps:
            samples[split[i]].append(splicer.sequence(convs[i].turns[:len(reps)], reps))
            turns_used[split[i]] += len(reps)
    dev = [(p, list(ids)) for p, (ids, _) in zip(dev_prompts, dev_replies)]
    cuts["share_of_replies_cut_for_loops"] = (cuts["replies_cut_for_loops"]
                                              / max(1, cuts["replies"]))
    meta = {"target": str(target), "backend": backend,
            kind: {"file": Path(prompt_file).name,
                   "sources": file_stats.get("sources", file_stats), "total": len(convs)},
            "splits": {"rule": "sha1(conversation id) % 10000", "dev_share": dev_share,
                       "heldout_share": heldout_share,
                       "train_conversations": len(samples["train"]),
                       "heldout_conversations": len(samples["heldout"]),
                       "dev_prompts": len(dev), "train_turns": turns_used["train"],
                       "heldout_turns": turns_used["heldout"]},
            "generation": {"temperature": temperature, "max_new_tokens": max_new_tokens,
                           "dev_max_new_tokens": dev_max_new_tokens, "max_len": max_len,
                           "max_turns": max_turns, "seed": seed,
                           "chat_template": isinstance(splicer, ChatSplicer),
                           **({"prompt_tokens": prompt_tokens} if kind == "texts" else {}),
                           "output_tokens": stats["output_tokens"],
                           "generation_seconds": round(stats["gen_seconds"], 1),
                           "output_tokens_per_s": round(stats["output_tokens"]
                                                        / max(1e-9, stats["gen_seconds"])),
                           "engine_start_seconds": round(engine["start_s"], 1)},
            "cuts": cuts}
    vocab = target_config_dict(target)["vocab_size"]
    return write_dataset(out_dir, samples["train"], vocab, heldout=samples["heldout"],
                         dev=dev, meta=meta)


def _vllm_on_gpu() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()
