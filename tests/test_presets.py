"""``local_sgd_optim.presets``: the DiLoCo outer optimizer, checked against its formula and, on
one rank, against AdamW with a Nesterov outer step written out by hand."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from local_sgd_optim import LocalSGDOptimizer
from local_sgd_optim.presets import diloco


def test_defaults_are_the_benchmarks_winner() -> None:
    # benchmarks/convergence_lm.py --regime published: outer lr 0.8, momentum 0.5 (BENCHMARKS.md).
    opt = diloco()([torch.zeros(3, requires_grad=True)])
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.8, 0.5, True)
    assert group["weight_decay"] == 0 and group["dampening"] == 0


def test_picklable_and_keeps_its_settings() -> None:
    factory = pickle.loads(pickle.dumps(diloco(lr=0.5, momentum=0.8)))
    group = factory([torch.zeros(2, requires_grad=True)]).param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.5, 0.8, True)


@pytest.mark.parametrize(("lr", "momentum"), [(0.0, 0.9), (-1.0, 0.9), (0.7, 1.0), (0.7, -0.1)])
def test_bad_values_are_refused(lr: float, momentum: float) -> None:
    with pytest.raises(ValueError, match=r"lr must be positive|momentum must be in"):
        diloco(lr=lr, momentum=momentum)


def test_zero_momentum_is_plain_sgd() -> None:
    p = torch.ones(3, requires_grad=True)
    opt = diloco(lr=1.0, momentum=0.0)([p])
    p.grad = torch.full((3,), 0.25)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.75))


def test_nesterov_steps_match_the_formula() -> None:
    p = torch.zeros(4, requires_grad=True)
    lr, momentum = 0.6, 0.9
    opt = diloco(lr=lr, momentum=momentum)([p])
    expected, buffer = torch.zeros(4), torch.zeros(4)
    for g in (torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([0.3, 0.3, -1.0, 2.0])):
        p.grad = g.clone()
        opt.step()
        buffer = momentum * buffer + g
        expected -= lr * (g + momentum * buffer)
        torch.testing.assert_close(p.detach(), expected)


def test_one_rank_is_adamw_with_a_nesterov_outer_step(single_rank_group) -> None:
    """On one rank the mean is the rank's own parameters: DiLoCo is Lookahead with Nesterov."""
    period, rounds, lr, momentum = 4, 3, 0.6, 0.9
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    reference = nn.Linear(5, 3)
    reference.load_state_dict(net.state_dict())
    data = [(torch.randn(8, 5), torch.randn(8, 3)) for _ in range(period * rounds)]

    opt = LocalSGDOptimizer(
        torch.optim.AdamW(net.parameters(), lr=1e-2),
        net,
        period=period,
        outer_optimizer=diloco(lr=lr, momentum=momentum),
    )
    for x, y in data:
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    opt.close()

    inner = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    kept = [p.detach().clone() for p in reference.parameters()]
    buffers = [torch.zeros_like(p) for p in kept]
    for i, (x, y) in enumerate(data):
        nn.functional.mse_loss(reference(x), y).backward()
        inner.step()
        inner.zero_grad()
        if (i + 1) % period == 0:
            with torch.no_grad():
                for p, k, b in zip(reference.parameters(), kept, buffers):
                    g = k - p
                    b.mul_(momentum).add_(g)
                    k.sub_(lr * (g + momentum * b))
                    p.copy_(k)
    for ours, theirs in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)
    assert opt.averaging_rounds == rounds
