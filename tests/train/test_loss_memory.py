"""A 262k vocabulary (Gemma 3) never has its full logits in memory: the LM-head
loss, trained and evaluated, peaks far below the (tokens x vocab) logits it
would otherwise build. Measured as the peak RSS of a fresh process (torch's CPU
tensors live outside Python's allocator, so tracemalloc would not see them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from openft.train.loss import KEPT_ELEMENTS, TILE_ELEMENTS, tile_shape

VOCAB, TOKENS, HIDDEN = 262144, 512, 64
FULL_LOGITS_MIB = TOKENS * VOCAB * 4 / 2**20  # 512 MiB in fp32
# One tile's logits (512 rows x 12288 columns: 24 MiB in fp32) and small temporaries.
# Two tiles alive at once, or a tile of every row against the whole vocabulary, fail it.
BOUND_MIB = 80

SCRIPT = r"""
import json, resource, sys
import torch
from openft.train.loss import head_loss

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

V, N, H = (int(a) for a in sys.argv[1:4])
torch.manual_seed(0)
head = torch.nn.Linear(H, V, bias=False)  # 64 MiB, frozen as LoRA's head is
head.weight.requires_grad_(False)
rows = torch.randn(N, H, requires_grad=True)
y = torch.randint(0, V, (N,))
# First calls initialise torch's kernels and thread pools: not the loss's memory.
head_loss(head, rows[:8], y[:8])[0].backward()
rows.grad = None
base = peak_mib()
loss, correct = head_loss(head, rows, y)
loss.backward()
train = peak_mib() - base
with torch.no_grad():
    eval_loss, _ = head_loss(head, rows, y)
both = peak_mib() - base
print(json.dumps({"train_mib": train, "train_and_eval_mib": both, "loss": float(loss),
                  "eval_loss": float(eval_loss), "grad_norm": float(rows.grad.norm())}))
"""


def test_tiles_of_a_large_vocabulary_stay_within_the_budget():
    for n, vocab in ((512, VOCAB), (48, VOCAB), (4096, VOCAB), (7, 50), (512, 49152), (100_000, 151936)):
        rows, cols = tile_shape(n, vocab)
        assert rows * cols <= TILE_ELEMENTS, (n, vocab)
        # A block takes as many of the call's rows as the budget allows: no narrower blocks.
        assert rows == min(n, TILE_ELEMENTS // cols), (n, vocab, rows, cols)
    assert tile_shape(512, VOCAB) == (512, 12288)  # every row at once: one pass over the weight
    assert tile_shape(7, 50) == (7, 50)  # a tiny head: one tile
    assert tile_shape(100_000, 151936) == (512, 12288)  # more rows: more blocks, the same tiles
    assert tile_shape(300, VOCAB)[1] == tile_shape(500, VOCAB)[1]  # the width is the vocabulary's alone
    # A trained head keeps a block's tiles for its second pass: the block's rows are capped.
    rows, _ = tile_shape(512, VOCAB, keep=True)
    assert rows == 256 and rows * VOCAB <= KEPT_ELEMENTS
    assert tile_shape(512, 49152, keep=True)[0] == 512


def test_the_loss_on_a_262k_vocabulary_never_materialises_full_logits():
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OPENFT_MALLOC": "system"}
    env.pop("LD_PRELOAD", None)  # the system's malloc: freed chunks go back, so the peak is the loss's own
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(VOCAB), str(TOKENS), str(HIDDEN)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # A plain mean CE over uniform-ish logits of a random head: about log(V) per token, summed.
    assert abs(out["loss"] - out["eval_loss"]) <= 1e-3 * abs(out["loss"])
    assert out["grad_norm"] > 0
    assert out["train_mib"] < BOUND_MIB, (out, f"full logits would be {FULL_LOGITS_MIB:.0f} MiB")
    assert out["train_and_eval_mib"] < BOUND_MIB, out
