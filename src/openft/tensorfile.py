"""safetensors files written tensor by tensor, straight from each tensor's memory.

`safetensors.torch.save_file` first turns every tensor into a bytes object: a
second copy of everything it writes, held at once (1 GB more for full
fine-tuning's AdamW state at every checkpoint, as much again for a cast model's
weight cache), and written while holding the GIL. Here each tensor's own bytes
go to the file through a memoryview, so `write` releases the GIL as it copies.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` as a safetensors file at `path`. Same format as the
    library's: an 8-byte header length, the JSON header (padded to 8 bytes), then
    the tensors back to back, widest dtypes first so each stays aligned."""
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, dict] = {}
    offset = 0
    for n in names:
        t = tensors[n]
        size = t.numel() * t.element_size()
        header[n] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for n in names:
            t = tensors[n].detach().cpu().contiguous()  # a copy only of a tensor that is not already so
            if t.numel():
                f.write(raw_bytes(t))


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy (any dtype, bf16 included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
