"""A safetensors file laid out up front and filled tensor by tensor, from several threads.

`safetensors.torch.save_file` needs every tensor in memory at once and writes them after
the last one exists. A converter that produces tensors one at a time, in parallel (GGUF
dequantisation), knows every name, shape and dtype before it computes any of them: the
header can be written first and each tensor copied to its own byte range as soon as it is
ready (`os.pwrite`, which threads may call on one descriptor side by side). Memory then
holds only the tensors in flight, and writing overlaps computing.

The layout is the format's (https://github.com/huggingface/safetensors): an 8-byte
little-endian header length, the JSON header padded with spaces to a multiple of 8, then
the tensors back to back in header order with no gaps; safetensors' own reader checks all
of that when the file is opened.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class SafetensorsFile:
    """`with SafetensorsFile(path, {name: (shape, dtype)}) as f: f.write(name, tensor)`.

    Leaving the block checks that every tensor was written exactly once; a file left
    incomplete by an error is deleted, never left looking whole."""

    def __init__(self, path: str | os.PathLike[str],
                 layout: Mapping[str, tuple[Sequence[int], torch.dtype]],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._ranges: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, (shape, dtype) in layout.items():
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"{name}: dtype {dtype} is not one of {list(DTYPE_NAMES)}")
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._ranges[name] = (offset, size, tuple(shape), dtype)
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._data_start = 8 + len(text)
        self._head = struct.pack("<Q", len(text)) + text
        self._total = self._data_start + offset
        self._written: set[str] = set()
        self._fd = -1

    def __enter__(self) -> "SafetensorsFile":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self._total)
        self._pwrite(self._head, 0)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Copies `tensor` (the layout's shape and dtype) to its byte range."""
        if self._fd < 0:
            raise RuntimeError(f"{self.path}: written to after it was closed")
        offset, size, shape, dtype = self._ranges[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the layout "
                             f"says {shape} {dtype}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == size
        self._pwrite(memoryview(data), self._data_start + offset)
        self._written.add(name)

    def _pwrite(self, buf: bytes | memoryview, offset: int) -> None:
        view = memoryview(buf).cast("B")
        while view:  # one pwrite moves at most ~2 GiB on Linux
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        os.close(self._fd)
        self._fd = -1
        missing = [n for n in self._ranges if n not in self._written]
        if exc_type is not None or missing:
            self.path.unlink(missing_ok=True)
        if exc_type is None and missing:
            raise RuntimeError(f"{self.path}: tensors never written: {missing[:5]}")
