"""Speculative-decoding counters, from a server's /metrics or an offline LLM.

vLLM counts drafts, draft tokens, accepted tokens and accepted tokens per draft position
(`vllm:spec_decode_*`). Mean acceptance length counts the bonus token the target always
adds: 1 + accepted / drafts.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Iterator

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+)$")
_POSITION = re.compile(r'position="(\d+)"')


@dataclasses.dataclass
class SpecDecodeStats:
    num_drafts: float = 0.0
    num_draft_tokens: float = 0.0
    num_accepted_tokens: float = 0.0
    accepted_per_position: list[float] = dataclasses.field(default_factory=list)

    @property
    def acceptance_length(self) -> float:
        """Mean tokens per target step (draft tokens accepted + the bonus token)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def per_position_rate(self) -> list[float]:
        return [a / self.num_drafts if self.num_drafts else 0.0
                for a in self.accepted_per_position]

    def __sub__(self, other: "SpecDecodeStats") -> "SpecDecodeStats":
        n = max(len(self.accepted_per_position), len(other.accepted_per_position))
        pad = lambda xs: list(xs) + [0.0] * (n - len(xs))  # noqa: E731
        return SpecDecodeStats(
            self.num_drafts - other.num_drafts,
            self.num_draft_tokens - other.num_draft_tokens,
            self.num_accepted_tokens - other.num_accepted_tokens,
            [a - b for a, b in zip(pad(self.accepted_per_position),
                                   pad(other.accepted_per_position))])

    def to_dict(self) -> dict[str, Any]:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "acceptance_length": self.acceptance_length,
                "acceptance_rate": self.acceptance_rate,
                "accepted_per_position": self.per_position_rate}


def _samples(text: str) -> Iterator[tuple[str, str, float]]:
    """(name, labels, value) of every numeric sample in a Prometheus text exposition."""
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m and not line.startswith("#"):
            yield m.group(1), m.group(2) or "", float(m.group(3))


def parse_prometheus(text: str) -> SpecDecodeStats:
    """Sums the spec-decode counters over engines in a Prometheus text exposition."""
    stats = SpecDecodeStats()
    per_pos: dict[int, float] = {}
    for name, labels, value in _samples(text):
        name = name.removesuffix("_total")
        if name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            pos = _POSITION.search(labels)
            if pos:
                per_pos[int(pos.group(1))] = per_pos.get(int(pos.group(1)), 0.0) + value
        elif name == "vllm:spec_decode_num_drafts":
            stats.num_drafts += value
        elif name == "vllm:spec_decode_num_draft_tokens":
            stats.num_draft_tokens += value
        elif name == "vllm:spec_decode_num_accepted_tokens":
            stats.num_accepted_tokens += value
    stats.accepted_per_position = [per_pos[i] for i in sorted(per_pos)]
    return stats


def from_llm_metrics(metrics: Iterable[Any]) -> SpecDecodeStats:
    """Same counters from `LLM.get_metrics()` (offline engine, disable_log_stats=False)."""
    stats = SpecDecodeStats()
    for m in metrics:
        if m.name == "vllm:spec_decode_num_drafts":
            stats.num_drafts += m.value
        elif m.name == "vllm:spec_decode_num_draft_tokens":
            stats.num_draft_tokens += m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            stats.num_accepted_tokens += m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            stats.accepted_per_position = [float(v) for v in m.values]
    return stats


def prometheus_totals(text: str) -> dict[str, float]:
    """Every numeric sample summed over its labels, by metric name (histograms give
    NAME_sum and NAME_count, so a difference of two scrapes yields a mean)."""
    totals: dict[str, float] = {}
    for name, _, value in _samples(text):
        totals[name] = totals.get(name, 0.0) + value
    return totals


def histogram_mean(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """Mean of the observations a histogram got between two scrapes (None if none)."""
    n = after.get(name + "_count", 0.0) - before.get(name + "_count", 0.0)
    return (after.get(name + "_sum", 0.0) - before.get(name + "_sum", 0.0)) / n if n else None
