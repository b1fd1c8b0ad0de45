"""A load generator that talks to `vllm serve` the way users do: the OpenAI client,
chat completions (or completions, for a base model's plain-text prompts), a fixed number
of requests in flight.

Non-streaming on purpose: a streaming Python client parses one SSE chunk per step and at
tens of thousands of tokens/s on one host becomes the bottleneck it is meant to measure.
Time per output token comes from the server's own histogram instead (see `e2e.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Union

# A user message, sent through /v1/chat/completions; or a prompt's token ids, sent
# through /v1/completions as they are (a base model has no chat template, and ids get no
# second BOS from the server).
Prompt = Union[str, list[int]]


@dataclasses.dataclass
class LoadResult:
    num_requests: int
    output_tokens: int
    wall_s: float
    latencies_s: list[float]
    replies: list[str]

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def mean_latency_per_token_ms(self) -> float:
        """Request latency / its output tokens, averaged (prefill included)."""
        return 1000 * sum(self.latencies_s) / max(self.output_tokens, 1)


def run_load(base_url: str, prompts: list[Prompt], *, concurrency: int, max_tokens: int,
             temperature: float, model: str | None = None) -> LoadResult:
    """Sends every prompt once, at most `concurrency` at a time; wall time runs from the
    first request sent to the last reply received."""
    return asyncio.run(_run(base_url, prompts, concurrency, max_tokens, temperature, model))


async def _send(client: Any, model: str, prompt: Prompt, max_tokens: int,
                temperature: float) -> tuple[int, str]:
    """(completion tokens, reply text) of one request, through the endpoint its kind of
    prompt goes to (see `Prompt`)."""
    if isinstance(prompt, str):
        r = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens, temperature=temperature)
        return r.usage.completion_tokens, r.choices[0].message.content or ""
    r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                        temperature=temperature)
    return r.usage.completion_tokens, r.choices[0].text


def openai_client(base_url: str, concurrency: int, timeout_s: float) -> Any:
    """An AsyncOpenAI client for a local `vllm serve`: no retries (a failure is counted,
    not hidden), at most `concurrency` connections, and a fresh connection per request.

    No keep-alive on purpose: under load, uvicorn's keep-alive timer can close a connection
    the client is reusing (encode/uvicorn#824, #1637), which the client sees as
    `APIConnectionError` although the server and the engine are fine. (CI once saw 1 such
    error in 168 requests at 64 streams, its cause unrecorded then: `load.error_chain`
    records it now.) A loopback connect costs well under a millisecond."""
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    return AsyncOpenAI(base_url=base_url + "/v1", api_key="EMPTY", max_retries=0,
                       timeout=timeout_s,
                       http_client=httpx.AsyncClient(limits=limits, timeout=timeout_s))


async def _run(base_url: str, prompts: list[Prompt], concurrency: int, max_tokens: int,
               temperature: float, model: str | None) -> LoadResult:
    async with openai_client(base_url, concurrency, timeout_s=1800) as client:
        if model is None:
            model = (await client.models.list()).data[0].id
        gate = asyncio.Semaphore(concurrency)
        latencies = [0.0] * len(prompts)
        tokens = [0] * len(prompts)
        replies = [""] * len(prompts)

        async def one(i: int, prompt: Prompt) -> None:
            async with gate:
                t0 = time.perf_counter()
                tokens[i], replies[i] = await _send(client, model, prompt, max_tokens,
                                                    temperature)
                latencies[i] = time.perf_counter() - t0

        t_start = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t_start
    return LoadResult(len(prompts), sum(tokens), wall, latencies, replies)
