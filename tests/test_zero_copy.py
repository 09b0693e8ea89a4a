"""Parameters placed in bucket storage (``parameters_as_bucket_view``): rounds average them where
they lie, with the same numbers as parameters that keep their own memory, and nothing a user or a
saver does with the model notices the difference."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from _common import flat_params, loss_of, rank, sgd_wrapper, train
from torch import nn

from local_sgd_optim import LocalSGDOptimizer, RoundError
from local_sgd_optim.comm.averager import BucketedAverager
from local_sgd_optim.comm.resident import Residence


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 3))


def _storages(tensors: list[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _own_memory(model: nn.Module) -> bool:
    return all(
        p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters()
    )


def _train_both_ways(comm_dtype: torch.dtype | None, bucket_cap_mb: float) -> dict[str, Any]:
    """The same training with parameters placed in bucket storage and in their own memory."""
    out: dict[str, Any] = {}
    for placed in (True, False):
        model = _net()
        opt = sgd_wrapper(
            model,
            period=2,
            momentum=0.9,
            comm_dtype=comm_dtype,
            bucket_cap_mb=bucket_cap_mb,
            parameters_as_bucket_view=placed,
        )
        averaged = [p for p in model.parameters()] + [
            b for b in model.buffers() if b.is_floating_point()
        ]
        assert opt._rounds.averager is not None
        buckets = opt._rounds.averager.buckets
        out[placed] = {
            "storages": len(_storages(averaged)),
            "in_place": [b.span is not None for b in buckets],
            "workspace": opt._rounds.averager.workspace_bytes,
        }
        train(model, opt, 7)
        out[placed]["before_close"] = flat_params(model)
        out[placed]["buffers"] = torch.cat([b.reshape(-1).float() for b in model.buffers()])
        opt.close()
        out[placed]["closed"] = flat_params(model)
        out[placed]["own_memory_after_close"] = _own_memory(model)
    return out


@pytest.mark.parametrize(
    "comm_dtype, bucket_cap_mb",
    [(None, 25.0), (None, 1 / 1024), (torch.bfloat16, 25.0), (torch.float16, 1 / 1024)],
)
def test_placed_parameters_train_bitwise_like_parameters_in_their_own_memory(
    ranks: Any, comm_dtype: torch.dtype | None, bucket_cap_mb: float
) -> None:
    r0, r1 = ranks.run(_train_both_ways, comm_dtype, bucket_cap_mb)
    for r in (r0, r1):
        placed, own = r[True], r[False]
        # Placed: every averaged fp32 tensor lives in one storage and every bucket is a slice
        # of it; in their own memory: one storage each.
        assert placed["storages"] == 1 and all(placed["in_place"])
        assert own["storages"] == 2 * 2 + 4  # 2 Linear (weight, bias); BatchNorm: 2 + 2 stats
        if comm_dtype is None:
            assert placed["workspace"] == 0 < own["workspace"]
        for key in ("before_close", "buffers", "closed"):
            assert torch.equal(placed[key], own[key]), key
        assert placed["own_memory_after_close"] and own["own_memory_after_close"]
    assert torch.equal(r0[True]["closed"], r1[True]["closed"])  # ranks identical at the end


def _nan_round(on_nonfinite: str) -> dict[str, Any]:
    model = _net()
    opt = sgd_wrapper(model, period=2, on_nonfinite=on_nonfinite, parameters_as_bucket_view=True)
    train(model, opt, 1)
    if rank() == 1:
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    before = flat_params(model)
    loss_of(model, rank(), 1).backward()
    error = ""
    try:
        opt.step()  # the round at step 2 finds the NaN in its header, before any payload
    except RoundError as exc:
        error = str(exc)
    return {"before": before, "after": flat_params(model), "error": error}


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_a_round_that_finds_nan_changes_nothing_in_place(ranks: Any, on_nonfinite: str) -> None:
    r0, r1 = ranks.run(_nan_round, on_nonfinite)
    for r in (r0, r1):
        # The step's own update happened; the average did not. Rank 0 keeps its own values
        # (finite), rank 1 its NaN: neither took a single value from the other.
        assert bool(torch.isnan(r["after"]).any()) == (r is r1)
        assert ("NaN" in r["error"] or "non-finite" in r["error"]) == (on_nonfinite == "raise")
    assert not torch.equal(
        torch.nan_to_num(r0["after"]), torch.nan_to_num(r1["after"])
    )  # not averaged


class _WithTiedModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.tied_a = nn.Linear(3, 3)
        self.tied_b = self.tied_a  # one module under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tied_b(self.tied_a(self.net(x)))


def _savers_see_separate_tensors() -> dict[str, Any]:
    import logging

    import accelerate.utils.other as accelerate_other
    from accelerate.utils import clean_state_dict_for_safetensors

    # Its warning about dropped names needs an Accelerator's state; a plain logger will do.
    accelerate_other.logger = logging.getLogger("accelerate-in-test")  # type: ignore[assignment]

    model = _WithTiedModule()
    opt = sgd_wrapper(model, period=1, parameters_as_bucket_view=True)
    train(model, opt, 2)
    state = model.state_dict()
    plain = {k: v for k, v in state.items() if k.startswith(("net.0.", "net.3."))}
    cleaned = clean_state_dict_for_safetensors(dict(state))
    kept_vars = model.state_dict(keep_vars=True)
    inner = model.net[0].state_dict()
    placed = opt._rounds._residence
    assert placed is not None
    # Pickling the module would store its placed tensors as one storage: refused, naming the
    # option; deepcopy clones each tensor, and its copy holds nothing placed.
    try:
        torch.save(model, io.BytesIO())
        refused = ""
    except RuntimeError as error:
        refused = str(error)
    copied = copy.deepcopy(model)
    return {
        "pickle_refused": refused,
        "copy_separate": len(_storages(list(copied.parameters())))
        == len(list(copied.parameters())),
        "deepcopied": all(torch.equal(state[k], v) for k, v in copied.state_dict().items()),
        "separate": len(_storages(list(plain.values()))) == len(plain),
        "values": all(torch.equal(state[k], v) for k, v in model.state_dict().items()),
        "cleaned_keys": sorted(cleaned),
        "keys": sorted(state),
        "keep_vars_is_live": kept_vars["net.0.weight"] is model.net[0].weight,
        "inner_is_copy": not placed.holds(inner["weight"]),
        "live_is_placed": placed.holds(model.net[0].weight),
    }


def test_state_dict_hands_savers_tensors_of_their_own(ranks: Any) -> None:
    r0, r1 = ranks.run(_savers_see_separate_tensors)
    for r in (r0, r1):
        assert r["live_is_placed"] and r["separate"] and r["values"] and r["inner_is_copy"]
        # Accelerate's safetensors clean-up drops all but one name per storage: with views of
        # one storage it would silently drop the model's weights. It must keep them all
        # (the deliberately shared module's second name aside).
        dropped = set(r["keys"]) - set(r["cleaned_keys"])
        assert dropped <= {"tied_b.weight", "tied_b.bias", "tied_a.weight", "tied_a.bias"}
        assert len(dropped) == 2
        assert r["keep_vars_is_live"] and r["deepcopied"] and r["copy_separate"]
        assert "parameters_as_bucket_view" in r["pickle_refused"]


def _shared_memory_stays_shared() -> dict[str, Any]:
    torch.manual_seed(0)
    a, b = nn.Linear(5, 5), nn.Linear(5, 5)
    b.weight = nn.Parameter(a.weight.data)  # two Parameter objects, one memory
    model = nn.Sequential(a, nn.Tanh(), b)
    opt = sgd_wrapper(model, period=1, parameters_as_bucket_view=True)
    train_x = torch.randn(4, 5) * (rank() + 1)
    for _ in range(3):
        model(train_x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {
        "still_shared": a.weight.data_ptr() == b.weight.data_ptr(),
        "bias_placed": opt._rounds._residence is not None and opt._rounds._residence.holds(a.bias),
        "weight": a.weight.detach().clone(),
    }


def test_parameters_that_share_memory_stay_shared(ranks: Any) -> None:
    r0, r1 = ranks.run(_shared_memory_stays_shared)
    for r in (r0, r1):
        assert r["still_shared"] and r["bias_placed"]
    assert torch.equal(r0["weight"], r1["weight"])


def _moved_and_replanned() -> dict[str, Any]:
    model = _net()
    opt = sgd_wrapper(model, period=1, parameters_as_bucket_view=True)
    train(model, opt, 1)
    model.double()  # new memory for every tensor: the next round plans and places again
    x, y = torch.randn(8, 6, dtype=torch.float64) * (rank() + 1), torch.randint(0, 3, (8,))
    local: list[torch.Tensor] = []
    opt.base_optimizer.register_step_post_hook(lambda *_: local.append(flat_params(model)))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    placed = opt._rounds._residence
    return {
        "local": local[-1],
        "after": flat_params(model),
        "placed": placed is not None and all(placed.holds(p) for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype),
    }


def test_a_model_moved_after_construction_is_placed_again(ranks: Any) -> None:
    r0, r1 = ranks.run(_moved_and_replanned)
    assert r0["placed"] and r1["placed"] and r0["dtype"] == "torch.float64"
    torch.testing.assert_close(r0["after"], (r0["local"] + r1["local"]) / 2, rtol=0, atol=1e-12)
    assert torch.equal(r0["after"], r1["after"])


def test_residence_places_only_what_it_may_move() -> None:
    plain = torch.randn(10)
    complex_ = torch.randn(3, dtype=torch.complex64)
    view_owner = torch.randn(20)
    view = view_owner[5:15]
    transposed = torch.randn(4, 3).t()
    integer = torch.arange(4)
    values = [t.clone() for t in (plain, complex_, view, transposed)]
    residence = Residence([plain, complex_, view, transposed], held=[view_owner, integer])
    assert residence.holds(plain)
    assert not any(residence.holds(t) for t in (complex_, view, transposed))
    for t, v in zip((plain, complex_, view, transposed), values):
        assert torch.equal(t, v)
    residence.release()
    assert not residence.holds(plain) and torch.equal(plain, values[0])
    assert plain.untyped_storage().nbytes() == 10 * 4


def test_a_bucket_of_one_whole_tensor_is_in_place_even_unplaced() -> None:
    tensors = [torch.randn(1000), torch.randn(10, 100)]
    averager = BucketedAverager(tensors, None, bucket_cap_mb=1000 * 4 / 2**20)
    spans = [b.span is not None for b in averager.buckets]
    assert spans == [True, True] and averager.workspace_bytes == 0


def test_close_gives_each_parameter_its_own_memory_back(single_rank_group: None) -> None:
    model = _net()
    opt = LocalSGDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, period=2, parameters_as_bucket_view=True
    )
    assert _own_memory(model)  # one rank: nothing communicates, nothing is placed
    opt.close()
    assert _own_memory(model)


def _timed_loop() -> dict[str, Any]:
    import time

    model = _net()
    opt = sgd_wrapper(model, period=2)
    for i in range(6):
        time.sleep(0.02)  # the loop's own work, which a round must hide behind
        loss_of(model, rank(), i).backward()
        opt.step()
        opt.zero_grad()
    return opt.stats.as_dict() | {"k": opt.stats.steps_to_hide_a_round()}


def test_stats_time_steps_and_rounds_for_choosing_overlap_steps(ranks: Any) -> None:
    for r in ranks.run(_timed_loop):
        assert r["rounds"] == 3 and r["steps_timed"] == 5  # intervals between 6 steps
        assert r["step_seconds"] >= 5 * 0.02
        per_step = r["step_seconds"] / r["steps_timed"]
        per_round = r["round_seconds"] / r["rounds"]
        assert r["k"] == max(1, -(-per_round // per_step))


def _offloaded_anchor(overlap: bool) -> dict[str, Any]:
    """16-bit deltas with the anchor kept off the device: the same bits as without."""
    out: dict[str, Any] = {}
    for offload in (False, True):
        tensor = torch.full((3000,), 10.0)
        averager = BucketedAverager(
            [tensor], None, comm_dtype=torch.bfloat16, overlap=overlap, cpu_offload=offload
        )
        averager._visit_cpu = offload  # visit a copy, as an anchor of CUDA tensors does
        averager.set_anchor_from_tensors()
        home = averager.anchor_tensors()[0]
        g = torch.Generator().manual_seed(rank())
        for step in range(3):
            tensor.add_(torch.randn(3000, generator=g) * 0.1)
            if overlap:
                averager.start(step)
                averager.finish()
            else:
                averager.average(step)
        out[offload] = {
            "tensor": tensor.clone(),
            "anchor": averager.anchor_tensors()[0].clone(),
            "same_home": averager.anchor_tensors()[0] is home,
            "bound_home": averager.buckets[0].anchor.data_ptr() == home.data_ptr(),  # type: ignore[union-attr]
        }
    return out


@pytest.mark.parametrize("overlap", [False, True])
def test_an_offloaded_anchor_gives_the_same_bits(ranks: Any, overlap: bool) -> None:
    for r in ranks.run(_offloaded_anchor, overlap):
        assert torch.equal(r[True]["tensor"], r[False]["tensor"])
        assert torch.equal(r[True]["anchor"], r[False]["anchor"])
        assert r[True]["same_home"] and r[True]["bound_home"]
