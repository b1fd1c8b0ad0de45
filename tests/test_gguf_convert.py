"""GGUF -> HF directory: the direct converter against the transformers one (SmolLM2,
tensor by tensor, and every other file), a GGUF recognised by its sha256, and the
GPU-host staging of a GGUF in pieces (`gguf-pieces`, scripts/stage_gguf.sh)."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from coral_vllm.model_store import targets
from coral_vllm.model_store.gguf_convert import convert_gguf, hf_tensor_name, unpermute_qk
from coral_vllm.model_store.safetensors_file import SafetensorsFile

SMOLLM2 = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory) -> Path:
    return targets.gguf_from_packages(SMOLLM2, tmp_path_factory.mktemp("gguf") /
                                          "smollm2.gguf")


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def _first_blocks(gguf_path: Path, blocks: int, dest: Path) -> Path:
    """`gguf_path` cut to its first `blocks` transformer blocks: the same metadata
    (block count changed), tokenizer and quantized tensors, byte for byte. Both converters
    do per block what they do for all of them, at a fraction of the time."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(gguf_path)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(dest), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = blocks if name == f"{arch}.block_count" else field.contents()
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < blocks:
            writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape,
                              raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def test_direct_conversion_equals_the_transformers_conversion(smollm2_gguf, tmp_path):
    """The direct converter (float32) writes what the transformers path writes, on
    SmolLM2's own GGUF cut to two blocks: every tensor equal, config, generation config,
    tokenizer and chat template byte for byte. (The whole model goes through the direct
    converter in every set-up: `fetch-model` in scripts/setup.sh.)"""
    cut = _first_blocks(smollm2_gguf, 2, tmp_path / "cut.gguf")
    direct, reference = tmp_path / "direct", tmp_path / "transformers"
    kw = {"dtype": "float32", "end_of_turn": "<|im_end|>"}
    assert convert_gguf(cut, direct, converter="auto", **kw) == "direct"
    assert convert_gguf(cut, reference, converter="transformers", **kw) == "transformers"
    got, want = _tensors(direct), _tensors(reference)
    assert got.keys() == want.keys() and len(got) == 2 * 9 + 2
    for name, tensor in want.items():
        assert tensor.dtype == torch.float32 and torch.equal(got[name], tensor), name
    assert json.loads((direct / "config.json").read_text())["num_hidden_layers"] == 2
    files = {p.name for p in reference.iterdir() if p.suffix != ".safetensors"}
    assert {p.name for p in direct.iterdir() if p.suffix != ".safetensors"} == files
    for name in files:
        assert filecmp.cmp(direct / name, reference / name, shallow=False), name


def test_fetch_model_names_a_gguf_by_its_sha256(smollm2_gguf, tmp_path, monkeypatch):
    """`fetch-model --gguf FILE` with no name: the file's sha256 says it is SmolLM2, so
    it is converted into SmolLM2's cache folder with SmolLM2's dtype and end of turn."""
    monkeypatch.setenv("CORAL_VLLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf, out, **kw):
        calls.append((Path(gguf), Path(out), kw))
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")

    monkeypatch.setattr(targets, "convert_gguf", convert)
    out = targets.fetch_model(gguf=smollm2_gguf)
    spec = targets.known_model(SMOLLM2)
    assert out == tmp_path / "cache" / "models" / SMOLLM2
    assert calls == [(smollm2_gguf, out, {"dtype": spec.dtype, "end_of_turn":
                                          spec.end_of_turn, "converter": "auto"})]
    assert targets.fetch_model(gguf=smollm2_gguf) == out and len(calls) == 1


def test_cache_dirs_and_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("CORAL_VLLM_CACHE", str(tmp_path))
    assert targets.model_dir("qwen2.5-coder-1.5b-instruct") == \
        targets.model_dir("qwen2.5-coder-1.5b-instruct", "bfloat16")
    assert targets.model_dir(SMOLLM2, "bfloat16").name == f"{SMOLLM2}-bfloat16"
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF but no known model")
    with pytest.raises(ValueError, match="no known model's GGUF; known: .*qwen2.5-coder"):
        targets.fetch_model(gguf=other)
    with pytest.raises(ValueError, match="architecture 'gemma3'.*converter 'transformers'"):
        convert_gguf(_gguf_of("gemma3", tmp_path / "g.gguf"), tmp_path / "g",
                     dtype="float32", converter="direct")
    with pytest.raises(ValueError, match="'blk.0.attn_q_norm.weight' has no place"):
        hf_tensor_name("blk.0.attn_q_norm.weight")
    assert hf_tensor_name("blk.27.attn_k.bias") == "model.layers.27.self_attn.k_proj.bias"
    assert hf_tensor_name("output.weight") == "lm_head.weight"


def _gguf_of(arch: str, path: Path) -> Path:
    """A one-tensor GGUF of architecture `arch`."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unpermute_undoes_llama_cpp_permutation():
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), then `unpermute_qk`."""
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)  # 8 heads of 4 rows
    permuted = w.reshape(8, 2, 2, 3).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_qk(permuted, 8), w)


