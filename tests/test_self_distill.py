"""Self-distilled conversations: exact chat-template ids, loop cuts, splits, resume (CPU);
plain-text passages for a base target (Gemma-3-270M's real tokenizer, a fake generator)."""

from __future__ import annotations

import json
import types

import pytest

from coral_vllm.data import self_distill
from coral_vllm.data.conversations import Conversation, write_conversations
from coral_vllm.data.loops import loop_start
from coral_vllm.data.self_distill import build_data
from coral_vllm.data.shards import load_dev, load_splits, read_manifest
from coral_vllm.data.splicers import ChatSplicer
from coral_vllm.data.splits import split_of
from coral_vllm.data.texts import Passage, TextPrompter, dev_prompts, write_passages


@pytest.fixture(scope="module")
def tok(target_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(target_dir))


def test_splicer_gives_the_template_ids_around_generated_replies(tok):
    """Replies spliced in as ids == the chat template of the whole conversation (SmolLM2's
    real template, default system prompt included); the mask marks exactly the replies
    and each reply's end-of-turn token."""
    from coral_vllm.data.eval_sets import chat_prompt_ids

    splicer = ChatSplicer(tok, [tok.eos_token_id])
    turns = ["Hi there", "How are you today?"]
    texts = ["Hello! How can I help?", "I am fine, thank you."]
    replies = [(tok.encode(t, add_special_tokens=False), True) for t in texts]
    assert splicer.sequence(turns[:1], [])[0] == chat_prompt_ids(tok, turns[0])
    ids, mask = splicer.sequence(turns, replies)
    msgs = [{"role": r, "content": c} for pair in zip(turns, texts)
            for r, c in zip(("user", "assistant"), pair)]
    want = tok.apply_chat_template(msgs, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert ids == want[:len(ids)] and want[len(ids):] == tok.encode("\n")
    marked = [t for t, m in zip(ids, mask) if m]
    assert marked == replies[0][0] + [tok.eos_token_id] + replies[1][0] + [tok.eos_token_id]
    # the prompt of turn 2 is the first reply in place, then the template's next turn
    prompt2, _ = splicer.sequence(turns, replies[:1])
    assert prompt2 == want[:len(prompt2)]
    gen_prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert prompt2[-len(gen_prompt):] == gen_prompt


def test_loop_start_cuts_a_repeating_tail_to_one_copy():
    assert loop_start(list(range(100))) is None
    looped = list(range(40)) + [7, 8, 9] * 12
    assert loop_start(looped) == 43  # one copy of (7, 8, 9) kept
    assert loop_start([5] * 30) == 1
    assert loop_start(list(range(40)) + [1, 2] * 4) is None  # 8 tokens: not a loop yet
    para = list(range(200, 260))
    assert loop_start(list(range(10)) + para * 3) == 10 + 60


def test_splits_are_fixed_by_the_id():
    ids = [f"src:{i}" for i in range(4000)]
    splits = [split_of(i, 0.005, 0.02) for i in ids]
    assert splits == [split_of(i, 0.005, 0.02) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in ("dev", "heldout", "train")}
    assert 0.001 < share["dev"] < 0.01 and 0.01 < share["heldout"] < 0.03


def _fake_generator(calls: list[int]):
    """Replies that depend on the prompt only: 5 tokens then end-of-turn; prompts whose
    token sum is divisible by 4 get a looping reply that hits the token limit."""
    def generate(prompts, limits):
        calls.append(len(prompts))
        out = []
        for p, lim in zip(prompts, limits):
            base = [300 + len(p) % 50 + i for i in range(5)]
            if sum(p) % 4 == 0:
                out.append(((base + [11, 12] * 40)[:lim], False))
            else:
                out.append((base + [2], True))  # 2: SmolLM2's <|im_end|>
        return out
    return generate


def _convs(tmp_path, n=24):
    convs = [Conversation(f"t:{i}", "t", tuple(f"question {i} part {j}" for j in range(1 + i % 3)))
             for i in range(n)]
    return convs, write_conversations(tmp_path / "convs.jsonl.xz", convs, {"sources": {"t": {}}})


def test_build_data_multi_turn_splits_loops_and_resume(target_dir, tmp_path):
    convs, path = _convs(tmp_path)
    calls: list[int] = []
    kw = dict(dev_share=0.25, heldout_share=0.25, max_turns=3, max_new_tokens=64,
              dev_max_new_tokens=16, chunk_prompts=4, generator=_fake_generator(calls))
    m = build_data(str(target_dir), str(tmp_path / "data"), str(path), **kw)
    assert m["complete"] and m["stopped_before"] is None
    splits = [split_of(c.id, 0.25, 0.25) for c in convs]
    n_dev = splits.count("dev")
    assert m["dev"]["samples"] == n_dev and 0 < n_dev < 24
    assert m["samples"] == splits.count("train") and m["heldout_samples"] == splits.count("heldout")
    # every asked turn is counted; looping replies end their conversation and, by
    # default, stay whole in the data (as vLLM serves the target)
    cuts = m["cuts"]
    assert cuts["loops"] == "keep" and cuts["replies_looping"] > 0 and cuts["loop_tokens"] > 0
    assert cuts["replies"] == sum(calls) - n_dev
    gen = m["generation"]
    assert gen["output_tokens"] > 0 and gen["output_tokens_per_s_per_engine"] > 0
    # multi-turn samples hold every reply in place, masked; the dev continuation uncut
    train_t, held_t = load_splits(tmp_path / "data", 4096)
    ids, mask = max((train_t.sample(i) for i in range(len(train_t))), key=lambda s: len(s[0]))
    assert int(mask.sum()) >= 12  # two replies of 5 + end-of-turn
    dev, prompt_lens = load_dev(tmp_path / "data", 4096)
    assert (dev.lengths - prompt_lens > 0).all()
    # trimmed: the same generation (nothing generated again), looping replies cut to one
    # copy of their unit, so fewer response tokens and the same conversations and turns
    calls.clear()
    trim = build_data(str(target_dir), str(tmp_path / "data"), str(path), loops="trim", **kw)
    assert calls == [] and trim["cuts"]["loops"] == "trim"
    assert trim["cuts"]["loop_tokens"] == cuts["loop_tokens"]
    assert m["loss_tokens"] - cuts["loop_tokens"] <= trim["loss_tokens"] < m["loss_tokens"]
    assert trim["splits"] == m["splits"] and trim["samples"] == m["samples"]
    # resume: only the missing part is generated again, to the same data
    keep = build_data(str(target_dir), str(tmp_path / "data"), str(path), **kw)
    before = read_manifest(tmp_path / "data")
    parts = sorted((tmp_path / "data" / "parts").glob("round01-*.pt"))
    parts[-1].unlink()
    calls.clear()
    m2 = build_data(str(target_dir), str(tmp_path / "data"), str(path), **kw)
    assert len(calls) == 1
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in before["shards"]]
    assert json.dumps(m2["cuts"]) == json.dumps(keep["cuts"])


