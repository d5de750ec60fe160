"""The embedding and head split by vocabulary rows (`openft.train.vocab_parallel`)
on 2 real gloo ranks, against one process holding the whole tables: each rank's
loss, its rows' gradient and its slice of both tables' gradients equal the
single-process computation over both ranks' tokens (FSDP2's convention: the mean
over ranks of each rank's gradient), with an uneven split (an odd vocabulary), a
padding row, a rank whose batch is a spare one (scaled by 0), and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from openft.train import vocab_parallel
from openft.train.loss import head_loss

V, H, PAD = 37, 8, 3
LENGTHS = (5, 9)  # tokens of rank 0 and rank 1


def _tables() -> tuple[nn.Embedding, nn.Linear]:
    torch.manual_seed(0)
    emb = nn.Embedding(V, H, padding_idx=PAD)
    head = nn.Linear(H, V, bias=False)
    return emb, head


def _ids() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, V, (n,), generator=g) for n in LENGTHS]
    ids[1][2] = PAD
    return ids


def _loss(emb, head, ids):
    rows = torch.tanh(emb(ids)) * 2.0  # something between the tables, with a gradient
    y = (ids * 7 + 1) % V
    return head_loss(head, rows, y)


def _reference(scales: tuple[float, float], bf16: bool) -> dict:
    emb, head = _tables()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for ids, scale in zip(_ids(), scales):
            loss, _ = _loss(emb, head, ids)
            (loss * scale / 2).backward()  # what the mean over 2 ranks of their gradients is
    return {"emb": emb.weight.grad, "head": head.weight.grad}


def _rank(rank: int, store: str, scales, bf16: bool, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh

    from openft.mapped import FileMaps

    mesh = init_device_mesh("cpu", (2,))
    emb, head = _tables()
    vocab_parallel.shard_embedding(emb, mesh, FileMaps())
    vocab_parallel.shard_head(head, mesh, FileMaps())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, correct = _loss(emb, head, _ids()[rank])
    (loss * scales[rank]).backward()
    torch.save(
        {"loss": float(loss), "emb": emb.weight.grad.to_local(), "head": head.weight.grad.to_local()},
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("scales", "bf16"),
    [((1.0, 1.0), False), ((1.0, 0.0), False), ((0.5, 0.5), False), ((1.0, 1.0), True)],
    ids=["chunked-loss", "spare-batch", "half-scale", "bf16"],
)
def test_two_ranks_split_by_rows_equal_one_process(scales, bf16, tmp_path):
    out = str(tmp_path / "grads")
    mp.start_processes(_rank, args=(str(tmp_path / "store"), scales, bf16, out), nprocs=2, start_method="spawn")
    ref = _reference(scales, bf16)
    emb, head = _tables()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        lo = vocab_parallel.first_row(V, 2, rank)
        hi = vocab_parallel.first_row(V, 2, rank + 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            want_loss, _ = _loss(emb, head, _ids()[rank])
        tol = 2e-2 if bf16 else 1e-5
        assert got["loss"] == pytest.approx(float(want_loss.detach()), rel=tol)
        assert got["emb"].shape[0] == hi - lo
        torch.testing.assert_close(got["emb"], ref["emb"][lo:hi], rtol=tol, atol=tol * 1e-1)
        torch.testing.assert_close(got["head"], ref["head"][lo:hi], rtol=tol, atol=tol * 1e-1)
    assert float(ref["emb"][PAD].abs().sum()) == 0.0  # the padding row's gradient stays zero here too
