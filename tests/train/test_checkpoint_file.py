"""Checkpoints and the weight cache are written by openft's streaming safetensors writer."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from openft.tensorfile import write_safetensors


def test_streamed_file_loads_back_exactly_with_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(5, 3, generator=g),
        "half": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "step": torch.tensor([3.0]),
        "ids": torch.arange(5, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g).t(),  # not contiguous: written in logical order
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(tensors, path)
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0  # the data starts 8-byte aligned, as safetensors' own writer leaves it
    with safe_open(str(path), "pt") as f:  # the lazy reader agrees too
        assert torch.equal(f.get_tensor("ids"), tensors["ids"])


def test_writer_copies_nothing_already_contiguous(tmp_path, monkeypatch):
    # The point of the writer: a 1 GB optimizer state is not duplicated in memory
    # while it is written. Each tensor's own buffer is what reaches the file.
    seen: list[int] = []
    import openft.tensorfile as ck

    real = ck.raw_bytes
    monkeypatch.setattr(ck, "raw_bytes", lambda t: (seen.append(t.data_ptr()), real(t))[1])
    tensors = {"a": torch.randn(100), "b": torch.randn(10, 10)}
    write_safetensors(tensors, tmp_path / "x.safetensors")
    assert sorted(seen) == sorted(t.data_ptr() for t in tensors.values())
