"""The CORAL drafter checkpoint: write it, read it, and check it against its target.

A drafter directory holds
- `config.json`: a Llama config of `num_hidden_layers` (N, default 1) layers sized from
  the target (`coral_vllm.format.drafter_config`), architecture
  `EagleCoralLlamaForCausalLM`, its `embed_scale`, and a `"coral"` section
  (:class:`CoralConfig`);
- `model.safetensors` with these tensors (EAGLE naming, which vLLM's EAGLE loader maps):
    fc.weight                                [d, 2d]   over [token embedding, target feature]
    layers.i.self_attn.{q,k,v,o}_proj.weight           Llama attention, i = 0..N-1
    layers.i.mlp.{gate,up,down}_proj.weight            Llama MLP
    layers.i.post_attention_layernorm.weight [d]
    layers.i.input_layernorm.weight          [d]       i >= 1 only (layer 0 has no input norm)
    router.w1.weight [d, d], router.w1.bias [d], router.w2.weight [N, d], router.w2.bias [N]
                                             (not needed, and ignored, with "selection": "static")
    partition.token_order                    [V] int64, a permutation of the vocabulary
    lm_head.weight, embed_tokens.weight      [V, d], optional: shared with the target if absent
  A drafter over fused target layers (architecture `Eagle3CoralLlamaForCausalLM`, its
  k layer ids, strictly increasing, in `eagle_aux_hidden_state_layer_ids` and k in
  `num_aux_hidden_states`, served through vLLM's eagle3 path)
  has EAGLE-3's layout instead: fc.weight [d, k*d] over the fused layers, layer 0's
  q/k/v over [2d] with input_layernorm (embedding) and hidden_norm (feature), and a
  final norm.weight [d].

Everything here is checked before an engine starts, from the safetensors header, so a
drafter that does not fit its target fails with the field and the fix, not deep inside a
worker.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from coral_vllm.format.config import CoralConfig, CoralConfigError
from coral_vllm.format.drafter_config import (EMBED_SCALE, check_fused_layers, embed_scale,
                                              fold_embed_scale, fused_layers,
                                              target_embed_scale)
from coral_vllm.format.partition import validate_token_order

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIONAL_TENSORS = ("lm_head.weight", "embed_tokens.weight")
LAYER_PREFIXES = ("fc.", "layers.", "norm.")  # the drafter's layers: vLLM's EAGLE loaders
OWN_PREFIXES = ("router.", "partition.")      # CORAL's own: vLLM's loaders never see them
INDEX_TENSORS = ("partition.token_order",)  # integer; every other tensor is a weight
WEIGHT_DTYPES = ("F32", "F16", "BF16")       # safetensors' names
INDEX_DTYPES = ("I64", "I32")
_REEXPORT = ("re-export the drafter (`coral-vllm train export`, `coral-vllm init-drafter`) "
             "or copy it again")
EAGLE_ARCHITECTURE = "LlamaForCausalLM"  # vLLM's method "eagle" maps it to EagleLlamaForCausalLM

def num_layers(config: dict[str, Any]) -> int:
    """The drafter's depth, `num_hidden_layers`, checked."""
    n = config.get("num_hidden_layers")
    if not (isinstance(n, int) and n >= 1):
        raise CoralConfigError(
            f'config.json "num_hidden_layers" is {n!r}; it must be the drafter\'s number of '
            "decoder layers, a positive integer (1 for a standard EAGLE drafter): "
            f"{_REEXPORT}.")
    return n