def test_safetensors_file_any_order_and_an_incomplete_one_is_removed(tmp_path):
    """Tensors written in any order (bf16 too: the direct converter's default for Qwen)
    read back equal; a file left incomplete is deleted, not left looking whole."""
    layout = {"a": ((2, 3), torch.float32), "b": ((4,), torch.bfloat16)}
    with pytest.raises(RuntimeError, match=r"never written: \['b'\]"):
        with SafetensorsFile(tmp_path / "x.safetensors", layout) as f:
            f.write("a", torch.ones(2, 3))
    assert not (tmp_path / "x.safetensors").exists()
    with SafetensorsFile(tmp_path / "y.safetensors", layout) as f:
        f.write("b", torch.arange(4).to(torch.bfloat16))
        f.write("a", torch.ones(2, 3))
    got = _tensors(tmp_path)
    assert torch.equal(got["a"], torch.ones(2, 3))
    assert torch.equal(got["b"], torch.arange(4).to(torch.bfloat16))


def test_pieces_stage_on_the_host_in_any_order(smollm2_gguf, tmp_path):
    """`coral-vllm gguf-pieces`, then scripts/stage_gguf.sh per piece as the GPU host
    runs it: out of order and repeated, a corrupt piece refused, the whole file joined
    and sha256-checked once all are there (conversion needs the vLLM bundle: absent)."""
    from coral_vllm.cli import main

    assert main(["gguf-pieces", SMOLLM2, "--gguf", str(smollm2_gguf), "--out",
                 str(tmp_path / "pieces"), "--piece-bytes", "30000000"]) == 0
    pieces = sorted((tmp_path / "pieces" / SMOLLM2).iterdir())
    assert [p.name for p in pieces] == ["p00", "p01", "p02", "p03"]
    env = {**os.environ, "CORAL_GGUF_STORE": str(tmp_path / "store"),
           "CORAL_SITE": str(tmp_path / "no-bundle")}

    def stage(piece: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "scripts/stage_gguf.sh", str(piece)], cwd=REPO,
                              env=env, capture_output=True, text=True)

    bad = shutil.copytree(pieces[1], tmp_path / "bad" / "p01")
    with open(bad / f"{SMOLLM2}.gguf.p01", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    run = stage(bad)
    assert run.returncode == 1 and "p01: sha256 differs" in run.stdout
    for piece, missing in [(pieces[2], "p00 p01 p03"), (pieces[0], "p01 p03"),
                           (pieces[0], "p01 p03"), (pieces[3], "p01")]:
        run = stage(piece)
        assert run.returncode == 0 and f"still missing {missing}" in run.stdout, run.stdout
    for _ in range(2):  # the last piece joins; any piece again changes nothing
        run = stage(pieces[1])
        assert run.returncode == 0 and "stage the vLLM bundle" in run.stdout, run.stdout
    joined = tmp_path / "store" / SMOLLM2 / f"{SMOLLM2}.gguf"
    assert sorted(p.name for p in joined.parent.iterdir()) == [joined.name]
    assert targets.identify_gguf(joined).name == SMOLLM2
