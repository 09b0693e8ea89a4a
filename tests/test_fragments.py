"""Streaming fragments (``fragments=F``): each fragment averaged at its own step of the period,
each every ``period`` steps, against a hand-written reference (all-reduce of one fragment at its
offset; for DiLoCo, Nesterov SGD on that fragment's pseudo-gradient alone); the peak a step
sends; exact resume mid-period; overlap; bad input. On 2 gloo ranks (4 for the offsets)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _common import rank
from torch import nn

from local_sgd_optim import LocalSGDOptimizer
from local_sgd_optim.fragments import fragment_offsets, plan_fragments, smallest_gap

PERIOD = 8


class _Net(nn.Module):
    """Four layers of different sizes and a BatchNorm (a running statistic joins its layer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 12)
        self.d = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.bn(self.a(x)))
        return self.d(torch.tanh(self.c(torch.tanh(self.b(x)))))


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).double() for v in model.state_dict().values()])


def _outer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def test_offsets_and_cuts() -> None:
    assert fragment_offsets(8, 4) == [2, 4, 6, 8]
    assert fragment_offsets(10, 3) == [3, 6, 10]
    assert fragment_offsets(8, 1) == [8]
    assert smallest_gap(10, 3) == 3 and smallest_gap(3, 4) == 0


def _cut(sizes: list[int], positions: list[int], count: int, buffers: int = 0) -> list[Any]:
    """Each fragment as (tensor, start, stop) pieces; the last ``buffers`` sizes are buffers."""
    tensors = [torch.zeros(n) for n in sizes]
    split = len(sizes) - buffers
    plan = plan_fragments(tensors[:split], tensors[split:], positions, count)
    for t, (i, a, b) in zip(plan.tensors, plan.origins):  # each piece is a view of its tensor
        assert t.numel() == b - a and t.data_ptr() == tensors[i].data_ptr() + 4 * a
    return [[plan.origins[j] for j in f] for f in plan.fragments]


def test_cuts_in_module_order_into_equal_fragments() -> None:
    # Equal sizes, whole tensors where the cuts fall between them; in module order.
    assert _cut([4, 4, 4, 4], [0, 1, 2, 3], 2) == [[(0, 0, 4), (1, 0, 4)], [(2, 0, 4), (3, 0, 4)]]
    assert _cut([4, 4, 4, 4], [3, 2, 1, 0], 2) == [[(2, 0, 4), (3, 0, 4)], [(0, 0, 4), (1, 0, 4)]]
    # A tensor that a cut falls inside travels in pieces, one in each fragment: every fragment
    # holds a quarter of the values, where whole tensors could not do better than 100 of 103.
    assert _cut([100, 1, 1, 1], [0, 1, 2, 3], 4) == [
        [(0, 0, 25)],
        [(0, 25, 51)],
        [(0, 51, 77)],
        [(0, 77, 100), (1, 0, 1), (2, 0, 1), (3, 0, 1)],
    ]
    # A buffer goes with its module (position), wherever it is in the list.
    assert _cut([6, 6, 6], [0, 2, 1], 3, buffers=1) == [[(0, 0, 6)], [(2, 0, 6)], [(1, 0, 6)]]
    with pytest.raises(ValueError, match="fragments=5 needs at least 5 averaged values"):
        _cut([2, 2], [0, 1], 5)


@torch.no_grad()
def _average_by_hand(
    indices: list[int],
    pieces: list[torch.Tensor],
    n_params: int,
    kept: list[torch.Tensor],
    outer: torch.optim.Optimizer | None,
) -> None:
    """The reference round of some pieces: their mean over ranks and, with an outer
    optimizer (over a copy of each parameter piece), its step on those pieces'
    pseudo-gradient alone."""
    for i in indices:
        dist.all_reduce(pieces[i])
        pieces[i].div_(dist.get_world_size())
    mine = [i for i in indices if i < n_params]
    if outer is not None and mine:
        for i in range(n_params):
            kept[i].grad = (kept[i] - pieces[i]) if i in mine else None
        outer.step()
        for i in mine:
            pieces[i].copy_(kept[i])