def layer_shapes(config: dict[str, Any], i: int, fused: bool = False
                 ) -> dict[str, tuple[int, ...]]:
    """Shapes of decoder layer i's tensors. vLLM's EAGLE drafter builds layer 0 without
    input_layernorm (`llama_eagle.py`: `disable_input_layernorm = i == 0`), later
    layers with it. Its EAGLE-3 drafter (`fused`, `llama_eagle3.py`) gives layer 0 an
    input_layernorm for the embedding, a hidden_norm for the feature, and attention over
    their concatenation [2d]."""
    d = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    hd = config.get("head_dim") or d // heads
    inter = config["intermediate_size"]
    p = f"layers.{i}."
    d_in = 2 * d if fused and i == 0 else d
    shapes = {
        p + "self_attn.q_proj.weight": (heads * hd, d_in),
        p + "self_attn.k_proj.weight": (kv * hd, d_in),
        p + "self_attn.v_proj.weight": (kv * hd, d_in),
        p + "self_attn.o_proj.weight": (d, heads * hd),
        p + "mlp.gate_proj.weight": (inter, d),
        p + "mlp.up_proj.weight": (inter, d),
        p + "mlp.down_proj.weight": (d, inter),
        p + "post_attention_layernorm.weight": (d,),
    }
    if i > 0 or fused:
        shapes[p + "input_layernorm.weight"] = (d,)
    if i == 0 and fused:
        shapes[p + "hidden_norm.weight"] = (d,)
    return shapes


