"""Every bad-drafter case fails before an engine starts, naming the field and the fix."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from coral_vllm.format.checkpoint import check_against_target, read_checkpoint
from coral_vllm.format.config import CoralConfigError


def _variant(src: Path, dst: Path, config_edit=None, tensor_edit=None,
             file_edit=None) -> Path:
    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensor_edit:
        tensors = load_file(dst / "model.safetensors")
        tensor_edit(tensors)
        save_file(tensors, dst / "model.safetensors")
    if file_edit:
        file_edit(dst)
    return dst


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _random_bytes(d: Path) -> None:
    (d / "model.safetensors").write_bytes(os.urandom(1 << 16))


def _int_weight(t):
    t["fc.weight"] = torch.zeros(576, 1152, dtype=torch.int32)


def _set_coral(**kw):
    def edit(cfg):
        cfg["coral"].update(kw)
    return edit


def _swap_token(t):
    order = t["partition.token_order"].clone()
    order[1] = order[0]  # token order[0] twice, the old order[1] nowhere
    t["partition.token_order"] = order


BAD = {
    "top_k_exceeds_groups": (dict(config_edit=_set_coral(top_k_groups=65)),
                             ["coral.top_k_groups", "num_groups=64"]),
    "partition_not_a_cover": (dict(tensor_edit=_swap_token),
                              ["partition.token_order", "exactly once"]),
    "missing_tensor": (dict(tensor_edit=lambda t: t.pop("router.w2.weight")),
                       ["router.w2.weight", "missing"]),
    "wrong_shape": (dict(tensor_edit=lambda t: t.update(
        {"fc.weight": torch.zeros(576, 576)})), ["fc.weight", "[576, 1152]"]),
    "group_size_inconsistent": (dict(config_edit=_set_coral(group_size=700)),
                                ["coral.group_size", "ceil"]),
    "no_coral_section": (dict(config_edit=lambda c: c.pop("coral")), ['"coral"']),
    "bad_partition_name": (dict(config_edit=_set_coral(partition="alphabetical")),
                           ["coral.partition", "contiguous"]),
    "bad_selection": (dict(config_edit=_set_coral(selection="dense")),
                      ["coral.selection", "'router', 'static'"]),
    "static_without_frequency_partition": (dict(config_edit=_set_coral(selection="static")),
                                           ["coral.selection", '"partition": "frequency"',
                                            "--selection static"]),
    "config_not_json": (dict(file_edit=lambda d: (d / "config.json").write_text("{")),
                        ["config.json", "cannot be read as JSON", "re-export"]),
    "depth_without_its_layer": (dict(config_edit=lambda c: c.update(num_hidden_layers=2)),
                                ["'layers.1.self_attn.q_proj.weight' is missing",
                                 '"num_hidden_layers" is 2']),
    "layer_beyond_depth": (dict(tensor_edit=lambda t: t.update(
        {"layers.1.mlp.down_proj.weight": t["layers.0.mlp.down_proj.weight"].clone()})),
        ["'layers.1.mlp.down_proj.weight' belongs to no layer", '"num_hidden_layers" = 1']),
    "bad_depth": (dict(config_edit=lambda c: c.update(num_hidden_layers=0)),
                  ['"num_hidden_layers" is 0', "positive integer"]),
}
# A weights file that cannot be used as it is: the message names the file and the fix.
UNREADABLE = {
    "truncated": (dict(file_edit=_truncate), ["truncated or corrupt", "re-export"]),
    "random_bytes": (dict(file_edit=_random_bytes), ["truncated or corrupt", "re-export"]),
    "int_weight": (dict(tensor_edit=_int_weight),
                   ["'fc.weight' has dtype I32", "F32", "re-export"]),
    "float_partition": (dict(tensor_edit=lambda t: t.update(
        {"partition.token_order": t["partition.token_order"].float()})),
        ["'partition.token_order' has dtype F32", "I64"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_named(case, random_drafter, tmp_path):
    kwargs, needles = BAD[case]
    bad = _variant(random_drafter, tmp_path / case, **kwargs)
    with pytest.raises(CoralConfigError) as err:
        read_checkpoint(bad)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_two_layer_drafter_missing_a_layer_1_norm_is_named(target_dir, tmp_path):
    """A two-layer drafter passes; without its layer-1 input norm it fails, naming it."""
    from coral_vllm.model_store.drafter_init import init_drafter

    deep = init_drafter(target_dir, tmp_path / "deep", num_layers=2)
    assert read_checkpoint(deep).config["num_hidden_layers"] == 2
    bad = _variant(deep, tmp_path / "bad", tensor_edit=lambda t: t.pop(
        "layers.1.input_layernorm.weight"))
    with pytest.raises(CoralConfigError, match=r"'layers.1.input_layernorm.weight' is "
                       r'missing \(expected shape \[576\], config.json "num_hidden_layers" is 2'):
        read_checkpoint(bad)


@pytest.fixture(scope="module")
def unreadable(random_drafter, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unreadable")
    return {case: _variant(random_drafter, root / case, **kw)
            for case, (kw, _) in UNREADABLE.items()}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_weights_name_the_file(case, unreadable):
    with pytest.raises(CoralConfigError) as err:
        read_checkpoint(unreadable[case])
    assert str(err.value).startswith(str(unreadable[case] / "model.safetensors"))
    for needle in UNREADABLE[case][1]:
        assert needle in str(err.value), str(err.value)


def test_check_drafter_prints_one_line(unreadable, capsys):
    from coral_vllm.cli import main

    assert main(["check-drafter", str(unreadable["truncated"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated or corrupt" in err, err


def test_serve_exits_with_one_line_before_any_engine_starts(target_dir, unreadable):
    """`coral-vllm serve` with a truncated drafter: non-zero exit, the one line last on
    stderr, no traceback, and no engine process started."""
    import subprocess
    import sys

    spec = json.dumps({"method": "coral", "model": str(unreadable["truncated"]),
                       "num_speculative_tokens": 3})
    run = subprocess.run([sys.executable, "-m", "coral_vllm.cli", "serve", str(target_dir),
                          "--dtype", "float32", "--port", "0", "--speculative-config", spec],
                         capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 2, out[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("coral-vllm: error: ") and "truncated or corrupt" in last, last
    assert "Traceback" not in out and "EngineCore" not in out, out[-3000:]


def test_real_engine_refuses_unreadable_drafter_before_start(target_dir, unreadable):
    from vllm import LLM

    t0 = time.monotonic()
    with pytest.raises(CoralConfigError, match="'fc.weight' has dtype I32"):
        LLM(model=str(target_dir), dtype="float32", max_model_len=512,
            speculative_config={"method": "coral", "model": str(unreadable["int_weight"]),
                                "num_speculative_tokens": 2})
    assert time.monotonic() - t0 < 60, "error should come before any engine starts"


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CoralConfigError, match="does not exist"):
        read_checkpoint(tmp_path / "nope")


def test_target_mismatch_is_named(random_drafter):
    ckpt = read_checkpoint(random_drafter)
    with pytest.raises(CoralConfigError, match=r'"vocab_size" is 49152 but .* 50000 tokens'):
        check_against_target(ckpt, {"model_type": "llama", "vocab_size": 50000,
                                    "hidden_size": 576})
    with pytest.raises(CoralConfigError, match=r'"hidden_size" is 576 .* hidden size is 640'):
        check_against_target(ckpt, {"model_type": "llama", "vocab_size": 49152,
                                    "hidden_size": 640})


def _drafter_for_other_target(src: Path, dst: Path, vocab: int, hidden: int) -> Path:
    """A self-consistent drafter (passes its own checks) made for another target."""
    from coral_vllm.model_store.drafter_init import init_drafter

    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("coral")
    cfg.update(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
               num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4)
    other = dst.parent / f"{dst.name}-target"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(cfg))
    return init_drafter(other, dst, num_groups=8, top_k_groups=2)


@pytest.mark.parametrize("vocab,hidden,needle", [(32000, 576, '"vocab_size" is 32000'),
                                                 (49152, 256, '"hidden_size" is 256')])
def test_real_engine_refuses_mismatched_drafter_before_start(target_dir, tmp_path, vocab,
                                                             hidden, needle, random_drafter):
    """Through vLLM's own front end: the error comes from the coral plugin, fast."""
    from vllm import LLM

    bad = _drafter_for_other_target(random_drafter, tmp_path / "other", vocab, hidden)
    t0 = time.monotonic()
    with pytest.raises(CoralConfigError, match=needle):
        LLM(model=str(target_dir), dtype="float32", max_model_len=512,
            speculative_config={"method": "coral", "model": str(bad),
                                "num_speculative_tokens": 2})
    assert time.monotonic() - t0 < 60, "error should come before any engine starts"


def test_real_engine_refuses_missing_model_key(target_dir):
    from vllm import LLM

    with pytest.raises(CoralConfigError, match='"model" is missing'):
        LLM(model=str(target_dir), dtype="float32", max_model_len=512,
            speculative_config={"method": "coral", "num_speculative_tokens": 2})
