"""A CORAL drafter's static-vocabulary twin: the baseline at the same trained layers.

`coral-vllm to-static` turns a drafter with a frequency partition (the shipped one, or
any `train export`) into `selection: "static"`: same layers (any depth, fused or not)
and partition, no router, always its first `top_k_groups` groups, i.e. the most
frequent tokens (EAGLE-3 / FR-Spec's reduced draft vocabulary). At its own
`top_k_groups` it scores exactly as many rows as the routed drafter, the comparison at equal active rows; `rows` sizes it
otherwise (e.g. 32768, EAGLE-3's). A run directory exports the same with `train export
--selection static`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from safetensors.torch import load_file

from coral_vllm.format.checkpoint import WEIGHTS_FILE, read_checkpoint, save_checkpoint


def write_static_checkpoint(src: str | os.PathLike[str], dest: str | os.PathLike[str],
                            rows: int | None = None) -> Path:
    """Writes the static twin of drafter `src` to `dest`; CoralConfigError (naming the
    fix) if `src`'s partition is not frequency-ranked."""
    ckpt = read_checkpoint(src)
    # all of its groups fixed: a routed source's pinned groups are among them
    coral = dataclasses.replace(ckpt.coral, selection="static", pinned_groups=0)
    if rows is not None:
        coral = coral.with_active_rows(rows)
    tensors = {k: v for k, v in load_file(str(ckpt.path / WEIGHTS_FILE)).items()
               if not k.startswith("router.")}
    return save_checkpoint(dest, dict(ckpt.config, coral=coral.to_dict()), tensors)