def test_build_data_stopped_by_the_time_limit_leaves_usable_data(target_dir, tmp_path,
                                                                  monkeypatch):
    """A part is started only if this process's rate says it ends in time; what was
    generated is written as data (manifest "complete": false), and a rerun completes it."""
    convs, path = _convs(tmp_path, 40)
    calls: list[int] = []
    fake = _fake_generator(calls)
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(self_distill, "time", types.SimpleNamespace(time=lambda: clock.now))

    def slow(prompts, limits):  # every part takes 10 s of the fake clock
        clock.now += 10
        return fake(prompts, limits)

    kw = dict(dev_share=0.05, heldout_share=0.2, max_turns=3, max_new_tokens=64,
              dev_max_new_tokens=16, chunk_prompts=4)
    # dev (2 prompts) ends at 10 s, too few for a rate (a part is 4); round01 part 0
    # starts, part 1 is expected by 20 + 4 * 20/6 = 33 s, inside the 35 s limit;
    # part 2 would end at 30 + 4 * 30/10 = 42 s, so it is not started
    m = build_data(str(target_dir), str(tmp_path / "d"), str(path), generator=slow,
                   time_limit_min=35 / 60, **kw)
    assert m["dev"]["samples"] == 2 and calls == [2, 4, 4]
    assert not m["complete"] and m["stopped_before"] == "parts/round01 part 2"
    assert 0 < m["samples"] and m["cuts"]["replies"] == sum(calls) - m["dev"]["samples"]
    assert read_manifest(tmp_path / "d")["complete"] is False
    train_t, _ = load_splits(tmp_path / "d", 4096)
    assert len(train_t) == m["samples"]
    calls.clear()
    same = build_data(str(target_dir), str(tmp_path / "d"), str(path), generator=fake,
                      write_only=True, **kw)
    assert calls == [] and not same["complete"] and same["samples"] == m["samples"]
    full = build_data(str(target_dir), str(tmp_path / "d"), str(path), generator=fake, **kw)
    whole = build_data(str(target_dir), str(tmp_path / "w"), str(path),
                       generator=_fake_generator([]), **kw)
    assert full["complete"] and full["samples"] > m["samples"]
    assert [s["sha256"] for s in full["shards"]] == [s["sha256"] for s in whole["shards"]]


def test_build_data_over_shards_equals_one_engine(target_dir, tmp_path):
    """Conversations split over two engines (one process each), then merged: the same
    samples as one engine; a shard writes no data, and the merge generates nothing."""
    convs, path = _convs(tmp_path, 30)
    kw = dict(dev_share=0.2, heldout_share=0.2, max_turns=3, max_new_tokens=64,
              dev_max_new_tokens=16, chunk_prompts=4)
    one = build_data(str(target_dir), str(tmp_path / "one"), str(path),
                     generator=_fake_generator([]), **kw)
    per_shard = []
    for s in (0, 1):
        calls: list[int] = []
        got = build_data(str(target_dir), str(tmp_path / "two"), str(path), shards=2, shard=s,
                         generator=_fake_generator(calls), **kw)
        assert got["complete"] and got["shard"] == s
        assert not (tmp_path / "two" / "manifest.json").exists()
        per_shard.append(sum(calls))
    assert all(per_shard) and sum(per_shard) == one["cuts"]["replies"] + one["dev"]["samples"]
    merge_calls: list[int] = []
    two = build_data(str(target_dir), str(tmp_path / "two"), str(path), shards=2,
                     generator=_fake_generator(merge_calls), **kw)
    assert merge_calls == [] and two["complete"] and two["generation"]["engines"] == 2
    assert [s["sha256"] for s in two["shards"]] == [s["sha256"] for s in one["shards"]]
    assert two["cuts"] == one["cuts"] and two["dev"]["samples"] == one["dev"]["samples"]
    with pytest.raises(ValueError, match="resume it with --shards 2"):
        build_data(str(target_dir), str(tmp_path / "two"), str(path), shards=3, **kw)
    with pytest.raises(ValueError, match="shard 2 of 2"):
        build_data(str(target_dir), str(tmp_path / "x"), str(path), shards=2, shard=2, **kw)


