"""``LocalSGDOptimizer.global_model()``: inside the block every rank holds the mean of the ranks
(running statistics averaged, other buffers rank 0's); after it, each rank's own values, and
training continues bitwise as without the block, with an outer optimizer, 16-bit deltas and
rounds in flight too. On 2 gloo ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _common import rank
from torch import nn

from local_sgd_optim import LocalSGDOptimizer


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 3)
        self.register_buffer("table", torch.zeros(4))  # not a statistic: rank 0's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.bn(self.fc(x))))


def _outer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def _state(model: nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).double() for v in model.state_dict().values()])


def _train(look: bool, settings: dict[str, Any]) -> dict[str, Any]:
    model = _Net()
    opt = LocalSGDOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model, 4, **settings)
    with torch.no_grad():
        model.table.fill_(float(rank()))  # apart until the first round copies rank 0's
    g = torch.Generator().manual_seed(rank())
    seen: list[dict[str, Any]] = []
    for step in range(14):
        if look and step % 3 == 0:  # before the first step too
            own = _state(model)
            mean = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
            torch.distributed.all_reduce(mean)
            mean /= 2
            with opt.global_model() as inside:
                assert inside is model
                gathered = [torch.empty_like(own) for _ in range(2)]
                torch.distributed.all_gather(gathered, _state(model))
                params = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
                seen.append(
                    {
                        "identical": torch.equal(gathered[0], gathered[1]),
                        "mean": float((params - mean).abs().max()),
                        "table": model.table.tolist(),
                    }
                )
            seen[-1]["restored"] = torch.equal(_state(model), own)
        model(torch.randn(8, 6, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    before_close = _state(model)
    opt.close()
    return {
        "seen": seen,
        "before_close": before_close,
        "final": _state(model),
        "counters": (opt.optimizer_steps, opt.averaging_rounds, opt.stats.rounds),
        "base": opt.base_optimizer.state_dict()["state"][0]["exp_avg"].clone(),
    }


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"outer_optimizer": _outer, "comm_dtype": torch.bfloat16},
        {"outer_optimizer": _outer, "overlap_steps": 1},
        {"parameters_as_bucket_view": True},
    ],
    ids=["plain", "diloco-bf16", "diloco-overlap", "placed"],
)
def test_the_global_model_changes_no_rank(ranks: Any, settings: dict[str, Any]) -> None:
    quiet = ranks.run(_train, False, settings)
    looked = ranks.run(_train, True, settings)
    for r in (0, 1):
        for key in ("before_close", "final", "base"):
            assert torch.equal(looked[r][key], quiet[r][key]), (r, key)
        assert looked[r]["counters"] == quiet[r]["counters"]
        assert len(looked[r]["seen"]) == 5
        for seen in looked[r]["seen"]:
            assert seen["identical"] and seen["restored"]
            assert seen["mean"] < 1e-6  # the parameters are the ranks' mean
            assert seen["table"] == [0.0] * 4  # not a statistic: rank 0's, from the start
    assert not torch.equal(looked[0]["before_close"], looked[1]["before_close"])  # apart
    assert torch.equal(looked[0]["final"], looked[1]["final"])
