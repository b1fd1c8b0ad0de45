"""Start and stop `vllm serve` with the coral method: the demo, the tests and the
benchmarks all talk to a real OpenAI-compatible server through this one helper."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cpu() -> bool:
    try:
        import torch
        return not torch.cuda.is_available()
    except ImportError:
        return True


def serve_command(model: str | Path, drafter: str | Path | None, *, port: int,
                  num_speculative_tokens: int = 3, extra_spec: dict | None = None,
                  extra_args: list[str] | None = None) -> list[str]:
    """The `vllm serve` command line the README shows, with CPU-friendly defaults."""
    cmd = [sys.executable, "-m", "coral_vllm.serving.vllm_cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "2048", "--seed", "0"]
    if drafter is not None:
        spec = {"method": "coral", "model": str(drafter),
                "num_speculative_tokens": num_speculative_tokens, **(extra_spec or {})}
        cmd += ["--speculative-config", json.dumps(spec)]
    if on_cpu():
        # float32 makes greedy outputs exactly reproducible; the KV cache is sized in
        # bytes because the CPU backend reads gpu_memory_utilization as a share of RAM.
        cmd += ["--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 30)]
    else:
        cmd += ["--dtype", "bfloat16"]
    return cmd + list(extra_args or [])


@contextlib.contextmanager
def running_server(model: str | Path, drafter: str | Path | None = None, *,
                   num_speculative_tokens: int = 3, extra_spec: dict | None = None,
                   extra_args: list[str] | None = None, startup_timeout: float = 600.0,
                   log_path: str | Path | None = None) -> Iterator[str]:
    """Yields the server's base URL (http://127.0.0.1:PORT) once /health answers."""
    port = free_port()
    cmd = serve_command(model, drafter, port=port, num_speculative_tokens=num_speculative_tokens,
                        extra_spec=extra_spec, extra_args=extra_args)
    log_file = Path(log_path) if log_path else Path(tempfile.mkstemp(suffix=".log",
                                                                     prefix="vllm-serve-")[1])
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1"}
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, startup_timeout, log_file)
        yield url
    finally:
        _stop(proc)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text()[-4000:]
            raise RuntimeError(f"vllm serve exited with {proc.returncode} before it was "
                               f"ready; last log lines ({log_file}):\n{tail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vllm serve did not become healthy in {timeout:.0f}s; log: {log_file}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def fetch_metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()
