"""A GGUF file -> an HF model directory that vLLM and transformers load: safetensors
weights (float32 or bfloat16), config.json, the tokenizer with its chat template, and
generation_config.json.

Two converters write the same directory (tested tensor by tensor, `tests/test_gguf_convert.py`):

- `direct` (architectures in DIRECT_ARCHITECTURES): every GGUF tensor is dequantised with
  the `gguf` package (numpy; the function transformers' GGUF loader calls too), renamed to
  its HF name, un-permuted where llama.cpp permuted it, cast to the dtype and copied into
  a safetensors file laid out up front (`SafetensorsFile`), by a pool of threads. No model
  is built; the metadata (config, tokenizer) is read at the same time, in two processes
  of their own: transformers parses a GGUF's metadata in pure Python (tens of seconds for
  Qwen's 152k vocabulary), which in threads took turns on the GIL with each other and
  with the dequantising.
- `transformers` (anything transformers' GGUF loader reads, e.g. Gemma-3, whose norms
  llama.cpp stores shifted by one): it loads the model from the GGUF and, since
  transformers refuses `save_pretrained` on such a model, copies the state dict into a
  fresh model of the same config and saves that. On an H200 host this took 121 s for
  Qwen2.5-Coder-1.5B (two float32 models built, 6 GB written).

config.json and the tokenizer come from transformers' GGUF metadata reader in both; the
tokenizer gets the GGUF's add_bos/add_eos flags, which that reader drops, and the
generation config's stop ids include a chat model's end-of-turn token.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from concurrent.futures import (FIRST_EXCEPTION, Future, ProcessPoolExecutor,
                                ThreadPoolExecutor, wait)
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# Weight dtypes a target is written in (torch attribute names); torch is imported only
# once a conversion runs, so that the CLI can name these without loading it.
DTYPES = ("float32", "bfloat16")
# Architectures (GGUF `general.architecture`) whose tensors the direct converter names.
DIRECT_ARCHITECTURES = ("llama", "qwen2")
CONVERTERS = ("auto", "direct", "transformers")  # auto: direct where it can, else transformers
WEIGHTS_FILE = "model.safetensors"

# GGUF tensor name parts -> HF (Llama / Qwen2 layout); suffix .weight or .bias kept.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


def convert_gguf(gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 dtype: str, end_of_turn: str | None = None, converter: str = "auto",
                 workers: int | None = None) -> str:
    """Writes the HF directory `out` from `gguf_path` (replacing it only once complete)
    and returns the converter that did it. `dtype`: a DTYPES key; `converter`: a
    CONVERTERS entry; `workers`: threads that dequantise in the direct converter
    (default: one per core)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {list(DTYPES)}")
    if converter not in CONVERTERS:
        raise ValueError(f"converter {converter!r}: choose one of {list(CONVERTERS)}")
    import torch
    from gguf import GGUFReader

    start = time.perf_counter()
    gguf_path, out = Path(gguf_path), Path(out)
    reader = GGUFReader(str(gguf_path))
    arch = str(reader.fields["general.architecture"].contents())
    if converter == "auto":
        converter = "direct" if arch in DIRECT_ARCHITECTURES else "transformers"
    if converter == "direct" and arch not in DIRECT_ARCHITECTURES:
        raise ValueError(f"{gguf_path}: architecture {arch!r}; the direct converter knows "
                         f"{list(DIRECT_ARCHITECTURES)}: use converter 'transformers'.")
    tmp_out = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tmp_out.mkdir(parents=True)
    if converter == "direct":
        _convert_direct(reader, gguf_path, tmp_out, getattr(torch, dtype), workers)
    else:
        _convert_transformers(gguf_path, tmp_out, getattr(torch, dtype))
        write_tokenizer(gguf_path, special_token_flags(reader.fields), tmp_out)
    fix_generation_config(tmp_out, end_of_turn)
    print(f"[coral-vllm] {converter} conversion to {dtype}: "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)
    return converter


# ------------------------------------------------------------------------- metadata
def load_config(gguf_path: Path, dtype: torch.dtype) -> Any:
    """The HF config transformers reads from the GGUF, as its loaded model would save it:
    with its architecture and dtype, without a quantization config."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = dtype
    return config


def special_token_flags(fields: Any) -> dict[str, bool]:
    """The GGUF's add_bos/add_eos flags (`fields`: its metadata) that it sets, e.g.
    {"add_bos_token": True}; transformers' GGUF loader drops them (5.19), and without
    them Gemma would lose the <bos> it is trained to start with."""
    return {f"add_{t}_token": bool(fields[f"tokenizer.ggml.add_{t}_token"].contents())
            for t in ("bos", "eos") if f"tokenizer.ggml.add_{t}_token" in fields}


def write_tokenizer(gguf_path: Path, flags: dict[str, bool], out: Path) -> None:
    """Saves the tokenizer (chat template included) with `flags` set (from
    `special_token_flags`; each rewrites tokenizer.json's post-processor)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for name, value in flags.items():
        setattr(tokenizer, name, value)
    tokenizer.save_pretrained(out)


def fix_generation_config(path: Path, end_of_turn: str | None) -> None:
    """GGUF conversion leaves a chat model's end-of-turn token out of the stop ids."""
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)  # the one written there
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    eos = {tokenizer.eos_token_id}
    if end_of_turn is not None:
        end_turn = tokenizer.convert_tokens_to_ids(end_of_turn)
        if isinstance(end_turn, int) and end_turn != tokenizer.unk_token_id:
            eos.add(end_turn)
    gen["eos_token_id"] = sorted(i for i in eos if i is not None)
    gen_file.write_text(json.dumps(gen, indent=2) + "\n")