def _per_step(settings: dict[str, Any], steps: int) -> dict[str, Any]:
    """Train with the wrapper, recording bytes per step and which parameters are identical
    across ranks after each step; alongside, a reference on a plain copy of the model that
    averages each fragment's tensors by hand at its offset."""
    model, reference = _Net(), _Net()
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, PERIOD, **settings)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    # The same pieces of the reference's tensors as the wrapper cut.
    plan = opt._rounds._fragment_plan(opt._rounds.tracked())
    fragments = plan.fragments
    stats = [b for name, b in reference.named_buffers() if name.startswith("bn.running")]
    whole = [*reference.parameters(), *stats]
    tensors = [whole[i].detach().view(-1)[a:b] for i, a, b in plan.origins]
    n_params = plan.outer_count
    outer = settings.get("outer_optimizer")
    kept = [t.clone() for t in tensors[:n_params]]
    ref_outer = None if outer is None else outer(kept)
    g = torch.Generator().manual_seed(rank())
    sent, same, gaps = [], [], []
    for step in range(1, steps + 1):
        x = torch.randn(8, 6, generator=g)
        before = opt.stats.bytes_communicated
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sent.append(opt.stats.bytes_communicated - before)
        reference(x).square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        into = (step - 1) % PERIOD + 1
        offsets = fragment_offsets(PERIOD, len(fragments))
        synced = offsets.index(into) if into in offsets else None
        if synced is not None:
            _average_by_hand(fragments[synced], tensors, n_params, kept, ref_outer)
        gathered = [torch.empty_like(_flat(model)) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, _flat(model))
        same.append(torch.equal(gathered[0], gathered[-1]))
        gaps.append(float((_flat(model) - _flat(reference)).abs().max()))
    before_close = _flat(model)
    opt.close()
    # close(): a round of the fragments not averaged at the last step, each its outer step.
    behind = [i for k, f in enumerate(fragments) if k != synced for i in f]
    _average_by_hand(behind, tensors, n_params, kept, ref_outer)
    return {
        "closed_as_by_hand": float((_flat(model) - _flat(reference)).abs().max()),
        "sent": sent,
        "same": same,
        "gaps": gaps,
        "peak": opt.stats.peak_step_bytes,
        "total": sum(sent),
        "fragments": fragments,
        "apart_before_close": before_close,
        "final": _flat(model),
        "rounds": opt.stats.rounds,
    }


@pytest.mark.parametrize("outer", [False, True], ids=["local-sgd", "diloco"])
@pytest.mark.parametrize("steps", [2 * PERIOD + 3, 2 * PERIOD], ids=["mid-period", "at-its-end"])
def test_each_fragment_is_averaged_at_its_offset_as_by_hand(
    ranks: Any, outer: bool, steps: int
) -> None:
    settings: dict[str, Any] = {"fragments": 4}
    if outer:
        settings["outer_optimizer"] = _outer
    results = ranks.run(_per_step, settings, steps)
    whole = ranks.run(_per_step, {"outer_optimizer": _outer} if outer else {}, steps)
    r = results[0]
    assert len(r["fragments"]) == 4 and all(r["fragments"])
    # Bytes only at the offsets 2, 4, 6, 8 of each period; every period sends the whole model.
    offsets = {2, 4, 6, 0}
    for step, sent in enumerate(r["sent"], start=1):
        assert (sent > 0) == (step % PERIOD in offsets), (step, sent)
    per_period = sum(r["sent"][:PERIOD])
    # The same bytes as one whole round, plus each further fragment's header (6 int64 a rank).
    header = 6 * 2 * 8
    assert per_period == whole[0]["sent"][PERIOD - 1] + 3 * header
    # The peak a step sent: the largest fragment, at most half the model here, where the
    # unfragmented run's peak is all of it.
    assert r["peak"] == max(r["sent"]) < whole[0]["peak"] / 2
    assert whole[0]["peak"] == per_period - 3 * header
    # The wrapper matches the reference that averages each fragment by hand at its offset.
    for res in results:
        assert max(res["gaps"]) < 1e-6, res["gaps"]
        assert res["closed_as_by_hand"] < 1e-6, res["closed_as_by_hand"]
    # Between fragment rounds the ranks differ; close() makes them identical.
    assert not any(r["same"])
    assert torch.equal(results[0]["final"], results[1]["final"])
    # Each fragment's round counts; close() averages those not averaged at the last step.
    behind = 3 if steps % PERIOD == 0 else 4
    assert r["rounds"] == sum(1 for sent in r["sent"] if sent) + behind


