"""`train train --profile-steps`: the profiler watches a window of steps and says where
their time went (training/profiling.py)."""

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


def test_profile_off_writes_nothing(tmp_path):
    prof = StepProfiler(tmp_path, steps=0, device=torch.device("cpu"))
    for _ in range(WARM_STEPS + 3):
        prof.step()
    assert not (tmp_path / "profile.txt").exists()