def _write_config(config: Any, out: Path) -> None:
    """config.json and the generation config a model of this config saves."""
    from transformers import GenerationConfig

    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)


# ---------------------------------------------------------------------- transformers
def _convert_transformers(gguf_path: Path, out: Path, dtype: torch.dtype) -> None:
    """The weights, config.json and generation_config.json, through a loaded model."""
    from transformers import AutoModelForCausalLM

    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(quantised.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the GGUF state dict
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.save_pretrained(out, safe_serialization=True)


# ---------------------------------------------------------------------------- direct
def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.bias` -> `model.layers.3.self_attn.q_proj.bias`, `output.weight` ->
    `lm_head.weight`; a name outside the Llama/Qwen2 layout is refused."""
    parts = gguf_name.split(".")
    try:
        if parts[0] == "blk" and len(parts) == 4:
            return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
        if len(parts) == 2:
            return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    except (KeyError, ValueError):
        pass
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in the Llama/Qwen2 layout the "
                     "direct converter writes; convert with converter 'transformers'.")


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's `LlamaModel.permute` of a q or k projection (its rows go from
    rotate-half to interleaved RoPE pairs); `n_head` is the projection's own head count.
    transformers' `LlamaTensorProcessor` does the same; qwen2 GGUFs are not permuted."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def _permuted_heads(fields: Any, arch: str) -> dict[str, int]:
    """Per projection llama.cpp permuted, the head count it permuted by (the GGUF's own
    fields, which transformers maps to num_attention_heads / num_key_value_heads)."""
    if arch != "llama":
        return {}
    return {"attn_q": int(fields["llama.attention.head_count"].contents()),
            "attn_k": int(fields["llama.attention.head_count_kv"].contents())}


def _convert_direct(reader: Any, gguf_path: Path, out: Path, dtype: torch.dtype,
                    workers: int | None) -> None:
    """The weights, config.json, generation_config.json and the tokenizer, without
    building a model. Every tensor's name and shape, hence the file's layout, is in the
    GGUF's tensor index; the config and the tokenizer (pure Python parses of the GGUF) are
    read by two processes (spawned: the parent holds threads) while threads dequantise
    (numpy, which releases the GIL)."""
    import torch
    from gguf import dequantize

    from coral_vllm.model_store.safetensors_file import SafetensorsFile

    arch = str(reader.fields["general.architecture"].contents())
    permuted = _permuted_heads(reader.fields, arch)
    tensors = {hf_tensor_name(t.name): t for t in reader.tensors}
    layout = {name: (tuple(int(x) for x in reversed(t.shape)), dtype)
              for name, t in sorted(tensors.items())}

    def convert(name: str) -> None:
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type)
        block_part = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if block_part in permuted:
            w = unpermute_qk(w, permuted[block_part])
        if not w.flags.writeable:  # an F32 tensor: a view of the GGUF's memory map
            w = w.copy()
        f.write(name, torch.from_numpy(w).reshape(layout[name][0]).to(dtype))

    # `workers` threads dequantise; torch's own threads would multiply with them (each
    # cast would start a team of one per core)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as meta, \
                ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            tokenizer = meta.submit(write_tokenizer, gguf_path,
                                    special_token_flags(reader.fields), out)
            config = meta.submit(load_config, gguf_path, dtype)
            with SafetensorsFile(out / WEIGHTS_FILE, layout) as f:
                biggest_first = sorted(tensors, key=lambda n: -tensors[n].n_elements)
                _finish_all([pool.submit(convert, name) for name in biggest_first])
            config, _ = config.result(), tokenizer.result()
    finally:
        torch.set_num_threads(torch_threads)
    _check_layout(config, layout)
    _write_config(config, out)


def _finish_all(jobs: list[Future]) -> None:
    """Waits for every job; after a failure, cancels the jobs not started and waits for
    the running ones (they write into the open file) before raising the failure."""
    wait(jobs, return_when=FIRST_EXCEPTION)
    for job in jobs:
        job.cancel()
    wait(jobs)
    for job in jobs:
        if not job.cancelled() and job.exception() is not None:
            raise job.exception()


def _check_layout(config: Any, layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """The GGUF's tensors are exactly the HF model's (built on the meta device: no
    memory), with its shapes; a tied head is the embedding, not a tensor of its own."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    have = {k: shape for k, (shape, _) in layout.items()}
    if want != have:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise ValueError(f"the GGUF's tensors do not make a {config.architectures[0]}: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}, other shapes "
                         f"{[(k, have[k], want[k]) for k in shapes[:5]]}; convert with "
                         "converter 'transformers'.")
