"""Stage 2 over several group counts at equal active rows: the (num_groups, top_k_groups)
a drafter serves with, chosen by held-out router recall.

Why equal active rows: the head's work per drafted token is its active rows (k x G, G
the group size), so settings are compared at one cost, the share of the vocabulary the
run was trained to score (`--active-share`, default the run's own k / num_groups).
Smaller groups let the router spend those rows more precisely but ask it to pick among
more classes from the same data; which wins for a 152k-row head is measured, not assumed.
The drafter runs over the data once for all settings (`fit_routers`).

What chooses: recall@k on the run's held-out split (the data's held-out shards, or the
tail `router_holdout` keeps out of training), the same split for every setting; ties go
to fewer groups (a smaller router), then to fewer pinned groups. Test sets (MT-bench,
HumanEval, GSM8K) choose nothing. Within a setting stage 2 has chosen the partition and
the pinned groups (`router_train.choose_selection`: under the frequency partition the
first p groups always active, p in `pinned_candidates`), so the sweep's choice is
(group count, partition, pinned groups).
Each setting is written to RUN/router_sweep/NAME/ (the run's own router.pt is left as
it is) and the table to RUN/router_sweep.json, last, so a sweep cut short chooses nothing;
`train export --router-sweep` serves the chosen one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from coral_vllm.data.target import pick_device
from coral_vllm.training.router_train import (chosen_selection, fit_routers, load_run,
                                               save_router)
from coral_vllm.training.run_dir import ROUTER_FILE, SWEEP_DIR, SWEEP_FILE


def equal_share_settings(group_counts: Sequence[int], share: float) -> list[tuple[int, int]]:
    """(num_groups, top_k_groups = share x num_groups) per group count. A count whose k
    is not a whole number is refused: rounding it would compare at other rows."""
    settings = []
    for n in group_counts:
        k = share * n
        if abs(k - round(k)) > 1e-6 or round(k) < 1:
            raise ValueError(f"{n} groups x active share {share:g} = {k:g} active groups, "
                             "not a whole number: pick group counts that the share divides")
        settings.append((n, round(k)))
    return settings


def setting_name(num_groups: int, top_k_groups: int) -> str:
    return f"g{num_groups}-k{top_k_groups}"


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of best held-out recall@k (its chosen partition's and pinned groups'), ties
    to fewer groups, then fewer pinned groups; with the reason, next to the runner-up.
    Rows written before pinned groups pin none."""
    ranked = sorted(rows, key=lambda r: (-r["recall_at_k"], r["num_groups"],
                                         r.get("pinned_groups", 0)))
    best = ranked[0]
    pinned = best.get("pinned_groups", 0)
    why = (f"highest held-out recall@k of {len(rows)} settings at equal active rows: "
           f"{best['recall_at_k']:.4f} ({best['name']}, {best['partition']} partition, "
           f"{pinned} pinned groups)")
    if len(ranked) > 1:
        why += f"; next {ranked[1]['recall_at_k']:.4f} ({ranked[1]['name']})"
    return {k: best[k] for k in ("name", "num_groups", "top_k_groups", "partition",
                                 "router")} | {"pinned_groups": pinned, "why": why}


def run_router_sweep(out: str | Path, group_counts: Sequence[int],
                     share: float | None = None,
                     cfg_overrides: dict[str, Any] | None = None,
                     device: str | None = None) -> dict[str, Any]:
    """`train router --out RUN --sweep-groups N ...`: one stage 2 per group count at the
    active share, each into RUN/router_sweep/NAME/; returns and writes the table."""
    out, dev = Path(out), pick_device(device)
    cfg, target, drafter, checkpoint = load_run(out, cfg_overrides, dev)
    share = share if share is not None else cfg.top_k_groups / cfg.num_groups
    fits = fit_routers(drafter, target, cfg.data, cfg, dev,
                       equal_share_settings(group_counts, share))
    rows = []
    for fit in fits:
        name = setting_name(fit.coral.num_groups, fit.coral.top_k_groups)
        fit.report["checkpoint"] = checkpoint
        save_router(fit, cfg, out / SWEEP_DIR / name)
        rep = fit.report
        rows.append({"name": name, "router": f"{SWEEP_DIR}/{name}/{ROUTER_FILE}",
                     **{k: rep[k] for k in ("num_groups", "top_k_groups", "group_size",
                                            "active_rows", "random_recall")},
                     **rep["partitions"][fit.chosen], **chosen_selection(rep),
                     "partitions": rep["partitions"], "static_head": rep["static_head"]})
    first = fits[0].report
    table = {"run": str(out), "data": cfg.data,
             "checkpoint": checkpoint,
             "active_share": share, "label": cfg.router_label, "num_steps": cfg.num_steps,
             "split": {k: first[k] for k in ("train_samples", "heldout_samples",
                                             "train_tokens", "heldout_tokens")},
             "chosen_by": "recall_at_k on the held-out split", "settings": rows,
             "chosen": choose(rows)}
    tmp = out / f"{SWEEP_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    os.replace(tmp, out / SWEEP_FILE)
    return table
