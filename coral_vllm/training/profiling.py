"""A window of training steps under torch.profiler: where a step's time goes.

An H200 trains the SmolLM2 drafter at ~236k tokens/s (the shipped run's median): by a
count of its matrix work (~0.5 GFLOP a token, most of it the 49k-row head's logits and
their gradients) that is ~120 TFLOP/s, a sixth of the card's bf16 peak (an estimate).
Whether a step waits on the device (kernels) or on the host (Python, launches, copies)
decides what would make it faster, so `train train --profile-steps N` profiles N
optimizer steps after a few warm ones and writes RUN/profile.txt: per step the wall
time and the time the device spent in kernels (their ratio is how busy it was), then
the operators by device time and by host time. RUN/profile.json holds the same
per-step figures (and the sync sites), the record a table cites. The steps stay part of the run (the
profiler only watches), so a profiled run is the same run.

Device time counts kernel events only: the first H200 profile (session 4) summed every
event's own device time, the `ProfilerStep*` annotation's included, and reported kernels
busy 125% of the wall time when they were busy ~19%. On CUDA the window also runs under
`torch.cuda.set_sync_debug_mode("warn")` and lists where the host waited on the device
(the loop should wait only on logging steps): that profile counted 3
cudaStreamSynchronize calls a step without saying from where.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

WARM_STEPS = 3  # compiled kernels, allocator growth and caches settle first
TOP_OPS = 25


def _device_us(evt) -> float:
    """An event's own device time in microseconds (the attribute's name moved)."""
    return float(getattr(evt, "self_device_time_total", None)
                 or getattr(evt, "self_cuda_time_total", 0.0))


def kernel_us(events) -> float:
    """Device time of the kernels (and copies) among `events`, in microseconds.

    Only device-side events count, as in torch's own table footer: an operator's self
    device time repeats its kernels', and a step annotation's spans the whole step."""
    return sum(_device_us(e) for e in events
               if getattr(e, "device_type", None) == DeviceType.CUDA
               and not e.key.startswith("ProfilerStep"))


def sync_sites(records: list[warnings.WarningMessage], top: int = 10) -> list[str]:
    """'count  file:line  message' for the host-device syncs recorded, most frequent first."""
    sites = Counter((f"{r.filename}:{r.lineno}", str(r.message).split("\n")[0][:90])
                    for r in records)
    return [f"{n:5d}  {where}  {msg}" for (where, msg), n in sites.most_common(top)]


class StepProfiler:
    """Call `step()` after every optimizer step; profiles steps WARM_STEPS + 1 ..
    WARM_STEPS + `steps` of this invocation and writes `out`/profile.txt once."""

    def __init__(self, out: Path, steps: int, device: torch.device) -> None:
        self.out, self.steps, self.seen, self.t0 = out, steps, 0, 0.0
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.cuda = device.type == "cuda"
        self._sync_watch: warnings.catch_warnings | None = None
        self._syncs: list[warnings.WarningMessage] = []
        self.prof = (profile(activities=activities,
                             schedule=schedule(wait=WARM_STEPS - 1, warmup=1,
                                               active=steps, repeat=1),
                             on_trace_ready=self._write) if steps > 0 else None)
        if self.prof is not None:
            self.prof.start()

    def step(self) -> None:
        if self.prof is None:
            return
        self.seen += 1
        if self.seen == WARM_STEPS:  # the window opens at the next step
            if self.cuda:
                torch.cuda.synchronize()
                self._watch_syncs(True)
            self.t0 = time.perf_counter()
        if self.seen == WARM_STEPS + self.steps and self.cuda:
            self._watch_syncs(False)
            torch.cuda.synchronize()  # the window's wall time includes its queued kernels
        self.prof.step()
        if self.seen >= WARM_STEPS + self.steps:
            self.prof.stop()
            self.prof = None

    def _watch_syncs(self, on: bool) -> None:
        """Record (as warnings) every host-device sync between the two calls."""
        if on:
            self._sync_watch = warnings.catch_warnings(record=True)
            self._syncs = self._sync_watch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif self._sync_watch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._sync_watch.__exit__(None, None, None)
            self._sync_watch = None

    def _write(self, prof) -> None:
        wall = (time.perf_counter() - self.t0) / self.steps
        avgs = prof.key_averages()
        kernel_s = kernel_us(avgs) / 1e6 / self.steps
        syncs = [r for r in self._syncs if "synchroniz" in str(r.message).lower()]
        lines = [f"profiled steps: {self.steps} (after {WARM_STEPS} warm ones)",
                 f"wall per step: {wall * 1e3:.1f} ms",
                 f"device kernel time per step: {kernel_s * 1e3:.1f} ms "
                 f"({100 * kernel_s / max(wall, 1e-9):.0f}% of the wall time)", ""]
        if self.cuda:
            lines += [f"host-device syncs in the window: {len(syncs)} "
                      f"({len(syncs) / self.steps:.1f} a step)", *sync_sites(syncs), ""]
        if self.cuda:
            lines += [avgs.table(sort_by="self_cuda_time_total", row_limit=TOP_OPS), ""]
        lines += [avgs.table(sort_by="self_cpu_time_total", row_limit=TOP_OPS)]
        (self.out / "profile.txt").write_text("\n".join(lines) + "\n")
        summary = {"device": torch.cuda.get_device_name() if self.cuda else "cpu",
                   "profiled_steps": self.steps, "warm_steps": WARM_STEPS,
                   "wall_ms_per_step": round(wall * 1e3, 2),
                   "kernel_ms_per_step": round(kernel_s * 1e3, 2),
                   "kernel_share_of_wall": round(kernel_s / max(wall, 1e-9), 4)}
        if self.cuda:
            summary |= {"syncs_per_step": len(syncs) / self.steps, "sync_sites": sync_sites(syncs)}
        (self.out / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")
