"""`train train --profile-steps`: the profiler watches a window of steps and says where
their time went (training/profiling.py)."""

import json

import torch

from coral_vllm.training.profiling import WARM_STEPS, StepProfiler


def test_profile_window_written_once(tmp_path):
    prof = StepProfiler(tmp_path, steps=2, device=torch.device("cpu"))
    x = torch.randn(64, 64)
    for _ in range(WARM_STEPS + 4):  # steps after the window are not profiled
        x = torch.tanh(x @ x)
        prof.step()
    text = (tmp_path / "profile.txt").read_text()
    assert text.startswith("profiled steps: 2 (after 3 warm ones)")
    assert "wall per step:" in text and "aten::mm" in text
    summary = json.loads((tmp_path / "profile.json").read_text())
    assert summary["device"] == "cpu" and summary["profiled_steps"] == 2
    shown = float(text.split("wall per step: ")[1].split(" ms")[0])
    assert abs(shown - summary["wall_ms_per_step"]) <= 0.06  # the same figure, rounded


def test_profile_off_writes_nothing(tmp_path):
    prof = StepProfiler(tmp_path, steps=0, device=torch.device("cpu"))
    for _ in range(WARM_STEPS + 3):
        prof.step()
    assert not (tmp_path / "profile.txt").exists()
    assert not (tmp_path / "profile.json").exists()


class _Evt:
    def __init__(self, key, device_type, us):
        self.key, self.device_type, self.self_device_time_total = key, device_type, us


def test_kernel_time_counts_device_events_only():
    """An operator's self device time repeats its kernels'; the step annotation spans the
    step: counting either (as the first H200 profile did) overstates how busy the card is."""
    from torch.autograd import DeviceType

    from coral_vllm.training.profiling import kernel_us
    events = [_Evt("aten::mm", DeviceType.CPU, 90.0),            # its kernel's time again
              _Evt("ProfilerStep*", DeviceType.CPU, 500.0),
              _Evt("ProfilerStep#4", DeviceType.CUDA, 500.0),    # a GPU-side annotation
              _Evt("sm90_gemm", DeviceType.CUDA, 90.0),
              _Evt("elementwise_kernel", DeviceType.CUDA, 10.0)]
    assert kernel_us(events) == 100.0


def test_sync_sites_most_frequent_first():
    import warnings

    from coral_vllm.training.profiling import sync_sites
    rec = lambda line: warnings.WarningMessage(  # noqa: E731
        "called a synchronizing CUDA operation", UserWarning, "losses.py", line)
    sites = sync_sites([rec(7), rec(9), rec(9)])
    assert sites[0].split() == ["2", "losses.py:9", "called", "a", "synchronizing", "CUDA",
                                "operation"]
    assert sites[1].split()[:2] == ["1", "losses.py:7"]
