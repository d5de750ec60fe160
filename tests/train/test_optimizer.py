"""The training optimizer: fused AdamW where available, the same update as the plain one."""

from __future__ import annotations

import torch

from openft.train.recipe import make_optimizer


def _run(opt_factory, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    params = list(model.parameters())
    opt = opt_factory(params)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params]


def test_fused_adamw_matches_plain_adamw():
    ours = _run(lambda ps: make_optimizer(ps, 1e-2, 0.01))
    plain = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, foreach=False))
    start = _run(lambda ps: make_optimizer(ps, 1e-2, 0.01), steps=0)
    for a, b, s in zip(ours, plain, start):
        assert not torch.equal(a, s)  # it trained
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_fused_kernel_is_used_on_cpu():
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], 1e-3, 0.0)
    assert opt.defaults.get("fused") is True