# ------------------------------------------------------------------ plain text (base)
@pytest.fixture(scope="module")
def gemma_tok(gemma_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(gemma_dir))


def test_text_prompts_keep_the_tokenizers_bos_and_no_eos(tok, gemma_tok):
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away."
    gemma = TextPrompter(gemma_tok, 8)(text)
    assert gemma == [gemma_tok.bos_token_id] + gemma_tok.encode(
        text, add_special_tokens=False)[:7]  # Gemma's GGUF keeps add_bos_token
    assert TextPrompter(tok, 8)(text) == tok.encode(text, add_special_tokens=False)[:8]
    short = TextPrompter(gemma_tok, 512)("Hi")
    assert short == gemma_tok.encode("Hi") and short[-1] != gemma_tok.eos_token_id
    with pytest.raises(ValueError, match="--prompt-tokens >= 1"):
        TextPrompter(gemma_tok, 0)


def _text_generator(calls: list[int], eos: int):
    """Six prompt-dependent tokens; every other prompt's continuation ends (eos)."""
    def generate(prompts, limits):
        calls.append(len(prompts))
        out = []
        for p, lim in zip(prompts, limits):
            ended = len(p) % 2 == 1
            out.append(([500 + len(p) % 50 + i for i in range(6)][:lim] + [eos] * ended, ended))
        return out
    return generate


def test_build_data_from_texts_for_a_base_target(gemma_dir, gemma_tok, tmp_path):
    passages = [Passage(f"t:doc{i}#0", "t", f"Passage {i}. " + "More words here. " * (i % 7))
                for i in range(40)]
    path = write_passages(tmp_path / "texts.jsonl.xz", passages, {"sources": {"t": {}}})
    calls: list[int] = []
    kw = dict(texts=str(path), prompt_tokens=12, dev_share=0.2, heldout_share=0.2,
              max_new_tokens=10, dev_max_new_tokens=6, chunk_prompts=8,
              generator=_text_generator(calls, eos=1))
    m = build_data(str(gemma_dir), str(tmp_path / "data"), **kw)
    assert m["texts"] == {"file": "texts.jsonl.xz", "sources": {"t": {}}, "total": 40}
    assert m["generation"]["chat_template"] is False and m["generation"]["prompt_tokens"] == 12
    split = {p.id: split_of(p.id, 0.2, 0.2) for p in passages}
    train = [p for p in passages if split[p.id] == "train"]
    assert m["samples"] == len(train) and m["heldout_samples"] == sum(
        s == "heldout" for s in split.values())
    prompt = TextPrompter(gemma_tok, 12)
    table, _ = load_splits(tmp_path / "data", 4096)
    for i, p in enumerate(train):  # prompt unmasked, then the continuation masked
        ids, mask = (list(map(int, x)) for x in table.sample(i))
        want = prompt(p.text)
        assert ids[:len(want)] == want and ids[0] == gemma_tok.bos_token_id
        assert mask == [0] * len(want) + [1] * (len(ids) - len(want)) and len(ids) > len(want)
    # the dev split is what `bench e2e --datasets texts:FILE` sends
    dev, prompt_lens = load_dev(tmp_path / "data", 4096)
    got = [list(map(int, dev.sample(i)[0][:n])) for i, n in enumerate(prompt_lens)]
    assert got == dev_prompts(path, gemma_tok, 12, 0.2, 0.2) and got
    assert max(calls) <= 8  # chunk_prompts
    calls.clear()  # every part saved: a rerun generates nothing
    m2 = build_data(str(gemma_dir), str(tmp_path / "data"), **kw)
    assert calls == [] and [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m["shards"]]


def test_build_data_wants_one_prompt_file_and_texts_for_a_base_model(gemma_dir, tmp_path):
    convs = write_conversations(tmp_path / "c.jsonl.xz", [Conversation("t:0", "t", ("q",))], {})
    with pytest.raises(ValueError, match="no chat template .* --texts FILE"):
        build_data(str(gemma_dir), str(tmp_path / "d"), str(convs), generator=_fake_generator([]))
    with pytest.raises(ValueError, match="pass one of --conversations FILE .* --texts FILE"):
        build_data(str(gemma_dir), str(tmp_path / "d"), str(convs), texts=str(convs))
