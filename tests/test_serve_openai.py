"""`vllm serve` with the coral method answers the OpenAI API and exports spec metrics."""

from __future__ import annotations

import pytest

from coral_vllm.models.drafters import default_drafter
from coral_vllm.runtime.metrics import parse_prometheus
from coral_vllm.runtime.server import fetch_metrics, running_server

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
