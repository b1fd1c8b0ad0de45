"""The target's greedy (or sampled) replies to token-id prompts: vLLM on a GPU, transformers
elsewhere.

A generator takes prompts and per-prompt token limits and returns, per prompt, the
generated ids and whether the reply ended by itself (:data:`Reply`); `data.self_distill`
runs it part by part, and `training.evaluate` uses :func:`generate_hf` for the
continuations it replays.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from coral_vllm.runtime.engine_args import GPU_SHARE

Reply = tuple[list[int], bool]  # generated ids without the end-of-turn token, ended?
Generate = Callable[[list[list[int]], list[int]], list[Reply]]


def vllm_generator(target: str, max_model_len: int, temperature: float, seed: int,
                   gpu_share: float = GPU_SHARE) -> Generate:
    """Many sequences in flight through vLLM's offline engine (the GPU path); several
    engines can share one GPU (`gpu_share` each), since a small target leaves vLLM's
    per-step CPU work, not the GPU, as the limit."""
    from vllm import LLM, SamplingParams

    from coral_vllm.runtime.engine_args import engine_defaults

    # on a GPU: many sequences in flight (a 135M target leaves the card idle otherwise)
    llm = LLM(model=target, seed=seed, max_model_len=max_model_len, enable_prefix_caching=True,
              **engine_defaults(gpu_memory_utilization=gpu_share, max_num_seqs=1024,
                                max_num_batched_tokens=32768))

    def generate(prompts: list[list[int]], max_tokens: list[int]) -> list[Reply]:
        # token ids are all this needs: no detokenizing on vLLM's (busy) front-end thread
        params = [SamplingParams(temperature=temperature, max_tokens=m, seed=seed,
                                 detokenize=False) for m in max_tokens]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop")
                for o in outs]

    return generate


@torch.no_grad()
def generate_hf(model, prompts: list[list[int]], max_new_tokens: int | list[int],
                temperature: float, eos_token_id: int | list[int] | None,
                pad_token_id: int = 0, batch_size: int = 8, seed: int = 0
                ) -> list[list[int]]:
    """Responses with transformers generate (CPU, small runs): left-padded batches, each
    cut after its first end token (kept)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    limits = (max_new_tokens if isinstance(max_new_tokens, list)
              else [max_new_tokens] * len(prompts))
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk, lim = prompts[i: i + batch_size], limits[i: i + batch_size]
        s = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), s), pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, s - len(p):], attn[j, s - len(p):] = torch.tensor(p), 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=max(lim), do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None,
                             top_p=None, top_k=None,
                             eos_token_id=list(eos) or None, pad_token_id=pad_token_id)
        for row, m in zip(gen[:, s:].tolist(), lim):
            row = row[:m]
            cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def hf_generator(target: str, temperature: float, seed: int, batch_size: int,
                 eos_ids: Sequence[int], pad_id: int) -> Generate:
    from coral_vllm.data.target import load_target

    model, _, _ = load_target(target)

    def generate(prompts: list[list[int]], max_tokens: list[int]) -> list[Reply]:
        rows = generate_hf(model, prompts, max_tokens, temperature, list(eos_ids), pad_id,
                           batch_size, seed)
        return [(r, bool(r) and r[-1] in eos_ids) for r in rows]

    return generate


def strip_end(reply: Reply, eos: set[int]) -> Reply:
    ids, ended = reply
    if ids and ids[-1] in eos:
        return ids[:-1], True
    return ids, ended
