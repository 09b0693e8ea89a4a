"""``torch.compile`` and LocalSGDOptimizer on CPU: a compiled module shares the original's
parameters, so the wrapper averages what the compiled graph reads and trains.

Each check trains a compiled model and an eager reference side by side, with the same seeds and
batches, and compares them after every step. The 2-rank checks use the ``aot_eager`` backend
(Dynamo graph capture and AOTAutograd, no code generation: about 1.5 s to compile here); the
``inductor`` check runs in this process on a group of one, because a cold inductor compile of
even this tiny model took 28-34 s here (2-12 s with inductor's cache warm), and two ranks
compiling at once on 2 cores would double that.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from _common import bn_net, rank, sgd_wrapper, train
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

PERIOD, STEPS = 3, 7  # rounds after steps 3 and 6; step 7 leaves the ranks apart
# Compiled and eager kernels may round differently (fused or decomposed ops); measured here:
# 0.0 for aot_eager and at most 7.5e-8 for inductor over 7 steps (3e-8 in evaluation).
TOLERANCE = 1e-6


def _state(model: nn.Module) -> Tensor:
    """Parameters and floating-point buffers (BatchNorm statistics), one flat tensor."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def _compiled_vs_eager(backend: str, wrap: str) -> dict[str, Any]:
    """Train a compiled model and an eager one under LocalSGDOptimizer; trace both per step.

    ``wrap``: ``"plain"`` passes the compiled module itself as ``model``; ``"ddp"`` builds the
    wrapper on a DDP model and compiles the DDP module afterwards; ``"compiled_ddp"`` passes
    ``torch.compile(DDP(model))`` as ``model``.
    """
    torch._dynamo.reset()
    eager = bn_net(seed=rank() + 1)  # differently seeded ranks: the initial broadcast aligns them
    inner = bn_net(seed=rank() + 1)
    if wrap == "ddp":
        ddp = DDP(inner)
        opt = sgd_wrapper(ddp, PERIOD, momentum=0.9)
        compiled = torch.compile(ddp, backend=backend)
    elif wrap == "compiled_ddp":
        compiled = torch.compile(DDP(inner), backend=backend)
        opt = sgd_wrapper(compiled, PERIOD, momentum=0.9)
    else:
        compiled = torch.compile(inner, backend=backend)
        opt = sgd_wrapper(compiled, PERIOD, momentum=0.9)
    reference = sgd_wrapper(eager, PERIOD, momentum=0.9)
    shares = all(a is b for a, b in zip(compiled.parameters(), inner.parameters()))
    trace = []
    for step in range(STEPS):
        train(compiled, opt, 1, start=step)
        train(eager, reference, 1, start=step)
        trace.append(
            {
                "state": _state(inner),
                "vs_eager": float((_state(inner) - _state(eager)).abs().max()),
                "rounds": opt.averaging_rounds,
            }
        )
    # The compiled graph reads the averaged values: evaluation matches the eager model.
    compiled.eval()
    eager.eval()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        eval_diff = float((compiled(x) - eager(x)).abs().max())
    return {"shares_parameters": shares, "trace": trace, "eval_vs_eager": eval_diff}


@pytest.mark.parametrize(
    "wrap",
    [
        "plain",
        "ddp",
        "compiled_ddp",
    ],
)
def test_compiled_model_on_two_ranks(ranks: Any, wrap: str) -> None:
    results = ranks.run(_compiled_vs_eager, "aot_eager", wrap, world_size=2, timeout=180)
    for result in results:
        assert result["shares_parameters"]
        assert [e["rounds"] for e in result["trace"]] == [0, 0, 1, 1, 1, 2, 2]
        assert max(e["vs_eager"] for e in result["trace"]) <= TOLERANCE
        assert result["eval_vs_eager"] <= TOLERANCE
    for step, (a, b) in enumerate(zip(results[0]["trace"], results[1]["trace"])):
        if (step + 1) % PERIOD == 0:
            assert torch.equal(a["state"], b["state"]), step  # right after a round
        else:
            # The ranks train on different batches and communicate nothing between rounds.
            assert (a["state"] - b["state"]).abs().max() > 1e-3, step


def test_inductor_single_process(single_rank_group: None) -> None:
    """The default backend, inductor, in this process: a group of one, so rounds are free and
    the compiled run must track the eager one step for step."""
    pytest.importorskip("torch._inductor")
    assert dist.get_world_size() == 1
    result = _compiled_vs_eager("inductor", "plain")
    assert result["shares_parameters"]
    assert [e["rounds"] for e in result["trace"]] == [0, 0, 1, 1, 1, 2, 2]
    assert max(e["vs_eager"] for e in result["trace"]) <= TOLERANCE
    assert result["eval_vs_eager"] <= TOLERANCE
