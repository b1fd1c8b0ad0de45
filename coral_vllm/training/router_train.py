"""Stage 2: freeze the drafter, partition the vocabulary, train the router.

1. Run the trained drafter (all n steps, as it drafts; the checkpoint `train export`
   serves by default, best.pt, so the router fits the drafter it ships with) over the
   data and keep, per response position, its output feature h, the target's top-1 next
   token and (for the KL label) the target's probabilities summed per group.
2. For each partition (contiguous, frequency from the data's token counts, cluster of
   LM-head rows) train a fresh router on the training split:
     ce: cross-entropy to the group holding the target's top-1 token   [default]
     kl: KL(group-summed target probs || softmax(router(h)))
3. Report on the held-out split recall@k = P(target top-1 lies in the k chosen groups)
   and dense-agreement = P(the drafter's dense top-1 lies in them). Under the frequency
   partition also with p pinned groups (`pinned_candidates`: the first p groups always
   active, the router's top k - p of the rest; `format.config.PINNED_GROUPS` says why):
   the same router, only its selection masks the pinned groups out of its top k. Keep
   the (partition, pinned) of best recall, ties to fewer pinned groups (the plain router
   unless pinning measurably helps), then to the earlier partition (or the partition
   asked for) in `out/router.pt`.
4. Report the same for the static drafter at equal rows (`static_head`: always the first
   k groups of the frequency partition, what `train export --selection static` serves),
   and keep that partition in `router.pt` too, so the exported static drafter is the one
   the report measured.
Steps 2-4 run per (num_groups, top_k_groups) setting over the features of one step 1;
`router_sweep` compares several at equal active rows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from coral_vllm.format.partition import build_token_order, frequency_order, group_of_token
from coral_vllm.format.config import PARTITION_STRATEGIES, CoralConfig
from coral_vllm.head.router import Router, top_groups
from coral_vllm.training.config import TrainConfig
from coral_vllm.data.batches import Batch, TokenTable, epoch_batches
from coral_vllm.data.shards import MANIFEST, load_splits, train_token_counts
from coral_vllm.data.feature_store import compute_features
from coral_vllm.training.model import CoralDrafter, build_drafter
from coral_vllm.data.target import load_target, pick_device, split_features
from coral_vllm.training.multi_step import multi_step_forward
from coral_vllm.training.run_dir import (BEST_FILE, ROUTER_FILE, ROUTER_REPORT_FILE,
                                         STATE_FILE, atomic_save, load_state)


@torch.no_grad()
def collect(drafter: CoralDrafter, target_model, table: TokenTable, num_steps: int,
            batch_tokens: int, max_tokens: int, device,
            groups: dict[str, torch.Tensor] | None = None,
            context_alignment: bool = True) -> dict[str, Any]:
    """Drafter features and labels at response positions, over all drafting steps, for
    the first samples of `table` that give `max_tokens` rows, with each row's sample
    ("sample": a position's rows at every step share its label, so a validation split
    must take whole samples). `groups` (name -> group id of every token) adds the
    target's probabilities summed per group under each, which only the KL label needs:
    [rows, num_groups] per grouping is the one part of this that grows with the
    groupings compared."""
    take = int(np.searchsorted(np.cumsum(table.loss_tokens()) * num_steps, max_tokens) + 1)
    table = table.subset(np.arange(min(len(table), take)))
    store = compute_features(target_model, table, device, fused_layers=drafter.fused_layers)
    feats, top1, dense1, samples = [], [], [], []
    groups = {k: (g.to(device), int(g.max()) + 1) for k, g in (groups or {}).items()}
    gprobs: dict[str, list[torch.Tensor]] = {k: [] for k in groups}
    head = drafter.lm_head.weight
    for idx in epoch_batches(table.lengths, batch_tokens, seed=0, epoch=0):
        host = Batch.build(table, idx)
        batch = host.to(device)
        sample = torch.from_numpy(idx)[host.loss_pos // host.ids_in.shape[1]]  # host side
        f = store[batch.rows.to(store.device)].to(device, drafter.fc.weight.dtype)
        last, f = split_features(f, drafter.hidden_size)
        t_logits = (last[:, 1:].flatten(0, 1)[batch.loss_pos].float() @ head.float().T)
        t_probs = t_logits.softmax(-1)
        for out in multi_step_forward(drafter, batch.ids_in, f[:, :-1], num_steps,
                                      context_alignment):
            h = out.flatten(0, 1)[batch.loss_pos].float()
            feats.append(h.cpu())
            top1.append(t_logits.argmax(-1).cpu())
            dense1.append((h @ head.float().T).argmax(-1).cpu())
            samples.append(sample)
            for k, (g, n) in groups.items():
                gp = t_probs.new_zeros(len(h), n).index_add_(1, g, t_probs)
                gprobs[k].append(gp.cpu())
    return {"h": torch.cat(feats)[:max_tokens], "top1": torch.cat(top1)[:max_tokens],
            "dense1": torch.cat(dense1)[:max_tokens],
            "sample": torch.cat(samples)[:max_tokens],
            "gprobs": {k: torch.cat(v)[:max_tokens] for k, v in gprobs.items()}}


def recall_at_k(logits: torch.Tensor, labels: torch.Tensor, k: int, pinned: int = 0) -> float:
    """Share of rows whose label group is among the k groups the drafter would score
    (`top_groups`: the router's picks beside `pinned` always-active groups)."""
    chosen = top_groups(logits, k, pinned)
    return (chosen == labels.unsqueeze(1)).any(1).float().mean().item()


def pinned_candidates(k: int) -> list[int]:
    """The pinned-group counts stage 2 measures under the frequency partition: 0, k/4,
    k/2 and 3k/4 (rounded half up), distinct and below k (the router keeps a pick)."""
    return sorted({(k * q + 2) // 4 for q in range(4)} - {k})


def choose_selection(partitions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The (partition, pinned_groups) of best held-out recall@k among the measured ones
    (a partition's own recall is pinned 0): ties go to fewer pinned groups, then to the
    earlier partition; with its recall and dense agreement."""
    candidates = [{"partition": s, "pinned_groups": 0, "recall_at_k": r["recall_at_k"],
                   "dense_agreement": r["dense_agreement"]} for s, r in partitions.items()]
    candidates += [{"partition": s, **p} for s, r in partitions.items()
                   for p in r.get("pinned", ())]
    return max(candidates, key=lambda c: (c["recall_at_k"], -c["pinned_groups"]))


def chosen_selection(report: dict[str, Any]) -> dict[str, Any]:
    """What a router report chose ({"partition", "pinned_groups", "recall_at_k",
    "dense_agreement"}); a report written before pinned groups chose pinned 0."""
    if "selection" in report:
        return report["selection"]
    part = report["partitions"][report["chosen"]]
    return {"partition": report["chosen"], "pinned_groups": 0,
            "recall_at_k": part["recall_at_k"], "dense_agreement": part["dense_agreement"]}


def validation_rows(samples: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """Mask of the rows of a random `share` of the distinct `samples` (each row's
    sample id): whole samples, every row of each, so that no validation position has a
    near-twin (the same position at another drafting step, same label) in the fit."""
    ids = samples.unique()
    pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return torch.isin(samples, ids[pick[:int(len(ids) * share)]])


def train_router(h: torch.Tensor, labels: torch.Tensor, gprobs: torch.Tensor | None,
                 num_groups: int, k: int, *, samples: torch.Tensor, act: str = "silu",
                 label: str = "ce", epochs: int = 5, lr: float = 1e-3,
                 batch_size: int = 1024, val_share: float = 0.1, seed: int = 0,
                 device=None) -> tuple[Router, dict[str, Any]]:
    """Fits Router(h) -> group logits. `label`: 'ce' (labels) or 'kl' (gprobs);
    `samples`: each row's sample id.

    It starts at the group prior alone (output weights zero, bias the log prior), which
    ranks the groups as a static head does, and keeps the epoch (0 = that start) of best
    recall@k on validation rows it does not train on: those of `val_share` of the
    samples (`validation_rows`). A router of d x d + d x N weights can memorise a few
    hundred thousand rows and lose held-out recall as it does, so the last epoch is not
    the one to keep; the stage's own held-out split, which it reports, stays unseen.
    Validation by samples, not rows: a slice of the last rows (session 7's) holds the
    later drafting steps of positions whose earlier steps the fit trains on, so it
    rewards memorising (docs/training.md, Stage 2). Returns the router and the fit's
    record: the validation rows and samples, the recall per epoch and the epoch kept."""
    torch.manual_seed(seed)
    device = device or h.device
    val = validation_rows(samples, val_share, seed)
    fit_rows, val_rows = (~val).nonzero().squeeze(1), val.nonzero().squeeze(1)
    router = Router(h.shape[1], num_groups, act=act).to(device)
    with torch.no_grad():
        prior = (gprobs[fit_rows].float().mean(0) if label == "kl" and gprobs is not None
                 else torch.bincount(labels[fit_rows], minlength=num_groups).float()
                 / max(1, len(fit_rows)))
        router.w2.weight.zero_()
        router.w2.bias.copy_(prior.clamp_min(1e-6).log().to(device))

    def val_recall() -> float:
        with torch.no_grad():
            return recall_at_k(router(h[val_rows].to(device)).cpu(), labels[val_rows], k)

    opt = torch.optim.AdamW(router.parameters(), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    curve: list[float] = []
    kept, kept_state = epochs, None
    for epoch in range(epochs + 1):  # epoch 0: the prior alone, measured before any step
        for idx in fit_rows[torch.randperm(len(fit_rows), generator=g)].split(batch_size) \
                if epoch else ():
            logits = router(h[idx].to(device))
            if label == "kl":
                loss = F.kl_div(logits.log_softmax(-1), gprobs[idx].to(device),
                                reduction="batchmean")
            else:
                loss = F.cross_entropy(logits, labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if len(val_rows):
            curve.append(val_recall())
            if curve[-1] > max(curve[:-1], default=-1.0):
                kept, kept_state = epoch, copy.deepcopy(router.state_dict())
    if kept_state is not None:
        router.load_state_dict(kept_state)
    return router.eval(), {"val_rows": len(val_rows),
                           "val_samples": int(samples[val_rows].unique().numel()),
                           "val_recall": [round(r, 4) for r in curve], "epoch_kept": kept}


@dataclasses.dataclass
class RouterFit:
    """Stage 2 at one (num_groups, top_k_groups): what it measured on the held-out split,
    the partitions it tried (with the frequency one a static head serves, fitted or
    not) and the router fitted on each."""
    coral: CoralConfig
    report: dict[str, Any]
    partitions: dict[str, torch.Tensor]
    routers: dict[str, Router]

    @property
    def chosen(self) -> str:
        return self.report["chosen"]

    @property
    def pinned_groups(self) -> int:
        return self.report["selection"]["pinned_groups"]


def fit_routers(drafter: CoralDrafter, target, data_dir: str | Path, cfg: TrainConfig, dev,
                settings: Sequence[tuple[int, int]] = ()) -> list[RouterFit]:
    """Partitions + one router each on the frozen drafter, per (num_groups, top_k_groups)
    of `settings` (default: the config's one).

    The drafter runs over the data once for every setting: its features and the
    target's top-1 do not depend on the grouping, so a sweep costs router fits, not
    drafter passes. Recall@k is measured on the held-out split, and the frequency
    partition counts tokens of the training split only.
    """
    vocab, d = drafter.vocab_size, drafter.hidden_size
    corals = [CoralConfig.for_vocab(vocab, d, n, k)
              for n, k in settings or [(cfg.num_groups, cfg.top_k_groups)]]
    strategies = PARTITION_STRATEGIES if cfg.partition == "auto" else (cfg.partition,)
    train_t, held_t = load_splits(data_dir, cfg.max_len, cfg.router_holdout)
    counts = train_token_counts(train_t, vocab)  # not the held-out split's
    lm_head = drafter.lm_head.weight.detach().float().cpu()
    partitions = [{s: build_token_order(s, vocab, c.num_groups, token_counts=counts,
                                        lm_head=lm_head) for s in strategies} for c in corals]
    groups = [{s: group_of_token(order, c.group_size) for s, order in parts.items()}
              for c, parts in zip(corals, partitions)]
    kl_groups = {f"{i}/{s}": g for i, grps in enumerate(groups) for s, g in grps.items()}
    kw = dict(num_steps=cfg.num_steps, batch_tokens=cfg.batch_tokens, device=dev,
              groups=kl_groups if cfg.router_label == "kl" else None,
              context_alignment=cfg.context_alignment)
    tr = collect(drafter, target, train_t, max_tokens=cfg.router_max_tokens, **kw)
    ho = collect(drafter, target, held_t, max_tokens=cfg.router_max_tokens, **kw)
    fits = []
    for i, (coral, parts, grps) in enumerate(zip(corals, partitions, groups)):
        n, k = coral.num_groups, coral.top_k_groups
        report: dict[str, Any] = {"top_k_groups": k, "num_groups": n,
                                  "group_size": coral.group_size,
                                  "active_rows": coral.active_rows,
                                  "label": cfg.router_label, "num_steps": cfg.num_steps,
                                  "train_samples": len(train_t),
                                  "heldout_samples": len(held_t),
                                  "train_tokens": len(tr["h"]), "heldout_tokens": len(ho["h"]),
                                  "random_recall": k / n, "partitions": {}}
        routers = {}
        for s, grp in grps.items():
            router, fit = train_router(tr["h"], grp[tr["top1"]], tr["gprobs"].get(f"{i}/{s}"),
                                       n, k, samples=tr["sample"], act=cfg.router_act,
                                       label=cfg.router_label,
                                       epochs=cfg.router_epochs, lr=cfg.router_lr,
                                       batch_size=cfg.router_batch_size, seed=cfg.seed,
                                       device=dev)
            with torch.no_grad():
                logits = router(ho["h"].to(dev)).cpu()
            routers[s] = router
            report["partitions"][s] = {
                **_heldout_recall(logits, grp, ho, k, 0),
                # the best a context-free router could do: always the k most frequent groups
                "static_recall": _static_recall(grp[tr["top1"]], grp[ho["top1"]], k, n),
                "fit": fit}
            if s == "frequency":  # its first groups are the most frequent tokens
                report["partitions"][s]["pinned"] = [
                    {"pinned_groups": p, **_heldout_recall(logits, grp, ho, k, p)}
                    for p in pinned_candidates(k) if p]
        report["selection"] = choose_selection(report["partitions"])
        report["chosen"] = report["selection"]["partition"]
        parts.setdefault("frequency", frequency_order(counts))
        report["static_head"] = static_head_recall(parts["frequency"], coral, ho)
        fits.append(RouterFit(coral, report, parts, routers))
    return fits


def _heldout_recall(logits: torch.Tensor, group: torch.Tensor, held: dict[str, Any],
                    k: int, pinned: int) -> dict[str, float]:
    """Held-out recall@k and dense agreement of router `logits` with `pinned` groups."""
    return {"recall_at_k": recall_at_k(logits, group[held["top1"]], k, pinned),
            "dense_agreement": recall_at_k(logits, group[held["dense1"]], k, pinned)}


def static_head_recall(order: torch.Tensor, coral: CoralConfig,
                       held: dict[str, Any]) -> dict[str, Any]:
    """Held-out recall of a static drafter with this grouping: its active set is always
    the first `top_k_groups` groups of the frequency partition `order`."""
    active = group_of_token(order, coral.group_size) < coral.top_k_groups
    return {"partition": "frequency", "top_k_groups": coral.top_k_groups,
            "rows": coral.active_rows,
            "recall_at_k": active[held["top1"]].float().mean().item(),
            "dense_agreement": active[held["dense1"]].float().mean().item()}


def load_run(out: str | Path, cfg_overrides: dict[str, Any] | None, dev
             ) -> tuple[TrainConfig, Any, CoralDrafter, dict[str, Any]]:
    """A finished run's config (with the overrides), target and frozen drafter, and which
    checkpoint that is ({"file", "step"}): the one `train export` serves by default
    (best.pt, else the latest state), so that stage 2 fits and measures its router on the
    features of the drafter it ships with."""
    name = BEST_FILE if (Path(out) / BEST_FILE).is_file() else STATE_FILE
    ckpt = load_state(out, name)
    if ckpt is None:
        raise FileNotFoundError(f"{out}: no stage-1 state; run `train` first.")
    run_cfg = TrainConfig.from_dict(ckpt["config"])  # the drafter as it was trained
    cfg = TrainConfig.from_dict({**ckpt["config"], **(cfg_overrides or {})})
    target, _, _ = load_target(cfg.target, dev)
    tcfg = ckpt["target_config"]
    drafter = build_drafter(tcfg, run_cfg.num_groups, run_cfg.router_act, ckpt["model"],
                            target, dev, None, run_cfg.num_layers,
                            run_cfg.fused_layer_ids(tcfg))
    return cfg, target, drafter, {"file": name, "step": ckpt["step"]}


def save_router(fit: RouterFit, cfg: TrainConfig, dest: Path) -> None:
    """`dest`/router.pt (what `train export` serves: the chosen partition, pinned groups
    and router, and the frequency partition of the static head) and
    `dest`/router_report.json."""
    best = fit.chosen
    atomic_save({"partition": best, "token_order": fit.partitions[best],
                 "router": {k: v.cpu() for k, v in fit.routers[best].state_dict().items()},
                 "num_groups": fit.coral.num_groups, "top_k_groups": fit.coral.top_k_groups,
                 "pinned_groups": fit.pinned_groups,
                 "router_act": cfg.router_act, "frequency_order": fit.partitions["frequency"],
                 "report": fit.report}, dest / ROUTER_FILE)
    (dest / ROUTER_REPORT_FILE).write_text(json.dumps(fit.report, indent=2) + "\n")


def run_router_stage(out: str | Path, cfg_overrides: dict[str, Any] | None = None,
                     device: str | None = None) -> dict[str, Any]:
    """The `train router --out RUN` command; writes out/router.pt and out/router_report.json.
    The router is fitted from scratch, so --num-groups / --top-k-groups may differ from
    the ones stage 1 trained with (its online router is not used)."""
    dev = pick_device(device)
    cfg, target, drafter, checkpoint = load_run(out, cfg_overrides, dev)
    fit, = fit_routers(drafter, target, cfg.data, cfg, dev)
    fit.report["checkpoint"] = checkpoint
    save_router(fit, cfg, Path(out))
    return fit.report


def run_router_on_drafter(drafter_dir: str | Path, target_path: str | Path,
                          data_dir: str | Path, dest: str | Path,
                          cfg_overrides: dict[str, Any] | None = None,
                          device: str | None = None,
                          report_path: str | Path | None = None) -> dict[str, Any]:
    """`train router --drafter DIR --target T --data D --dest OUT`: stage 2 starting from an
    EXPORTED drafter (no run directory). The drafter stays frozen; `dest` is the same
    checkpoint with the chosen partition and pinned groups, the trained router and
    top_k_groups set, in the source checkpoint's dtype. num_steps defaults to the
    drafter's training steps."""
    from safetensors.torch import load_file

    from coral_vllm.format.checkpoint import WEIGHTS_FILE, read_checkpoint, save_checkpoint
    from coral_vllm.training.evaluate import load_drafter

    dev = pick_device(device)
    ckpt = read_checkpoint(drafter_dir)
    src_cfg = json.loads((Path(drafter_dir) / "config.json").read_text())
    steps = (src_cfg.get("coral_training") or {}).get("num_steps", 1)
    over = {"num_steps": steps, "router_act": ckpt.coral.router_act, **(cfg_overrides or {}),
            "target": str(target_path), "data": str(data_dir)}
    cfg = TrainConfig.from_dict(over)
    if cfg.num_groups != ckpt.coral.num_groups:
        raise ValueError(f"--num-groups {cfg.num_groups} != the drafter's "
                         f"{ckpt.coral.num_groups} (its router shape)")
    target, _, _ = load_target(target_path, dev)
    drafter = load_drafter(drafter_dir, target, dev)
    fit, = fit_routers(drafter, target, data_dir, cfg, dev)
    report, partitions, routers, best = fit.report, fit.partitions, fit.routers, fit.chosen
    report.update(drafter=str(drafter_dir), data=str(data_dir), dest=str(dest))
    try:
        report["data_backend"] = json.loads((Path(data_dir) / MANIFEST).read_text()).get(
            "backend")
    except (OSError, ValueError):
        pass
    tensors = load_file(str(Path(drafter_dir) / WEIGHTS_FILE))
    dtype = tensors["fc.weight"].dtype
    tensors.update({f"router.{k}": v.detach().to("cpu", dtype)
                    for k, v in routers[best].state_dict().items()})
    tensors["partition.token_order"] = partitions[best].to(torch.int64).cpu()
    coral = dict(src_cfg["coral"], partition=best, top_k_groups=cfg.top_k_groups,
                 selection="router", pinned_groups=fit.pinned_groups, trained=True)
    config = dict(src_cfg, coral=coral)
    config["coral_training"] = dict(src_cfg.get("coral_training") or {}, router_stage=True,
                                    router_report={"chosen": best,
                                                   "selection": report["selection"],
                                                   "partitions": report["partitions"]})
    save_checkpoint(dest, config, tensors)
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _static_recall(train_labels: torch.Tensor, held_labels: torch.Tensor, k: int,
                   num_groups: int) -> float:
    top = torch.bincount(train_labels, minlength=num_groups).topk(k).indices
    return torch.isin(held_labels, top).float().mean().item()
