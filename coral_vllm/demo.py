"""The README's main job: serve the embedded default target with its CORAL drafter
through `vllm serve`, ask it through the OpenAI API, and show the acceptance counters.
While the server starts it says what it waits for (the server log's newest line, every
10 s) and where that log is; on a CPU it serves eagerly, so a reply comes within a
minute or two."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from coral_vllm.model_store.drafters import default_drafter
from coral_vllm.model_store.targets import DEFAULT_MODEL, fetch_model
from coral_vllm.runtime.device import on_cpu
from coral_vllm.runtime.metrics import parse_prometheus
from coral_vllm.runtime.server import fetch_metrics, running_server
from coral_vllm.speculative_config import NUM_SPECULATIVE_TOKENS

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


def run_demo(model: str = DEFAULT_MODEL, drafter: str | None = None,
             num_speculative_tokens: int = NUM_SPECULATIVE_TOKENS,
             prompt: str = DEFAULT_PROMPT,
             max_tokens: int = 128) -> int:
    from openai import OpenAI

    start = time.perf_counter()
    target = fetch_model(model)
    drafter_dir = Path(drafter) if drafter else default_drafter(model)
    log = Path(tempfile.gettempdir()) / "coral-vllm-demo-serve.log"
    # On a CPU, torch.compile would more than double the server's start (SmolLM2-135M
    # on 2 cores: ~3 minutes compiled); eager serving answers the same tokens.
    eager = on_cpu()
    print(f"target : {target}\ndrafter: {drafter_dir}\nserver log: {log}\n"
          f"starting vllm serve (coral, k={num_speculative_tokens}"
          f"{', eager: no torch.compile on the CPU' if eager else ''}); waiting for it to "
          "load the target and the drafter and answer /health ...", flush=True)
    with running_server(target, drafter_dir, num_speculative_tokens=num_speculative_tokens,
                        extra_args=["--enforce-eager"] if eager else None, log_path=log,
                        progress=_waiting) as url:
        print(f"server ready after {time.perf_counter() - start:.0f}s", flush=True)
        client = OpenAI(base_url=url + "/v1", api_key="EMPTY")
        served = client.models.list().data[0].id
        messages = [{"role": "user", "content": prompt}]
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model=served, messages=messages,
                                               max_tokens=max_tokens, temperature=0)
        dt = time.perf_counter() - t0
        print(f"\n>>> {prompt}\n{reply.choices[0].message.content}\n"
              f"({reply.usage.completion_tokens} tokens in {dt:.2f}s; reply "
              f"{time.perf_counter() - start:.0f}s after the demo started)\n")
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


def _waiting(waited_s: float, last_log: str) -> None:
    print(f"  ... {waited_s:3.0f}s, still starting; the server's log says: "
          f"{last_log[:100] or '(nothing yet)'}", flush=True)


if __name__ == "__main__":
    sys.exit(run_demo())