def test_one_replica_takes_each_fragments_outer_step_alone(ranks: Any) -> None:
    # Alone nothing is communicated, but the outer optimizer still steps fragment by fragment
    # (DiLoCo with one replica is Lookahead; four fragments, four staggered outer steps).
    settings = {"fragments": 4, "outer_optimizer": _outer}
    (result,) = ranks.run(_per_step, settings, 2 * PERIOD + 3, world_size=1)
    assert max(result["gaps"]) < 1e-6 and result["closed_as_by_hand"] < 1e-6, result["gaps"]
    assert result["total"] == 0


def _resumed(settings: dict[str, Any], stop: int | None, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps, or ``stop`` steps then a save, a fresh model and optimizer loaded
    from it (in memory, as torch.save would write it), and the rest."""

    def build() -> tuple[nn.Module, LocalSGDOptimizer]:
        model = _Net()
        base = torch.optim.Adam(model.parameters(), lr=0.01)
        return model, LocalSGDOptimizer(base, model, PERIOD, **settings)

    model, opt = build()
    g = torch.Generator().manual_seed(rank())
    for step in range(steps):
        if step == stop:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            opt._ownership.closed = True  # abandoned, as a killed process would leave it
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            model, opt = build()
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
        model(torch.randn(8, 6, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    before_close = _flat(model)
    opt.close()
    return {"before_close": before_close, "final": _flat(model), "stats": opt.stats.rounds}


@pytest.mark.parametrize(
    ("settings", "stop"),
    [
        # In the first period: two fragments anchored for bf16 deltas, two not yet.
        ({"fragments": 4, "outer_optimizer": _outer, "comm_dtype": torch.bfloat16}, 5),
        # Right after a fragment's round started: it is in flight in the checkpoint.
        ({"fragments": 2, "outer_optimizer": _outer, "overlap_steps": 2}, PERIOD + 5),
        # Streaming DiLoCo as the paper runs it: 4-bit deltas, fragments, overlap.
        (
            {"fragments": 4, "outer_optimizer": _outer, "comm_dtype": "int4", "overlap_steps": 1},
            PERIOD + 4,
        ),
    ],
    ids=["diloco-bf16", "diloco-overlap", "diloco-int4-overlap"],
)
def test_a_resume_mid_period_is_exact(ranks: Any, settings: dict[str, Any], stop: int) -> None:
    steps = 2 * PERIOD + 5
    straight = ranks.run(_resumed, settings, None, steps)
    resumed = ranks.run(_resumed, settings, stop, steps)
    for r in (0, 1):
        assert torch.equal(resumed[r]["before_close"], straight[r]["before_close"]), r
        assert torch.equal(resumed[r]["final"], straight[r]["final"]), r
    assert torch.equal(straight[0]["final"], straight[1]["final"])
    assert not torch.equal(straight[0]["before_close"], straight[1]["before_close"])


def _bad(settings: dict[str, Any]) -> str:
    model = nn.Sequential(nn.Linear(1, 2))  # four values
    try:
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, PERIOD, **settings)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"fragments": 5}, "fragments=5 needs at least 5 averaged values, the model has 4"),
        ({"fragments": 2, "overlap_steps": 4}, "overlap_steps must be smaller than the 4 step"),
        ({"fragments": 9}, "fragments=9 needs a period of at least 9 steps"),
        # Fine: a tensor is cut where a fragment ends.
        ({"fragments": 4}, "no error"),
        ({"fragments": 0}, "fragments must be a positive integer"),
    ],
    ids=["too-few-values", "overlap-too-long", "period-too-short", "one-a-value", "zero"],
)
def test_fragments_that_cannot_work_raise_on_every_rank(
    ranks: Any, settings: dict[str, Any], message: str
) -> None:
    for error in ranks.run(_bad, settings):
        assert message in error, error
