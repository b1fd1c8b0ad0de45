"""A benchmark stopped from outside (a `timeout`, a job's stop: SIGTERM) stops the
`vllm serve` processes it started. They run in sessions of their own, so the signal does
not reach them; left running, they hold the GPU's memory against whatever runs next."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# A stand-in for `vllm serve`: answers /health on the port serve_command gives it.
FAKE_SERVE = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

# The benchmark's side: servers up, their pids printed, then waiting as a benchmark would.
BENCH = """
import sys, time
from coral_vllm.runtime import server
server.serve_command = lambda spec, port: [sys.executable, "-c", sys.argv[1], str(port)]
specs = {n: server.ServerSpec(model="m") for n in ("a", "b")}
with server.running_server_processes(specs, startup_timeout=60) as up:
    print(*[s.pid for s in up.values()], flush=True)
    time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (nothing may reap an orphan in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_sigterm_to_a_benchmark_stops_its_servers() -> None:
    bench = subprocess.Popen([sys.executable, "-c", BENCH, FAKE_SERVE], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pids: list[int] = []
    try:
        pids = [int(p) for p in bench.stdout.readline().split()]
        assert len(pids) == 2 and all(_running(p) for p in pids), bench.stderr.read()
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(p) for p in pids), "servers outlived the benchmark"
    finally:
        bench.kill()
        for p in pids:
            if _running(p):
                os.kill(p, signal.SIGKILL)
