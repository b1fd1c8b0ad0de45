"""The GPU host's shell helpers that decide what comes back from a lease.

A reply brings back at most 8 files from $OUT and drops the rest without failing the
command, so `gpu_job.sh send` is what keeps a job's results from being lost: pieces of
generated data or drafters first, within the cap, each file once."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _send(job_out: Path, out: Path) -> str:
    got = subprocess.run(["bash", "scripts/gpu_job.sh", "send", str(job_out)], cwd=REPO,
                         env={**os.environ, "OUT": str(out)}, capture_output=True,
                         text=True, check=True)
    return got.stdout


def test_send_caps_at_eight_files_pieces_first_and_sends_each_once(tmp_path: Path) -> None:
    job_out, first, second = tmp_path / "job-out", tmp_path / "o1", tmp_path / "o2"
    for d in (job_out, first, second):
        d.mkdir()
    (first / "already-there.log").write_text("x")  # counts against the 8
    for i in range(9):
        (job_out / f"a{i}.json").write_text(str(i))
    (job_out / "run-data.tar.xz.00").write_bytes(os.urandom(64))

    said = _send(job_out, first)
    sent = sorted(p.name for p in first.iterdir())
    assert len(sent) == 8 and "run-data.tar.xz.00" in sent  # the piece despite its name's order
    assert "3 file(s) left" in said

    said = _send(job_out, second)
    again = sorted(p.name for p in second.iterdir())
    assert "all sent" in said and len(again) == 3
    assert not set(again) & set(sent)  # nothing twice
    assert sorted(p.name for p in (job_out / "sent").iterdir()) == sorted(
        set(sent + again) - {"already-there.log"})


def test_send_keeps_within_sixty_mib(tmp_path: Path) -> None:
    job_out, out = tmp_path / "job-out", tmp_path / "o"
    job_out.mkdir(), out.mkdir()
    for i in range(5):  # 5 x 15 MiB pieces: 4 fit
        with open(job_out / f"d.tar.xz.{i:02d}", "wb") as f:
            f.truncate(15 << 20)
    assert "1 file(s) left" in _send(job_out, out)
    assert len(list(out.iterdir())) == 4
