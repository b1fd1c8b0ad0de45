"""Pinned Debian packages as a text source: fetched once with `apt-get download`, checked
by sha256, read by unpacking with `dpkg-deb -x` into a temporary directory.

A Debian archive keeps only a release's current versions, so a pin can stop resolving
after a point release; the sha256 then still tells a copy of the pinned file (in the
cache, or copied there by hand) from anything else. The cache is the wheel cache of
:func:`coral_vllm.data.wheels.wheel_cache`: one directory of pinned downloads.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from coral_vllm.data.wheels import wheel_cache
from coral_vllm.downloads import sha256


@dataclasses.dataclass(frozen=True)
class DebPin:
    version: str
    arch: str
    sha256: str

    def describe(self, package: str) -> str:
        return f"{package}={self.version} ({self.arch}, sha256 {self.sha256})"


# Debian 12 (bookworm) as of 2026; libpython3.11-minimal + libpython3.11-stdlib hold the
# standard library's sources (without its test suite), split by Debian across the two.
DEBIAN_PACKAGES: dict[str, DebPin] = {
    "python3.11-doc": DebPin("3.11.2-6+deb12u8", "all",
                             "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"),
    "libpython3.11-minimal": DebPin(
        "3.11.2-6+deb12u8", "amd64",
        "f3beaa03994ffedacf73c43a0843d53b062d347115d8af65bee2034552a4e6f9"),
    "libpython3.11-stdlib": DebPin(
        "3.11.2-6+deb12u8", "amd64",
        "890b3540dad8a1ccc0deeca025db735bcc82629a76adacbe3b50fcc06ed528ca"),
    "golang-1.19-src": DebPin("1.19.8-2", "all",
                              "2dfa82fe4f08f4e0193c532e561af4c91871f5235608f04f2bb8d57bb288df5a"),
}


def deb_path(package: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached .deb of a pinned package, downloaded on first use, sha256-checked."""
    pin = DEBIAN_PACKAGES[package]
    cache = Path(cache_dir) if cache_dir else wheel_cache()
    path = cache / f"{package}_{pin.version}_{pin.arch}.deb"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = ["apt-get", "download", f"{package}:{pin.arch}={pin.version}"]
        done = subprocess.run(cmd, cwd=cache, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            raise RuntimeError(f"could not download {pin.describe(package)}: `{' '.join(cmd)}` "
                               f"said:\n{done.stderr[-2000:]}\nPut that file at {path} by hand "
                               "if the archive no longer carries this version.")
    got = sha256(path)
    if got != pin.sha256:
        raise ValueError(f"{path}: sha256 {got} is not the pinned {pin.describe(package)}; "
                         "delete it to download the pinned file again.")
    return path


def deb_files(package: str, keep: Callable[[str], bool], cache_dir=None
              ) -> Iterator[tuple[str, bytes]]:
    """(path inside the package, content) of each regular file for which `keep(path)` is
    true, in sorted path order. Paths have no leading './' ("usr/lib/...")."""
    deb = deb_path(package, cache_dir)
    with tempfile.TemporaryDirectory(prefix="coral-deb-") as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        root = Path(tmp)
        paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.is_file() and not p.is_symlink())
        for rel in paths:
            if keep(rel):
                yield rel, (root / rel).read_bytes()
