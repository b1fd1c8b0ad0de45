"""The `coral` section of a drafter's config.json: what the router and grouped head need.

A CORAL drafter directory is an EAGLE-style Llama drafter checkpoint (a Llama
`config.json` of `num_hidden_layers` layers, one by default, or EAGLE-3's layout over
fused target layers, plus `model.safetensors`; `format.checkpoint`) whose config carries
one more section, `"coral"`, described by :class:`CoralConfig`. vLLM's
`SpeculativeConfig` forbids unknown keys, so every drafter-specific setting lives here,
in the checkpoint, not on the command line.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

FORMAT_VERSION = 1
DRAFTER_ARCHITECTURE = "EagleCoralLlamaForCausalLM"
# A new drafter's head, where a command is not told otherwise: 64 vocabulary groups, of
# which the router activates 8 per drafted token (1/8 of the head's rows)
NUM_GROUPS = 64
TOP_K_GROUPS = 8
PARTITION_STRATEGIES = ("contiguous", "frequency", "cluster")
ROUTER_ACTIVATIONS = ("silu", "gelu", "relu")
# How the head picks its active groups per drafted token: the router (CORAL), or always
# the first top_k_groups groups, which under the frequency partition are the most
# frequent tokens: the static draft vocabulary of EAGLE-3 / FR-Spec, CORAL's baseline.
SELECTIONS = ("router", "static")
# Which tokens share a set of active groups. "token": each drafted token scores its own
# top_k_groups groups (a batch of n reads up to n * top_k_groups groups' rows). "batch":
# the n tokens of one draft step share one set of top_k_groups groups picked from all
# their router scores (`head.shared_lm_head`), so a step reads top_k_groups groups'
# rows at any batch size, like the static head; at n > 1 a token may lose its own best
# groups. A static drafter's groups are the same for every token already; it ignores
# this. The default stays "token" until GPU measurements pick one.
GROUP_SHARINGS = ("token", "batch")
GROUP_SHARING = "token"
# Pinned groups (`pinned_groups` p): a routed drafter over the frequency partition keeps
# its first p groups, the most frequent tokens, always active and lets the router pick
# only the other top_k_groups - p among the remaining groups (`head.router.top_groups`).
# Why: held-out, the plain router recalled fewer target tokens than the static head at
# equal active rows (Qwen2.5-Coder-1.5B g128-k16: 0.943 vs 0.961; SmolLM2: 0.842-0.864
# vs 0.875): it spends picks re-finding the frequent groups and sometimes drops them.
# p = 0 is the plain router; stage 2 picks p by held-out recall (`train router`).
PINNED_GROUPS = 0


class CoralConfigError(ValueError):
    """A drafter checkpoint or setting is wrong; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class CoralConfig:
    """Router and grouped-head settings stored under `"coral"` in the drafter's config.json.

    The vocabulary is split into `num_groups` groups of `group_size` tokens (the last one
    may be ragged: `num_groups * group_size >= vocab_size`). Per drafted token the router
    activates `top_k_groups` of them, so the head reads `top_k_groups / num_groups` of its
    rows (with `group_sharing: "batch"`, one set of `top_k_groups` for the whole draft
    step; see `GROUP_SHARINGS`). With `selection: "static"` there is no router: the active
    rows are always the first `top_k_groups` groups (`active_rows` rows), so the partition
    must be `frequency`. With `pinned_groups` p > 0 (a routed drafter over the frequency
    partition) the first p groups are always active and the router picks the other
    `top_k_groups - p` (see `PINNED_GROUPS`): same active rows, between static and router.
    """

    num_groups: int
    group_size: int
    top_k_groups: int
    vocab_size: int
    hidden_size: int
    partition: str = "frequency"
    router_act: str = "silu"
    selection: str = "router"  # absent in drafters written before the static head
    group_sharing: str = GROUP_SHARING  # absent in drafters written before batch sharing
    pinned_groups: int = PINNED_GROUPS  # absent in drafters written before pinned groups
    trained: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    @property
    def padded_vocab(self) -> int:
        """Rows of the grouped head: every group padded to `group_size`."""
        return self.num_groups * self.group_size

    @property
    def active_fraction(self) -> float:
        return self.top_k_groups / self.num_groups

    @property
    def active_rows(self) -> int:
        """Head rows scored per drafted token (padding rows of a ragged last group not
        counted): what a static and a routed drafter are compared at."""
        return min(self.top_k_groups * self.group_size, self.vocab_size)

    def validate(self) -> None:
        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise CoralConfigError(f'config.json "coral.{field}": {msg}')

        need(self.format_version == FORMAT_VERSION, "format_version",
             f"is {self.format_version}, this coral-vllm reads version {FORMAT_VERSION}; "
             "re-export the drafter with this version's `coral-vllm train export`.")
        for name in ("num_groups", "group_size", "top_k_groups", "vocab_size", "hidden_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, name,
                 f"must be a positive integer, got {value!r}.")
        need(self.top_k_groups <= self.num_groups, "top_k_groups",
             f"is {self.top_k_groups} but there are only num_groups={self.num_groups} "
             "groups; lower top_k_groups or use more groups.")
        need(self.group_size == math.ceil(self.vocab_size / self.num_groups), "group_size",
             f"is {self.group_size}, but {self.num_groups} groups over a vocabulary of "
             f"{self.vocab_size} need group_size = ceil(vocab_size / num_groups) = "
             f"{math.ceil(self.vocab_size / self.num_groups)}.")
        need((self.num_groups - 1) * self.group_size < self.vocab_size, "num_groups",
             f"{self.num_groups} groups of {self.group_size} leave the last group empty; "
             "use fewer groups.")
        need(self.partition in PARTITION_STRATEGIES, "partition",
             f"is {self.partition!r}; choose one of {PARTITION_STRATEGIES}.")
        need(self.router_act in ROUTER_ACTIVATIONS, "router_act",
             f"is {self.router_act!r}; choose one of {ROUTER_ACTIVATIONS}.")
        need(self.selection in SELECTIONS, "selection",
             f"is {self.selection!r}; choose one of {SELECTIONS}.")
        need(self.group_sharing in GROUP_SHARINGS, "group_sharing",
             f"is {self.group_sharing!r}; choose one of {GROUP_SHARINGS} (per drafted "
             "token, or one set of groups per draft step).")
        need(self.selection != "static" or self.partition == "frequency", "selection",
             'is "static" (the first top_k_groups groups as the draft vocabulary), which '
             'needs "partition": "frequency" so those groups are the most frequent tokens; '
             f"this drafter's partition is {self.partition!r}. Export the static drafter "
             "with `coral-vllm train export --selection static` (it takes the run's "
             "frequency partition).")
        self._validate_pinned(need)

    def _validate_pinned(self, need: Callable[[bool, str, str], None]) -> None:
        """Pinned groups are the frequency partition's first groups next to the router's
        picks: a count below top_k_groups (the router keeps at least one pick), and only
        where there is a router and the first groups are the most frequent tokens."""
        p = self.pinned_groups
        need(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < self.top_k_groups,
             "pinned_groups", f"is {p!r}; it must be an integer with 0 <= pinned_groups < "
             f"top_k_groups = {self.top_k_groups} (the router picks the other "
             "top_k_groups - pinned_groups groups; 0 turns pinning off). For all "
             'top_k_groups groups fixed, export the static head (`"selection": "static"`).')
        if p == 0:
            return
        need(self.selection == "router", "pinned_groups",
             f'is {p}, but "selection" is {self.selection!r}: pinned groups sit beside a '
             'router\'s picks, and a static drafter has no router (all its groups are '
             'fixed already); set "pinned_groups": 0.')
        need(self.partition == "frequency", "pinned_groups",
             f'is {p}, which needs "partition": "frequency" so that the first groups are '
             f"the most frequent tokens; this drafter's partition is {self.partition!r}. "
             'Set "pinned_groups": 0, or export over the frequency partition.')

    @classmethod
    def for_vocab(cls, vocab_size: int, hidden_size: int, num_groups: int,
                  top_k_groups: int, **kw: Any) -> "CoralConfig":
        """Derives the group size from the vocabulary and the number of groups."""
        return cls(num_groups=num_groups, group_size=math.ceil(vocab_size / num_groups),
                   top_k_groups=top_k_groups, vocab_size=vocab_size,
                   hidden_size=hidden_size, **kw)

    def with_active_rows(self, rows: int) -> "CoralConfig":
        """The same grouping with the `top_k_groups` whose active rows come nearest to
        `rows` (at least one group): how a static drafter is sized to a row budget, e.g.
        the 32k most frequent tokens of a 128k vocabulary."""
        if rows <= 0:
            raise CoralConfigError(f"active rows must be positive, got {rows}.")
        k = min(self.num_groups, max(1, round(rows / self.group_size)))
        return dataclasses.replace(self, top_k_groups=k)

    @classmethod
    def from_dict(cls, d: Any) -> "CoralConfig":
        if not isinstance(d, dict):
            raise CoralConfigError(
                'config.json has no "coral" section: this is not a CORAL drafter. Export '
                "one with `coral-vllm train export` or make one with `coral-vllm init-drafter`.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise CoralConfigError(
                f'config.json "coral" has unknown keys {unknown}; known keys: {sorted(fields)}.')
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in d)
        if missing:
            raise CoralConfigError(f'config.json "coral" lacks {missing}.')
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
