"""The targets and drafter kinds the engine tests serve, in one table, and the files they
are made of (the session fixture `drafters`: no engine starts here).

Every kind is checked for the same lossless properties (tests/test_lossless.py): greedy
output equal to plain decoding, the rejection sampler getting the drafter's restricted
distribution, and the target's T=1 distribution (the last two: every kind but the static
fused one, whose two halves are kinds of their own). A new kind (a Qwen2 target, say) is a
row in KINDS and, for a new target, a row in TARGETS; kind-specific checks read the same
engine runs (`kind_probes` says what each kind's engines measure besides).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import kind_probes
from engine_utils import PROMPTS
from tiny_targets import write_qwen2_target, write_tiny_llama_target

K = 3  # draft tokens per step, every kind
PINNED = 4  # the "pinned" kind's always-active groups (of the shipped drafter's top 8)


@dataclasses.dataclass(frozen=True)
class Target:
    """A target model and what its engines are asked."""

    prompts: tuple[str, ...]  # greedy prompts
    chat: bool                # through the chat template (instruct model) or raw text
    max_tokens: int           # greedy tokens per prompt
    sample_prompt: str        # T=1 samples continue this (raw text: a short prefill)
    # the plain engine's core in its own process, as users run vLLM, so the plugin must
    # load there from its entry point (test_plain_engine_runs_with_the_plugin_installed)
    own_process: bool = False


TARGETS = {
    "smollm2": Target(tuple(PROMPTS), True, 48, "My favourite colour is", own_process=True),
    # a base model: raw prompts
    "gemma3": Target(("The capital of France is", "def fibonacci(n):\n",
                      "Once upon a time, there was a"), False, 24, "My favourite colour is"),
    # random weights with SmolLM2's tokenizer (tests/tiny_targets.py); its greedy
    # replies come from `bench tp`
    "tiny-llama": Target((), False, 0, "The capital of France is"),
    # Qwen2's layout (q/k/v biases, untied head) at random weights, SmolLM2's tokenizer
    "qwen2-tiny": Target(tuple(PROMPTS), True, 24, "The capital of France is"),
}


@dataclasses.dataclass(frozen=True)
class Kind:
    """A drafter served by the coral method: on which target, at which TP size, and
    what its greedy and sampling engines measure besides the common properties."""

    target: str
    tensor_parallel_size: int = 1
    # llm -> dict, run on the greedy (resp. probabilistic-drafting) engine after the
    # common measurements
    greedy_probe: Callable[[Any], dict] | None = None
    sampled_probe: Callable[[Any], dict] | None = None
    # (target dir, drafter dir, work dir) -> the greedy run, for a kind whose greedy
    # replies come from a product command instead of an engine of the tests' own
    greedy_run: Callable[[Path, Path, Path], dict] | None = None
    # whether the kind gets a probabilistic-drafting engine (restricted q, T=1)
    sampled: bool = True


KINDS = {
    "router": Kind("smollm2", greedy_probe=kind_probes.router_greedy,
                   sampled_probe=kind_probes.seeded),
    "dense": Kind("smollm2"),
    "static": Kind("smollm2", greedy_probe=kind_probes.loaded_drafter),
    "shared": Kind("smollm2", greedy_probe=kind_probes.shared_head),
    "pinned": Kind("smollm2", greedy_probe=kind_probes.loaded_drafter),
    "two-layer": Kind("smollm2", greedy_probe=kind_probes.two_layer),
    "fused": Kind("smollm2", greedy_probe=kind_probes.fused),
    # greedy only: its static head's q is "static"'s, its eagle3 class's is "fused"'s
    "static-fused": Kind("smollm2", greedy_probe=kind_probes.head_kind, sampled=False),
    "tp2": Kind("tiny-llama", tensor_parallel_size=2, greedy_run=kind_probes.bench_tp),
    "gemma": Kind("gemma3", greedy_probe=kind_probes.gemma),
    "qwen2-router": Kind("qwen2-tiny", greedy_probe=kind_probes.served_head),
    "qwen2-dense": Kind("qwen2-tiny", greedy_probe=kind_probes.served_head),
    "qwen2-static": Kind("qwen2-tiny", greedy_probe=kind_probes.served_head),
}


def deepened(src: Path, dest: Path, seed: int = 0) -> Path:
    """`src` with a random layer 1 (std 0.02, norms around 1) after its layer 0: vLLM
    accepts real drafts while layer 1 (its input norm, the residual stream handed
    between layers) changes every feature."""
    from safetensors.torch import load_file

    from coral_vllm.format.checkpoint import WEIGHTS_FILE, layer_shapes, save_checkpoint

    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 2
    tensors = dict(load_file(str(src / WEIGHTS_FILE)))
    g = torch.Generator().manual_seed(seed)
    for name, shape in layer_shapes(config, 1).items():
        tensors[name] = (1 + 0.1 * torch.randn(shape, generator=g) if name.endswith("norm.weight")
                         else 0.02 * torch.randn(shape, generator=g))
    return save_checkpoint(dest, config, tensors)


def with_coral(src: Path, dest: Path, **coral: Any) -> Path:
    """A copy of the drafter `src` with `coral` settings changed in its config.json."""
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config["coral"].update(coral)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def all_groups_active(src: Path, dest: Path) -> Path:
    """`src` with every group active: a dense head served through the coral method (how
    `bench acceptance` serves the EAGLE and HASS baselines)."""
    num_groups = json.loads((src / "config.json").read_text())["coral"]["num_groups"]
    return with_coral(src, dest, top_k_groups=num_groups)


class Drafters:
    """Targets and drafters on disk, each made once per test run when first asked for."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self._tmp = tmp
        self._made: dict[str, Path] = {}

    def _once(self, key: str, make: Callable[[], Path]) -> Path:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def target(self, name: str) -> Path:
        from coral_vllm.model_store.targets import fetch_model

        return self._once("target:" + name, {
            "smollm2": fetch_model,
            "gemma3": lambda: fetch_model("gemma3-270m"),
            "tiny-llama": lambda: write_tiny_llama_target(
                self._tmp.mktemp("tiny-llama") / "target", self.target("smollm2")),
            "qwen2-tiny": lambda: write_qwen2_target(
                self._tmp.mktemp("qwen2") / "target", self.target("smollm2")),
        }[name])

    def drafter(self, kind: str) -> Path:
        return self._once("drafter:" + kind, lambda: self._make(kind))

    def _make(self, kind: str) -> Path:
        from coral_vllm.format.drafter_config import default_fused_layers
        from coral_vllm.format.static_checkpoint import write_static_checkpoint
        from coral_vllm.model_store.drafter_init import init_drafter
        from coral_vllm.model_store.drafters import shipped_drafter

        out = self._tmp.mktemp(kind) / "drafter"
        smollm2 = self.target("smollm2")
        fused = default_fused_layers(
            json.loads((smollm2 / "config.json").read_text())["num_hidden_layers"])
        if kind == "router":
            return shipped_drafter()
        if kind == "dense":
            return all_groups_active(shipped_drafter(), out)
        if kind == "shared":  # the shipped drafter, one set of groups per draft step
            return with_coral(shipped_drafter(), out, group_sharing="batch")
        if kind == "pinned":  # the shipped drafter (frequency, top 8 of 64), 4 groups pinned
            return with_coral(shipped_drafter(), out, pinned_groups=PINNED)
        if kind == "static":  # the shipped drafter's static-vocabulary twin
            return write_static_checkpoint(shipped_drafter(), out)
        if kind == "two-layer":
            return deepened(shipped_drafter(), out)
        if kind == "fused":  # EAGLE-3's input: the target's low, middle and high layers
            return init_drafter(smollm2, out, num_layers=2, fused_layers=fused, std=0.05)
        if kind == "static-fused":  # the same levers with the static draft vocabulary
            return init_drafter(smollm2, out, num_layers=2, fused_layers=fused, std=0.05,
                                partition="frequency", selection="static")
        if kind == "tp2":
            return init_drafter(self.target("tiny-llama"), out, partition="cluster", seed=1)
        if kind == "gemma":  # what `coral-vllm init-drafter GEMMA_DIR OUT` writes
            from coral_vllm.cli import main

            assert main(["init-drafter", str(self.target("gemma3")), str(out)]) == 0
            return out
        qwen2 = dict(num_groups=64, partition="frequency", seed=1)
        if kind == "qwen2-router":
            return init_drafter(self.target("qwen2-tiny"), out, top_k_groups=8, **qwen2)
        if kind == "qwen2-dense":
            return init_drafter(self.target("qwen2-tiny"), out, top_k_groups=64, **qwen2)
        if kind == "qwen2-static":  # the router drafter's `coral-vllm to-static` twin
            from coral_vllm.cli import main

            assert main(["to-static", str(self.drafter("qwen2-router")), str(out)]) == 0
            return out
        raise KeyError(kind)
