"""A target's input embedding and LM head, read straight from its safetensors files.

No model is built: a cluster partition needs only the LM-head rows, and an exported
drafter that carries its own heads copies them.
"""

from __future__ import annotations

from pathlib import Path

import torch

EMBED = "embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def read_target_heads(target_dir: str | Path) -> dict[str, torch.Tensor]:
    """{"embed_tokens.weight", "lm_head.weight"} of an HF model directory (any number of
    shards). A tied head, absent from the files, is a copy of the embedding."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(target_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k.endswith(EMBED):
                    out[EMBED] = sf.get_tensor(k)
                elif k == LM_HEAD:
                    out[LM_HEAD] = sf.get_tensor(k)
    if LM_HEAD not in out and EMBED in out:
        out[LM_HEAD] = out[EMBED].clone()
    return out