def expected_shapes(config: dict[str, Any], coral: CoralConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every required tensor, from the config. A fused (EAGLE-3-style) drafter's
    fc reads the concatenated target layers [k*d] and its output goes through a final
    `norm` (vLLM's `Eagle3LlamaForCausalLM`)."""
    d = config["hidden_size"]
    fused = fused_layers(config)
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (d, (len(fused) if fused else 2) * d)}
    for i in range(num_layers(config)):
        shapes.update(layer_shapes(config, i, fused is not None))
    if fused:
        shapes["norm.weight"] = (d,)
    return {
        **shapes,
        **router_shapes(d, coral),
        "partition.token_order": (coral.vocab_size,),
    }


def router_shapes(d: int, coral: CoralConfig) -> dict[str, tuple[int, ...]]:
    """The router's tensors; none for a static drafter, which selects without one."""
    if coral.selection == "static":
        return {}
    return {"router.w1.weight": (d, d), "router.w1.bias": (d,),
            "router.w2.weight": (coral.num_groups, d), "router.w2.bias": (coral.num_groups,)}


@dataclasses.dataclass
class DrafterCheckpoint:
    """A drafter directory as read from disk (tensors not loaded, except the partition)."""

    path: Path
    config: dict[str, Any]
    coral: CoralConfig
    shapes: dict[str, tuple[int, ...]]
    token_order: torch.Tensor

    @property
    def has_own_lm_head(self) -> bool:
        return "lm_head.weight" in self.shapes


def read_checkpoint(path: str | os.PathLike[str]) -> DrafterCheckpoint:
    """Reads and self-checks a drafter directory; raises CoralConfigError naming the fix."""
    path = Path(path)
    config, coral = _read_config(path)
    weights = path / WEIGHTS_FILE
    shapes, dtypes, token_order = _read_header(weights)
    _check_tensors(weights, config, coral, shapes, dtypes)
    assert token_order is not None
    validate_token_order(token_order, coral.vocab_size)
    return DrafterCheckpoint(path, config, coral, shapes, token_order.long())


def _read_config(path: Path) -> tuple[dict[str, Any], CoralConfig]:
    """config.json and its "coral" section, checked on their own and against each other
    (the weights file must exist too)."""
    if not path.is_dir():
        raise CoralConfigError(
            f'speculative_config "model": drafter directory {str(path)!r} does not exist. '
            "Pass the directory written by `coral-vllm train export` or "
            "`coral-vllm init-drafter`.")
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.is_file():
            raise CoralConfigError(f"drafter directory {str(path)!r} has no {f.name}; "
                                   "re-export the drafter.")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CoralConfigError(f"{cfg_file}: cannot be read as JSON ({e}); {_REEXPORT}.") from e
    coral = CoralConfig.from_dict(config.get("coral"))
    for field in ("vocab_size", "hidden_size"):
        if config.get(field) != getattr(coral, field):
            raise CoralConfigError(
                f'config.json "{field}" is {config.get(field)} but "coral.{field}" is '
                f"{getattr(coral, field)}; they must agree (re-export the drafter).")
    scale = config.get(EMBED_SCALE, 1.0)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise CoralConfigError(
            f'config.json "{EMBED_SCALE}" is {scale!r}; it must be a positive number (how '
            "the target scales token embeddings, e.g. sqrt(hidden_size) for Gemma).")
    return config, coral


def _check_tensors(weights: Path, config: dict[str, Any], coral: CoralConfig,
                   shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> None:
    """Every tensor config.json implies is there in its shape, no layer more, the
    optional heads fit, and every dtype is one a drafter can have."""
    expected = expected_shapes(config, coral)
    for name, shape in expected.items():
        if name not in shapes:
            depth = (f', config.json "num_hidden_layers" is {config["num_hidden_layers"]}'
                     if name.startswith("layers.") else "")
            raise CoralConfigError(
                f"{weights}: tensor {name!r} is missing (expected shape {list(shape)}"
                f"{depth}); the checkpoint is incomplete or not a CORAL drafter. Re-export it.")
        if shapes[name] != shape:
            raise CoralConfigError(
                f"{weights}: tensor {name!r} has shape {list(shapes[name])}, expected "
                f"{list(shape)} from config.json; the weights and config disagree.")
    extra = sorted(k for k in shapes if k.startswith("layers.") and k not in expected)
    if extra:
        raise CoralConfigError(
            f"{weights}: tensor {extra[0]!r} belongs to no layer of config.json's "
            f'"num_hidden_layers" = {config["num_hidden_layers"]}; the weights and config '
            "disagree: " + _REEXPORT + ".")
    for name in OPTIONAL_TENSORS:
        want = (coral.vocab_size, coral.hidden_size)
        if name in shapes and shapes[name] != want:
            raise CoralConfigError(
                f"{weights}: tensor {name!r} has shape {list(shapes[name])}, expected "
                f"{list(want)}; drop it to share the target's, or re-export.")
    for name, dtype in dtypes.items():
        allowed = INDEX_DTYPES if name in INDEX_TENSORS else WEIGHT_DTYPES
        if dtype not in allowed:
            raise CoralConfigError(
                f"{weights}: tensor {name!r} has dtype {dtype}, expected one of "
                f"{list(allowed)}; the file is corrupt or not a CORAL drafter: {_REEXPORT}.")


def _read_header(weights: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str],
                                          torch.Tensor | None]:
    """Shapes and dtypes of every tensor, and the partition (the one tensor read here).

    The safetensors reader checks the header and that the data exactly fills the rest of
    the file, so a truncated or overwritten file fails here, named, not in a worker."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            dtypes = {k: s.get_dtype() for k, s in slices.items()}
            token_order = (f.get_tensor("partition.token_order")
                           if "partition.token_order" in shapes else None)
    except (OSError, SafetensorError) as e:
        raise CoralConfigError(
            f"{weights}: cannot be read as safetensors ({e}); the file is truncated or "
            f"corrupt: {_REEXPORT}.") from e
    return shapes, dtypes, token_order


def check_against_target(ckpt: DrafterCheckpoint, target_config: Mapping[str, Any],
                         target_name: str = "the target") -> None:
    """The drafter must score the target's vocabulary from the target's hidden states,
    and embed tokens the way the target does; a fused-feature drafter must read layers
    the target has. `target_config`: the target's (text) config.json fields
    `vocab_size`, `hidden_size`, `model_type` and, for the fused layers' bound,
    `num_hidden_layers`."""
    vocab_size, hidden_size = target_config["vocab_size"], target_config["hidden_size"]
    if ckpt.coral.vocab_size != vocab_size:
        raise CoralConfigError(
            f'drafter {str(ckpt.path)!r}: "vocab_size" is {ckpt.coral.vocab_size} but '
            f"{target_name} has {vocab_size} tokens; train/export a drafter for this target.")
    if ckpt.coral.hidden_size != hidden_size:
        raise CoralConfigError(
            f'drafter {str(ckpt.path)!r}: "hidden_size" is {ckpt.coral.hidden_size} but '
            f"{target_name}'s hidden size is {hidden_size}; the drafter reads the target's "
            "hidden states, so it must be trained for this target.")
    want = target_embed_scale(target_config.get("model_type", ""), hidden_size)
    layers = fused_layers(ckpt.config)
    if layers is not None:
        if want != 1.0:
            raise CoralConfigError(
                f"drafter {str(ckpt.path)!r} reads fused target layers (vLLM's eagle3 "
                f"path), which coral-vllm supports for targets with unscaled embeddings "
                f"(Llama, Qwen) only; {target_name} is {target_config.get('model_type')}. "
                "Export an EAGLE drafter (without fused layers) for it.")
        if "num_hidden_layers" in target_config:
            check_fused_layers(layers, target_config)
    have = embed_scale(ckpt.config)
    if not math.isclose(have, want, rel_tol=1e-6):
        raise CoralConfigError(
            f'drafter {str(ckpt.path)!r}: "{EMBED_SCALE}" is {have:g} but {target_name} '
            f"({target_config.get('model_type')}) scales token embeddings by {want:g}; the "
            "drafter was made for another kind of target (or by a coral-vllm that did not "
            "know this one's scale): train/export a drafter for this target.")


def save_checkpoint(path: str | os.PathLike[str], config: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> Path:
    """Writes config.json + model.safetensors and checks them the way the plugin does
    before they replace anything at `path` (see `_write_then_swap`)."""
    return _write_then_swap(path, config, tensors, verify=read_checkpoint)


def _write_then_swap(path: str | os.PathLike[str], config: dict[str, Any],
                     tensors: dict[str, torch.Tensor], verify=None) -> Path:
    """Writes into a temporary sibling, runs `verify` on it, then swaps it into place.

    A half-written or failing drafter therefore never replaces a good one. The swap is
    two renames, not one atomic step: an existing `path` is first renamed to
    `.NAME.old`, then the new directory to `path`, so for that instant `path` is
    missing, and a crash between the two leaves the previous drafter in `.NAME.old`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if verify is not None:
            verify(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                _rmtree(old)
            path.rename(old)
            tmp.rename(path)
            _rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            _rmtree(tmp)
    return path


def _rmtree(p: Path) -> None:
    import shutil
    shutil.rmtree(p, ignore_errors=True)


def write_eagle_checkpoint(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """The same drafter as a stock EAGLE checkpoint: vLLM serves it with `"method": "eagle"`
    and its own dense LM head. This is the baseline a CORAL drafter is measured against:
    identical layer weights, only the head differs. Router and partition are dropped, so
    a routed drafter becomes its dense-head twin; its embedding scale goes into fc, since
    vLLM's EAGLE layer feeds fc the bare shared embedding."""
    from safetensors.torch import load_file

    ckpt = read_checkpoint(src)
    if fused_layers(ckpt.config) is not None:
        raise CoralConfigError(
            f"{src}: a fused-feature (eagle3) drafter has no stock EAGLE twin here yet; "
            "compare it with its dense export (`train export --dense`) instead.")
    tensors = {k: v for k, v in load_file(str(ckpt.path / WEIGHTS_FILE)).items()
               if not k.startswith(OWN_PREFIXES)}
    tensors["fc.weight"] = fold_embed_scale(tensors["fc.weight"], embed_scale(ckpt.config))
    config = {k: v for k, v in ckpt.config.items() if k not in ("coral", EMBED_SCALE)}
    config["architectures"] = [EAGLE_ARCHITECTURE]
    return _write_then_swap(dest, config, tensors)


def is_coral_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A CORAL drafter (served as "coral") or a plain EAGLE one (served as "eagle")."""
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        raise CoralConfigError(f"drafter directory {str(path)!r} has no {CONFIG_FILE}.")
    return "coral" in json.loads(cfg.read_text())
