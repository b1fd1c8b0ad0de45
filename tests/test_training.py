"""Offline training module on a tiny random Llama target (CPU, no downloads, < 2 min)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coral_vllm.data.generators import generate_hf
from coral_vllm.data.shards import load_dev, load_splits, read_samples, write_dataset
from coral_vllm.format.checkpoint import expected_shapes, read_checkpoint
from coral_vllm.training.config import PlanChanged, TrainConfig
from coral_vllm.training.model import CoralDrafter
from coral_vllm.training.multi_step import multi_step_forward
from coral_vllm.training.run_dir import load_state
from coral_vllm.training.trainer import train

VOCAB, HIDDEN = 512, 64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny tied-embedding Llama target + 64 self-generated greedy samples: 48 train,
    8 held out, 8 dev prompts with their continuations."""
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
    prompts = [torch.randint(3, VOCAB, (6,), generator=g).tolist() for _ in range(64)]
    responses = generate_hf(model, prompts, max_new_tokens=24, temperature=0.0,
                            eos_token_id=None, batch_size=64)
    samples = [(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompts, responses)]
    manifest = write_dataset(root / "data", samples[:48], VOCAB, heldout=samples[48:56],
                             dev=list(zip(prompts[56:], responses[56:])),
                             meta={"source": "test"})
    return {"root": root, "target": str(root / "target"), "data": str(root / "data"),
            "model": model, "manifest": manifest, "prompts": prompts}


