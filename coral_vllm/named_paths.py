"""NAME=PATH lists on the command line: drafters to compare, runs to tabulate, each under
its row label (`coral-vllm bench ...`, `coral-vllm train vllm-tau`)."""

from __future__ import annotations

from pathlib import Path

PLAIN = "plain"  # the row label of decoding without a drafter


def parse_named(specs: list[str], option: str = "--drafters", what: str = "PATH"
                ) -> dict[str, Path]:
    """NAME=PATH ... in order; names are row labels and must be unique. `what` names the
    path in the error (DIR for a drafter, RUN for a training run)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{option}: {spec!r} is not NAME={what} "
                             f"(e.g. coral=./{what.lower()})")
        if name == PLAIN or name in out:
            raise SystemExit(f"{option}: name {name!r} is taken; use another label")
        out[name] = Path(path)
    return out


def parse_drafters(specs: list[str]) -> dict[str, Path]:
    """--drafters NAME=DIR ...: names are row labels, each directory checked up front."""
    from coral_vllm.format.checkpoint import is_coral_checkpoint

    out = parse_named(specs, what="DIR")
    for path in out.values():
        is_coral_checkpoint(path)  # raises naming the missing directory / config
    return out
