"""The README's main job: serve the embedded default target with its CORAL drafter
through `vllm serve`, ask it through the OpenAI API, and show the acceptance counters."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from coral_vllm.models.drafters import default_drafter
from coral_vllm.models.model_store import DEFAULT_MODEL, fetch_model
from coral_vllm.runtime.metrics import parse_prometheus
from coral_vllm.runtime.server import fetch_metrics, running_server

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


def run_demo(model: str = DEFAULT_MODEL, drafter: str | None = None,
             num_speculative_tokens: int = 3, prompt: str = DEFAULT_PROMPT,
             max_tokens: int = 128) -> int:
    from openai import OpenAI

    target = fetch_model(model)
    drafter_dir = Path(drafter) if drafter else default_drafter(model)
    print(f"target : {target}\ndrafter: {drafter_dir}\nstarting vllm serve "
          f"(coral, k={num_speculative_tokens}); first start takes a minute or two ...",
          flush=True)
    with running_server(target, drafter_dir, num_speculative_tokens=num_speculative_tokens) as url:
        client = OpenAI(base_url=url + "/v1", api_key="EMPTY")
        served = client.models.list().data[0].id
        messages = [{"role": "user", "content": prompt}]
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model=served, messages=messages,
                                               max_tokens=max_tokens, temperature=0)
        dt = time.perf_counter() - t0
        print(f"\n>>> {prompt}\n{reply.choices[0].message.content}\n"
              f"({reply.usage.completion_tokens} tokens in {dt:.2f}s)\n")
        print(">>> same request, streamed:")
        for chunk in client.chat.completions.create(model=served, messages=messages,
                                                    max_tokens=max_tokens, temperature=0,
                                                    stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        stats = parse_prometheus(fetch_metrics(url))
    print("\n\nspeculative decoding counters (vllm:spec_decode_* from /metrics):")
    print(f"  drafts {stats.num_drafts:.0f}, draft tokens {stats.num_draft_tokens:.0f}, "
          f"accepted {stats.num_accepted_tokens:.0f}")
    print(f"  mean acceptance length {stats.acceptance_length:.2f}, per position "
          + ", ".join(f"{r:.2f}" for r in stats.per_position_rate))
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