def _cfg(tiny, out, **kw):
    base = dict(target=tiny["target"], data=tiny["data"], out=str(out), lr=3e-3,
                warmup_steps=5, batch_tokens=512, epochs=100, log_every=1, save_every=1000,
                num_groups=16, top_k_groups=4, router_epochs=30, router_lr=3e-3,
                feature_noise=0.0)
    return TrainConfig.from_preset(kw.pop("preset", "coral"), **{**base, **kw})


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One CORAL run of 150 steps, validated every 50 (shared by several tests)."""
    out = tmp_path_factory.mktemp("run") / "run"
    res = train(_cfg(tiny, out, max_steps=150, eval_every=50))
    return {"out": out, "res": res,
            "lines": [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]}


def test_data_manifest_and_splits(tiny):
    m = tiny["manifest"]
    assert m["samples"] == 48 and m["heldout_samples"] == 8 and m["dev"]["samples"] == 8
    assert m["loss_tokens"] > 0 and len(m["shards"][0]["sha256"]) == 64
    ids, mask = read_samples(tiny["data"], verify=True)[0]
    assert ids.shape == mask.shape and int(mask[:6].sum()) == 0 and int(mask[6:].sum()) > 0
    train_t, held_t = load_splits(tiny["data"], max_len=20)
    assert len(train_t) == 48 and len(held_t) == 8 and train_t.lengths.max() == 20
    dev, prompt_lens = load_dev(tiny["data"], max_len=1024)
    assert len(dev) == 8 and (prompt_lens == 6).all()
    assert int(dev.loss_mask[:-1].sum()) == sum(dev.lengths - 6)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_drafter_names_match_checkpoint_format(tiny, num_layers):
    """The training drafter's tensors are exactly the checkpoint's (every layer's, an
    input norm on layers after the first), whatever the depth."""
    from coral_vllm.format.config import CoralConfig
    from coral_vllm.format.drafter_config import drafter_llama_config
    tcfg = json.loads((tiny["root"] / "target" / "config.json").read_text())
    drafter = CoralDrafter(tcfg, num_groups=16, num_layers=num_layers)
    coral = CoralConfig.for_vocab(VOCAB, HIDDEN, 16, 4)
    config = drafter_llama_config(tcfg, coral, num_layers)
    assert config["num_hidden_layers"] == num_layers
    shapes = {k: tuple(v.shape) for k, v in drafter.drafter_state_dict().items()}
    assert shapes == expected_shapes(config, coral)
    assert ("layers.1.input_layernorm.weight" in shapes) == (num_layers == 2)
    assert "layers.0.input_layernorm.weight" not in shapes


def test_multi_step_feeds_own_shifted_features(tiny):
    tcfg = json.loads((tiny["root"] / "target" / "config.json").read_text())
    drafter = CoralDrafter(tcfg, num_groups=16)
    seen = []
    real_step = drafter.step

    def spy(ids, feats, positions=None, **kw):
        seen.append(feats.detach().clone())
        return real_step(ids, feats, positions, **kw)

    drafter.step = spy
    ids = torch.randint(0, VOCAB, (2, 10))
    feats = torch.randn(2, 10, HIDDEN)
    outs = multi_step_forward(drafter, ids, feats, 3, context_alignment=False)
    assert len(outs) == 3 and torch.equal(seen[0], feats)
    for j in (1, 2):
        assert torch.equal(seen[j][:, 0], feats[:, 0])                  # f_0 kept
        assert torch.allclose(seen[j][:, 1:], outs[j - 1][:, :-1])      # o_{j}[t-1] -> t
        assert not outs[j - 1].requires_grad or seen[j].grad_fn is None


@pytest.mark.parametrize("start,num_layers,fused", [(0, 1, None), (4, 1, None),
                                                    (4, 2, None), (4, 2, [0, 1])])
def test_hass_context_alignment_equals_inference_chain(tiny, start, num_layers, fused):
    """Step j's output at t (training, one pass per step) == the depth-j draft of a chain
    started at t - j + 1 that reads target features before it (inference, as vLLM's
    proposer runs it: combine the target's features once, then each step reads the
    previous step's hand-on state); with two layers every layer keeps its own
    keys/values per step; with fused features the hand-on state is the pre-norm stream."""
    tcfg = json.loads((tiny["root"] / "target" / "config.json").read_text())
    torch.manual_seed(1)
    drafter = CoralDrafter(tcfg, num_groups=16, num_layers=num_layers,
                           fused_layers=fused).eval()
    width = HIDDEN * (len(fused) if fused else 1)
    ids, feats = torch.randint(0, VOCAB, (2, 12)), torch.randn(2, 12, width)
    with torch.no_grad():
        outs = multi_step_forward(drafter, ids, feats, 3, context_alignment=True)
        h_chain = drafter.combine(feats[:, : start + 1])
        for depth in (1, 2, 3):
            t = start + depth - 1
            o, nxt, _ = drafter.step(ids[:, : t + 1], h_chain)
            assert torch.allclose(o[:, -1], outs[depth - 1][:, t], atol=1e-5), depth
            h_chain = torch.cat([h_chain, nxt[:, -1:]], dim=1)
        naive = multi_step_forward(drafter, ids, feats, 3, context_alignment=False)
    assert torch.allclose(naive[0], outs[0]) and not torch.allclose(naive[2], outs[2])


def test_train_validates_keeps_best_and_exports(tiny, trained):
    res, lines = trained["res"], trained["lines"]
    steps = [x for x in lines if "loss" in x]
    evals = [x["eval"] for x in lines if "eval" in x]
    first = sum(x["loss"] for x in steps[:10]) / 10
    last = sum(x["loss"] for x in steps[-10:]) / 10
    assert res["done"] and last < 0.85 * first, (first, last)
    assert all(np.isfinite(x["csra"]) for x in steps) and steps[-1]["acc1"] > 0.1
    assert steps[-1]["router_recall"] > 4 / 16 + 0.2  # the online router learns
    assert [e["step"] for e in evals] == [50, 100, 150]
    for e in evals:  # validation ran: held-out accuracy per step, tau router on and off
        assert {"heldout_acc1", "heldout_acc3", "tau_dense", "tau_router"} <= set(e)
        assert 1.0 <= e["tau_dense"] <= 6.0 and e["tau_dense_rounds"] > 0
    best = max(evals, key=lambda e: e["tau_router"])
    assert res["best"]["step"] == best["step"] and res["best"]["metric"] == "tau_router"
    assert load_state(trained["out"], "best.pt")["step"] == best["step"]

    # the held-out split never reaches training: no held-out sample is a training sample
    train_t, held_t = load_splits(tiny["data"], 2048)
    train_set = {tuple(train_t.sample(i)[0]) for i in range(len(train_t))}
    assert not any(tuple(held_t.sample(i)[0]) in train_set for i in range(len(held_t)))

    from coral_vllm.training.export import export
    ckpt = read_checkpoint(export(trained["out"], tiny["root"] / "exported"))
    assert ckpt.coral.trained and ckpt.coral.partition == "frequency"
    assert ckpt.coral.top_k_groups == 4 and ckpt.coral.num_groups == 16
    cfg = json.loads((tiny["root"] / "exported" / "config.json").read_text())
    assert cfg["coral_training"]["checkpoint"] == "best"
    assert cfg["coral_training"]["steps_trained"] == best["step"]
    dense = read_checkpoint(export(trained["out"], tiny["root"] / "dense", dense=True))
    assert dense.coral.top_k_groups == dense.coral.num_groups
    assert ckpt.coral.group_sharing == "token"
    from coral_vllm.training.cli import main
    shared = tiny["root"] / "shared"
    assert main(["export", "--run", str(trained["out"]), "--dest", str(shared),
                 "--group-sharing", "batch"]) == 0
    assert read_checkpoint(shared).coral.group_sharing == "batch"


def test_a_run_that_travelled_as_best_pt_alone_exports_the_same_drafter(tiny, trained,
                                                                      tmp_path):
    """A finished run sent back without its state (the optimizer's moments: ~3x the
    drafter) exports from best.pt what the whole run exports; `latest` says what is missing."""
    import shutil

    from safetensors.torch import load_file

    from coral_vllm.training.export import export

    light = tmp_path / "run"
    light.mkdir()
    for f in ("best.pt", "metrics.jsonl", "train_config.json"):
        shutil.copy(trained["out"] / f, light / f)
    whole = load_file(export(trained["out"], tmp_path / "whole") / "model.safetensors")
    alone = load_file(export(light, tmp_path / "alone") / "model.safetensors")
    assert whole.keys() == alone.keys()
    assert all(torch.equal(whole[k], alone[k]) for k in whole)
    trained_as = json.loads((tmp_path / "alone" / "config.json").read_text())["coral_training"]
    assert trained_as["checkpoint"] == "best"  # what it is, though the run has no state
    with pytest.raises(FileNotFoundError, match=r"no state/latest.pt \(checkpoint latest\)"):
        export(light, tmp_path / "latest", checkpoint="latest")


def test_offline_chain_tau_equals_token_by_token_speculation(tiny, trained):
    """The batched replay (validate.chain_tau) gives exactly the rounds and accepted
    drafts of real chain speculation (draft k, verify, accept the prefix) with the dense
    head and with the router; and that speculation is lossless."""
    from coral_vllm.training.evaluate import (continuation_split, load_drafter,
                                              speculative_generate, tau_of_drafters)
    from coral_vllm.training.export import export

    target = tiny["model"]
    drafter = load_drafter(export(trained["out"], tiny["root"] / "tau", dtype="float32"), target)
    prompts = tiny["prompts"][:12]  # training prompts: the drafter has learnt these
    split = continuation_split(target, prompts, 24, [])
    fast = {r["router"]: r for r in tau_of_drafters(target, {"d": drafter}, split, k=5)}
    for use_router in (False, True):
        lengths = []
        for p in prompts:
            r = speculative_generate(target, drafter, p, k=5, max_new_tokens=24,
                                     use_router=use_router)
            lengths += r["accept_lengths"]
        assert fast[use_router]["rounds"] == len(lengths), use_router
        assert fast[use_router]["tau"] == pytest.approx(sum(lengths) / len(lengths), abs=1e-12)
    assert fast[False]["tau"] > 1.1, fast  # the comparison covers multi-token acceptances
    prompt = tiny["prompts"][-1]
    spec = speculative_generate(target, drafter, prompt, k=5, max_new_tokens=24,
                                use_router=True)
    plain = target.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert spec["tokens"] == plain  # lossless: greedy output unchanged by speculation


def test_router_stage_on_a_run(tiny, trained):
    from coral_vllm.training.router_train import run_router_stage

    report = run_router_stage(trained["out"], {"partition": "auto"})
    best = report["partitions"][report["chosen"]]
    assert best["recall_at_k"] > report["random_recall"] + 0.2, report
    assert set(report["partitions"]) == {"contiguous", "frequency", "cluster"}


def test_static_export_is_the_drafter_the_router_report_measured(tiny, trained, tmp_path):
    """`train export --selection static` after stage 2 (which chose another partition
    here): the trained layer without a router, the first k groups of the report's
    frequency partition at the router's active rows, and its held-out recall, measured
    through its own head, is the report's `static_head` number; offline tau with its
    restricted head equals token-by-token speculation."""
    import shutil

    from coral_vllm.format.partition import grouped_rows, row_token_ids
    from coral_vllm.head.static_lm_head import static_logits
    from coral_vllm.training.cli import main
    from coral_vllm.training.evaluate import (continuation_split, load_drafter,
                                              speculative_generate, tau_of_drafters)
    from coral_vllm.training.router_train import ROUTER_FILE, collect, run_router_stage

    run = tmp_path / "run"
    shutil.copytree(trained["out"], run)
    report = run_router_stage(run, {"partition": "cluster", "router_epochs": 2})
    static = report["static_head"]
    assert static["top_k_groups"] == 4 and static["rows"] == 4 * 32
    dest = tmp_path / "static"
    assert main(["export", "--run", str(run), "--dest", str(dest), "--selection", "static",
                 "--dtype", "float32"]) == 0
    ckpt = read_checkpoint(dest)
    c = ckpt.coral
    assert (c.selection, c.partition, c.top_k_groups, c.active_rows) == (
        "static", "frequency", 4, static["rows"])
    assert not any(k.startswith("router.") for k in ckpt.shapes)
    stored = torch.load(run / ROUTER_FILE, weights_only=False)["frequency_order"]
    assert torch.equal(ckpt.token_order, stored)

    target = tiny["model"]
    drafter = load_drafter(dest, target)
    assert drafter.router is None
    cfg = TrainConfig.from_dict(load_state(run)["config"])
    _, held = load_splits(tiny["data"], cfg.max_len, cfg.router_holdout)
    order = drafter.partition.token_order
    ho = collect(drafter, target, held, cfg.num_steps, cfg.batch_tokens,
                 cfg.router_max_tokens, torch.device("cpu"))
    head = grouped_rows(drafter.lm_head.weight, order, c.num_groups, c.group_size)
    rows = row_token_ids(order, c.num_groups, c.group_size)
    logits = static_logits(ho["h"], head, rows, c.active_rows, c.vocab_size)
    recall = logits.gather(1, ho["top1"][:, None]).isfinite().float().mean().item()
    assert recall == static["recall_at_k"] and 0 < recall < 1

    prompts = tiny["prompts"][:4]
    split = continuation_split(target, prompts, 24, [])
    fast = {r["router"]: r for r in tau_of_drafters(target, {"s": drafter}, split, k=5)}
    lengths = [n for p in prompts for n in speculative_generate(
        target, drafter, p, k=5, max_new_tokens=24, use_router=True)["accept_lengths"]]
    assert fast[True]["rounds"] == len(lengths)
    assert fast[True]["tau"] == pytest.approx(sum(lengths) / len(lengths), abs=1e-12)
    with pytest.raises(SystemExit):  # --static-rows without --selection static
        main(["export", "--run", str(run), "--dest", str(dest), "--static-rows", "64"])


def test_router_sweep_chooses_by_heldout_recall_and_export_serves_it(tiny, tmp_path):
    """`train router --sweep-groups` on a short run: one router per group count at equal
    active rows (k x G = 128 of 512), each in its own directory (the run's router.pt is
    not written), the table with the held-out split's size, the static head at the same
    rows and the setting of best held-out recall chosen; `export --router-sweep` serves
    that setting's router and partition, and its static twin the same rows."""
    from coral_vllm.training.cli import main
    from coral_vllm.training.router_sweep import choose, equal_share_settings

    run = tmp_path / "run"
    train(_cfg(tiny, run, max_steps=4, eval_every=0))
    assert main(["router", "--out", str(run), "--sweep-groups", "8", "16", "32",
                 "--active-share", "0.25", "--router-epochs", "3"]) == 0
    table = json.loads((run / "router_sweep.json").read_text())
    rows = table["settings"]
    assert [(r["num_groups"], r["top_k_groups"], r["active_rows"], r["static_head"]["rows"])
            for r in rows] == [(8, 2, 128, 128), (16, 4, 128, 128), (32, 8, 128, 128)]
    assert table["split"]["heldout_samples"] == 8 and table["split"]["heldout_tokens"] > 0
    assert table["checkpoint"] == {"file": "best.pt", "step": 4}  # what export serves
    for r in rows:  # each setting's own best (partition, pinned), on the held-out split
        recalls = {(s, 0): p["recall_at_k"] for s, p in r["partitions"].items()}
        recalls.update({("frequency", q["pinned_groups"]): q["recall_at_k"]
                        for q in r["partitions"]["frequency"]["pinned"]})
        assert {q for s, q in recalls} == set(range(0, r["top_k_groups"],
                                                    r["top_k_groups"] // 4 or 1))
        assert r["recall_at_k"] == max(recalls.values()) == recalls[
            r["partition"], r["pinned_groups"]]
        assert 0 <= r["dense_agreement"] <= 1 and 0 < r["static_head"]["recall_at_k"] < 1
    chosen = table["chosen"]
    assert chosen["name"] == max(rows, key=lambda r: r["recall_at_k"])["name"]
    assert not (run / "router.pt").exists()

    stored = torch.load(run / chosen["router"], weights_only=False)
    for selection in ("router", "static"):
        dest = tmp_path / selection
        assert main(["export", "--run", str(run), "--dest", str(dest), "--router-sweep",
                     "--selection", selection, "--dtype", "float32"]) == 0
        ckpt = read_checkpoint(dest)
        assert (ckpt.coral.num_groups, ckpt.coral.active_rows) == (chosen["num_groups"], 128)
        assert ckpt.coral.pinned_groups == (chosen["pinned_groups"]
                                            if selection == "router" else 0)
        order = stored["token_order" if selection == "router" else "frequency_order"]
        assert torch.equal(ckpt.token_order, order)
    assert read_checkpoint(tmp_path / "router").coral.partition == chosen["partition"]

    tie = [{"name": n, "num_groups": g, "top_k_groups": 1, "partition": "frequency",
            "router": "", "recall_at_k": 0.5} for n, g in (("a", 16), ("b", 8))]
    assert choose(tie)["name"] == "b"  # equal recall: the smaller router
    assert choose(tie)["pinned_groups"] == 0  # rows written before pinned groups
    with pytest.raises(ValueError, match="not a whole number"):
        equal_share_settings([8, 10], 0.25)


def test_export_writes_the_pinned_groups_stage_2_chose_or_the_override(tiny, trained,
                                                                        tmp_path, capsys):
    """Stage 2 over the frequency partition measures every pinned candidate and
    router.pt keeps the chosen count, which `train export` writes into the drafter;
    `--pinned-groups N` overrides it and is checked like the drafter's config."""
    import shutil

    from coral_vllm.training.cli import main
    from coral_vllm.training.router_train import ROUTER_FILE, run_router_stage

    run = tmp_path / "run"
    shutil.copytree(trained["out"], run)
    report = run_router_stage(run, {"partition": "frequency", "router_epochs": 2})
    pinned = [q["pinned_groups"] for q in report["partitions"]["frequency"]["pinned"]]
    assert pinned == [1, 2, 3] and report["chosen"] == "frequency"
    chosen = report["selection"]["pinned_groups"]
    assert torch.load(run / ROUTER_FILE, weights_only=False)["pinned_groups"] == chosen
    dest = tmp_path / "d"
    assert main(["export", "--run", str(run), "--dest", str(dest)]) == 0
    assert read_checkpoint(dest).coral.pinned_groups == chosen
    assert main(["export", "--run", str(run), "--dest", str(dest), "--pinned-groups",
                 "3"]) == 0
    assert read_checkpoint(dest).coral.pinned_groups == 3
    for bad, words in ((["--pinned-groups", "4"], ["coral.pinned_groups", "< top_k_groups"]),
                       (["--pinned-groups", "1", "--selection", "static"], ["static"])):
        with pytest.raises(SystemExit):
            main(["export", "--run", str(run), "--dest", str(tmp_path / "bad"), *bad])
        err = capsys.readouterr().err
        assert all(w in err for w in words), err


def test_resume_continues_at_right_step(tiny, tmp_path):
    full = _cfg(tiny, tmp_path / "full", max_steps=8, feature_noise=0.2)
    train(full)
    part = _cfg(tiny, tmp_path / "part", max_steps=8, feature_noise=0.2)
    r1 = train(part, stop_at_step=5)
    assert r1["step"] == 5 and not r1["done"] and load_state(part.out)["step"] == 5
    # the plan is fixed at the start: a longer budget or another lr is refused, naming
    # the setting; a time limit (or where the data lies) may change
    for change in ({"max_steps": 16}, {"lr": 1e-3}):
        with pytest.raises(PlanChanged, match=f"started with {next(iter(change))}="):
            train(_cfg(tiny, tmp_path / "part", feature_noise=0.2,
                       **{"max_steps": 8, **change}))
    r2 = train(_cfg(tiny, tmp_path / "part", max_steps=8, feature_noise=0.2,
                    time_limit_min=60))
    assert r2["step"] == 8 and r2["done"]
    a, b = load_state(full.out), load_state(part.out)
    assert b["step"] == 8 and a["tokens_seen"] == b["tokens_seen"]
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6), k


def test_grad_accum_reads_the_micro_batches_two_ranks_would(tiny, tmp_path):
    """One process accumulating two micro-batches per step reads exactly the samples two
    ranks read with one each (so the two runs compute the same steps); and it trains."""
    from coral_vllm.training.schedule import Schedule

    cfg = _cfg(tiny, tmp_path / "acc", max_steps=3, grad_accum=2)
    train_t, _ = load_splits(tiny["data"], cfg.max_len)
    one = Schedule(train_t.lengths, cfg, world=1, rank=0).epoch(0)
    halves = [Schedule(train_t.lengths, TrainConfig.from_dict({**cfg.to_dict(),
                                                               "grad_accum": 1}),
                       world=2, rank=r).epoch(0) for r in (0, 1)]
    assert len(one) == len(halves[0]) == len(halves[1])
    for k, slots in enumerate(one):
        assert [list(s) for s in slots] == [list(halves[0][k][0]), list(halves[1][k][0])]
    res = train(cfg)
    assert res["done"] and np.isfinite(res["last"]["loss"])


def test_bad_settings_name_the_field(tiny, tmp_path):
    with pytest.raises(ValueError, match="feature_store='gpu': choose one of .*'online'"):
        _cfg(tiny, tmp_path, feature_store="gpu")
    with pytest.raises(ValueError, match="top_k_groups"):
        _cfg(tiny, tmp_path, top_k_groups=32)
    with pytest.raises(ValueError, match="batch_tokens"):
        _cfg(tiny, tmp_path, batch_tokens=0)


@pytest.mark.parametrize("fused", [None, [0, 1]])
def test_online_features_are_the_stores(tiny, fused):
    """The features the target computes for a micro-batch as it is trained on
    (feature_store="online") are those the store holds for its rows, pads zero, batch
    shapes unlike the store's; and the store's are each sample's features computed alone
    (the target reads right-padded rows without a padding mask)."""
    from coral_vllm.data.batches import Batch, epoch_batches
    from coral_vllm.data.feature_store import compute_features, features_of_rows
    from coral_vllm.data.target import target_features

    table, _ = load_splits(tiny["data"], 2048)
    model, cpu = tiny["model"], torch.device("cpu")
    store = compute_features(model, table, cpu, batch_tokens=256, fused_layers=fused)
    assert store.shape[1] == HIDDEN * (1 + len(fused or ())) and not store[-1].any()
    # float32 round-off at the largest feature (layer 1's residual stream reaches ~60):
    # the two sides run the target on batches of other shapes
    tol = {"rtol": 1e-5, "atol": 1e-6 * float(store.abs().max())}
    for idx in epoch_batches(table.lengths, 512, seed=1, epoch=0)[:4]:
        host = Batch.build(table, idx)  # 8 samples padded to 64, the store's 4 to their longest
        assert host.rows.shape[1] > table.lengths[idx].max()
        online = features_of_rows(model, table, host.rows.numpy(), cpu, fused)
        assert online.dtype == store.dtype == torch.float32
        torch.testing.assert_close(online, store[host.rows], **tol)
    for i in range(3):
        ids, _ = table.sample(i)
        alone = target_features(model, torch.from_numpy(ids)[None], fused_layers=fused)[0]
        a = int(table.starts[i])
        torch.testing.assert_close(store[a:a + len(ids)], alone, **tol)


@pytest.mark.parametrize("fused", ["", "0,1"])
def test_online_features_train_as_the_store_does(tiny, tmp_path, fused):
    """A run with feature_store="online" keeps the target and no training store (the
    other placements keep a store and free the target), and trains as a run with the
    store does: the same losses step by step, the same drafter, with or without fused
    target layers."""
    from coral_vllm.training.schedule import Schedule
    from coral_vllm.training.trainer import compute_split_features, start_run

    kw = dict(max_steps=4, grad_accum=2, feature_noise=0.2, fused_layers=fused,
              eval_heldout_samples=4)
    online = _cfg(tiny, tmp_path / "online", feature_store="online", **kw)
    train_t, held_t = load_splits(tiny["data"], online.max_len)
    for cfg in (online, _cfg(tiny, tmp_path / "store", **kw)):
        run = start_run(cfg, "cpu")
        feats = compute_split_features(run, tiny["model"], train_t, held_t,
                                       Schedule(train_t.lengths, cfg, 1, 0),
                                       cfg.fused_layer_ids(tiny["model"].config.to_dict()))
        assert (feats.store is None) == (feats.target is not None) == (cfg is online)
        assert feats.heldout.feats is not None
        train(cfg)
    runs = [tmp_path / "online", tmp_path / "store"]
    rows = [[json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            for out in runs]
    losses = [[r["loss"] for r in run_rows if "loss" in r] for run_rows in rows]
    assert len(losses[0]) == 4
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    a, b = (load_state(out)["model"] for out in runs)
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_cli_help_and_eagle_preset(tiny, tmp_path, capsys):
    from coral_vllm.training.cli import main
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--csra-weight" in capsys.readouterr().out
    rc = main(["train", "--target", tiny["target"], "--data", tiny["data"], "--out",
               str(tmp_path / "eagle"), "--preset", "eagle", "--max-steps", "3",
               "--batch-tokens", "128"])
    assert rc == 0
    state = load_state(tmp_path / "eagle")
    assert state["config"]["num_steps"] == 1 and state["config"]["serve_router"] is False


@pytest.mark.parametrize("fused", ["", "0,1"])
def test_two_layer_run_exports_and_reloads(tiny, tmp_path, fused):
    """`train --num-layers 2` trains both layers, `export` writes num_hidden_layers = 2
    and every layer's tensors, and the exported drafter reloads to the trained one;
    with `--fused-layers 0,1` it reads those target layers (EAGLE-3 layout, eagle3)."""
    from coral_vllm.format.drafter_config import FUSED_ARCHITECTURE, FUSED_LAYERS
    from coral_vllm.training.cli import main
    from coral_vllm.training.evaluate import load_drafter
    from coral_vllm.training.export import export
    from coral_vllm.data.target import target_features

    out = tmp_path / "deep"
    assert main(["train", "--target", tiny["target"], "--data", tiny["data"], "--out",
                 str(out), "--preset", "hass", "--num-layers", "2", "--max-steps", "3",
                 "--batch-tokens", "256", "--num-groups", "16", "--top-k-groups", "4",
                 "--lr", "3e-3", "--warmup-steps", "1", "--fused-layers", fused]) == 0
    state = load_state(out)
    assert state["config"]["num_layers"] == 2
    ckpt = read_checkpoint(export(out, tmp_path / "drafter", dtype="float32",
                                  checkpoint="latest"))
    assert ckpt.config["num_hidden_layers"] == 2
    assert ckpt.shapes["layers.1.input_layernorm.weight"] == (HIDDEN,)
    assert ("layers.0.input_layernorm.weight" in ckpt.shapes) == bool(fused)
    if fused:
        assert ckpt.config["architectures"] == [FUSED_ARCHITECTURE]
        assert ckpt.config[FUSED_LAYERS] == [0, 1]
        assert ckpt.shapes["fc.weight"] == (HIDDEN, 2 * HIDDEN)
        assert ckpt.shapes["norm.weight"] == (HIDDEN,)
    fresh = CoralDrafter(ckpt.config, 16)
    for k, v in state["model"].items():  # layer 1 moved away from its initial values
        if k.startswith("layers.1.") and k.endswith("proj.weight"):
            assert not torch.equal(v, fresh.state_dict()[k]), k
    drafter = load_drafter(ckpt.path, tiny["model"])
    assert drafter.num_layers == 2
    trained = CoralDrafter(state["target_config"], 16, num_layers=2,
                           fused_layers=[0, 1] if fused else None)
    trained.load_state_dict(state["model"], strict=False)
    trained.load_target_heads(tiny["model"])
    ids = torch.randint(0, VOCAB, (1, 9))
    feats = target_features(tiny["model"], ids, fused_layers=drafter.fused_layers)
    feats = feats[..., HIDDEN:] if fused else feats
    with torch.no_grad():
        assert torch.equal(drafter(ids, feats), trained.eval()(ids, feats))
    # the offline replay (`train eval`, `vllm-tau`) gives the drafter the features it reads
    from coral_vllm.training.evaluate import continuation_split, tau_of_drafters
    split = continuation_split(tiny["model"], tiny["prompts"][:4], 12, [])
    rows = tau_of_drafters(tiny["model"], {"d": drafter}, split, k=3)
    assert all(r["tau"] >= 1.0 and r["rounds"] > 0 for r in rows)


@pytest.mark.parametrize("layer", [0, 1])
def test_decoder_layer_matches_transformers_llama_layer(tiny, layer):
    """Our layer == transformers' LlamaDecoderLayer (RoPE theta, GQA, causal SDPA,
    RMSNorm, SiLU MLP), on positions that do not start at 0: layer 0 with
    input_layernorm = Identity (EAGLE), layer 1 with it."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    tcfg = json.loads((tiny["root"] / "target" / "config.json").read_text())
    tcfg["rope_parameters"] = {"rope_theta": 500.0, "rope_type": "default"}
    hf_cfg = LlamaConfig(**{k: v for k, v in tcfg.items() if k != "architectures"})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = LlamaDecoderLayer(hf_cfg, layer_idx=layer).eval()
    if layer == 0:
        ref.input_layernorm = torch.nn.Identity()
    with torch.no_grad():
        ref.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        if layer:
            ref.input_layernorm.weight.uniform_(0.5, 1.5)
    drafter = CoralDrafter(tcfg, num_groups=16, num_layers=2)
    drafter.layers[layer].load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, HIDDEN)
    pos = torch.arange(3, 10).expand(2, 7)
    cos_sin = LlamaRotaryEmbedding(hf_cfg)(x, pos)
    with torch.no_grad():
        want = ref(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        want = want[0] if isinstance(want, tuple) else want
        got, _ = drafter.layers[layer](x, pos)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_mixed_dtypes_and_router_on_exported_drafter(tiny, trained, tmp_path):
    """A bf16 target with a float32 drafter (or the reverse) meets at the fc boundary
    (`train eval` / `train router` on a GPU used to crash there), and stage 2 runs from
    an exported dense drafter (`train router --drafter`)."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.format.partition import contiguous_order, group_of_token
    from coral_vllm.training.evaluate import load_drafter, speculative_generate
    from coral_vllm.training.export import export
    from coral_vllm.training.router_train import collect, run_router_on_drafter

    dense = export(trained["out"], tmp_path / "dense", dense=True)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny["target"], dtype=torch.bfloat16).eval()
    prompt = tiny["prompts"][0]
    train_t, _ = load_splits(tiny["data"], 2048)
    for dtype in (None, torch.float32):  # None: the target's (bf16); float32: mixed
        drafter = load_drafter(dense, bf16, dtype=dtype)
        assert drafter.fc.weight.dtype == (dtype or torch.bfloat16)
        for use_router in (False, True):
            r = speculative_generate(bf16, drafter, prompt, k=3, max_new_tokens=8,
                                     use_router=use_router)
            assert len(r["tokens"]) == 8
        got = collect(drafter, bf16, train_t.subset(np.arange(2)), 2, 256, 10**6, "cpu",
                      {"contiguous": group_of_token(contiguous_order(VOCAB), VOCAB // 16)})
        assert got["h"].dtype == torch.float32 and len(got["h"]) > 0
        assert got["gprobs"]["contiguous"].shape == (len(got["h"]), 16)

    report = run_router_on_drafter(dense, tiny["target"], tiny["data"], tmp_path / "routed",
                                   {"num_groups": 16, "top_k_groups": 4, "router_epochs": 2},
                                   device="cpu", report_path=tmp_path / "report.json")
    ckpt = read_checkpoint(tmp_path / "routed")
    assert ckpt.coral.top_k_groups == 4 and ckpt.coral.partition == report["chosen"]
    assert set(report["partitions"]) == {"contiguous", "frequency", "cluster"}
    assert json.loads((tmp_path / "report.json").read_text())["chosen"] == report["chosen"]


def test_torchrun_two_ranks_equal_one_process_accumulating(tiny, tmp_path):
    """`torchrun --nproc-per-node 2 ... train` (DDP over gloo) ends where one process with
    --grad-accum 2 ends: same samples per step, same random draws, averaged gradients.
    A state written by one process resumes under two ranks to the same drafter."""
    import subprocess
    import sys

    args = ["train", "--target", tiny["target"], "--data", tiny["data"],
            "--preset", "coral", "--epochs", "100", "--max-steps", "6", "--batch-tokens", "512",
            "--lr", "3e-3", "--warmup-steps", "2", "--num-groups", "16",
            "--top-k-groups", "4", "--feature-noise", "0.2", "--log-every", "3"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "coral_vllm.cli", "train", *args,
                          "--out", str(tmp_path / "ddp"), "--grad-accum", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    from coral_vllm.training.cli import main
    assert main([*args, "--out", str(tmp_path / "one"), "--grad-accum", "2"]) == 0
    a, b = load_state(tmp_path / "ddp"), load_state(tmp_path / "one")
    assert a["step"] == b["step"] == 6 and a["tokens_seen"] == b["tokens_seen"]
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-5), k
    # the scaling table reads both runs (rows per process count, efficiency vs 1)
    from coral_vllm.bench.training import main as bench_main
    assert bench_main(["scaling", "--runs", f"1={tmp_path / 'one'}", f"2={tmp_path / 'ddp'}",
                       "--out", str(tmp_path / "scaling.json")]) == 0
    table = json.loads((tmp_path / "scaling.json").read_text())
    assert [r["gpus"] for r in table["rows"]] == [1, 2]
    assert table["rows"][0]["scaling_efficiency"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["heldout_tau"] >= 1.0 for r in table["rows"])
    # resume across world sizes: one process stops at step 3, two ranks finish the run,
    # to the drafter of the run that was never stopped; the number of micro-batches a
    # step is part of the plan
    assert main([*args, "--out", str(tmp_path / "mix"), "--grad-accum", "2",
                 "--stop-at-step", "3"]) == 3
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "mix"), "--grad-accum", "1"])
    mix = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "coral_vllm.cli", "train", *args,
                          "--out", str(tmp_path / "mix"), "--grad-accum", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert mix.returncode == 0, mix.stderr[-3000:]
    c = load_state(tmp_path / "mix")
    assert c["step"] == 6 and c["tokens_seen"] == b["tokens_seen"]
    for k, v in b["model"].items():
        assert torch.allclose(v.float(), c["model"][k].float(), atol=1e-5), k


def test_second_phase_starts_from_a_run_with_topk_distillation(tiny, trained, tmp_path):
    """HASS's phase 2: a new run from another run's best drafter (fresh optimizer) with
    the top-K distillation term on."""
    out = tmp_path / "phase2"
    train(_cfg(tiny, out, init_from=str(trained["out"]), topk_weight=1.0, max_steps=2,
               lr=1e-12, router_lr=1e-12, warmup_steps=1))
    src, got = load_state(trained["out"], "best.pt")["model"], load_state(out)["model"]
    for k in ("fc.weight", "layers.0.mlp.down_proj.weight", "router.w2.weight",
              "partition.token_order"):
        assert torch.allclose(got[k].float(), src[k].float(), atol=1e-6), k
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["topk_ce1"] > 0 for r in rows if "loss" in r)
    with pytest.raises(FileNotFoundError, match="init_from"):
        train(_cfg(tiny, tmp_path / "bad", init_from=str(tmp_path / "nowhere"), max_steps=1))
    # the ablation table names what the second run changed (not where it started from)
    from coral_vllm.bench.training import main as bench_main
    assert bench_main(["ablation", "--runs", f"base={trained['out']}", f"topk={out}",
                       "--out", str(tmp_path / "ablation.json")]) == 0
    table = json.loads((tmp_path / "ablation.json").read_text())
    base, topk = table["rows"]
    assert table["baseline"] == "base" and base["changed"] == {} and base["ratio_to_baseline"] == 1
    assert topk["changed"] == {"topk_weight": 1.0, "max_steps": 2, "lr": 1e-12,
                               "router_lr": 1e-12, "warmup_steps": 1}
    assert topk["heldout_tau"] >= 1.0 and topk["tokens_at_best"] <= topk["train_tokens"]
