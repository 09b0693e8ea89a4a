"""PyTorch's conventions hold under the wrapper: ``state_dict()`` shares the model's memory,
modules pickle, masks stay masks, the "ranks identical" check tells different weights apart,
re-planning does not copy the model, and two wrapped optimizers on one model average and
outer-step each parameter once. With ``parameters_as_bucket_view=True`` each convention either
holds or raises an error naming the option. Each check runs on 2 gloo ranks."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from _common import flat_params, rank, sgd_wrapper, train
from torch import nn

from local_sgd_optim import LocalSGDOptimizer, RoundError


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _raised(fn: Any, *args: Any) -> str:
    try:
        fn(*args)
    except (RuntimeError, RoundError) as error:
        return f"{type(error).__name__}: {error}"
    return ""


# --- 1, 2: state_dict() and the model's memory -----------------------------------------------


def _state_dict_writes(placed: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model = _net()
    opt = sgd_wrapper(model, period=2, parameters_as_bucket_view=placed)
    train(model, opt, 1)
    weight = model[0].weight
    original = weight.detach().clone()
    # 1. Edit a tensor of one state dict, drop the dict, build another (as a save would).
    edited = model.state_dict()
    edited["0.weight"].mul_(0.5)
    del edited
    fresh = model.state_dict()
    out["fresh_is_model"] = torch.equal(fresh["0.weight"], weight.detach())
    out["model_halved"] = torch.equal(weight.detach(), original * 0.5)
    del fresh
    out["after_edit"] = _raised(train, model, opt, 1, 1)  # the round at step 2
    opt.close()

    # 2. The partial-loading idiom, then in-place edits of the values.
    model = _net()
    opt = sgd_wrapper(model, period=2, parameters_as_bucket_view=placed)
    pretrained = {k: torch.full_like(v, 0.25) for k, v in _net(1).state_dict().items()}
    own = model.state_dict()
    own["2.bias"].copy_(pretrained["2.bias"])
    out["idiom_reached_model"] = torch.equal(model[2].bias.detach(), pretrained["2.bias"])
    del own
    out["after_idiom"] = _raised(train, model, opt, 2)
    opt.close()

    # Edited and loaded back: in both layouts the model takes the edit, and nothing is lost.
    model = _net()
    opt = sgd_wrapper(model, period=2, parameters_as_bucket_view=placed)
    state = model.state_dict()
    for value in state.values():
        value.mul_(0.5)
    model.load_state_dict(state)
    out["loaded_back"] = torch.equal(model[0].bias.detach(), _net()[0].bias.detach() * 0.5)
    out["after_load"] = _raised(train, model, opt, 2)
    opt.close()
    return out


@pytest.mark.parametrize("placed", [False, True])
def test_writes_through_state_dict_reach_the_model_or_raise(ranks: Any, placed: bool) -> None:
    for r in ranks.run(_state_dict_writes, placed):
        # A fresh state dict always holds the model's own values, never an old edited copy.
        assert r["fresh_is_model"]
        assert r["loaded_back"] and r["after_load"] == ""
        if placed:
            # The copies cannot carry a write to the model: the next round says so.
            assert not r["idiom_reached_model"]
            for key in ("after_edit", "after_idiom"):
                assert "RuntimeError" in r[key] and "parameters_as_bucket_view" in r[key]
                assert "load_state_dict" in r[key]
        else:  # plain PyTorch: the state dict shares the model's memory
            assert r["model_halved"] and r["idiom_reached_model"]
            assert r["after_edit"] == r["after_idiom"] == ""


# --- 3: pickling --------------------------------------------------------------------------------


def _storages(tensors: list[torch.Tensor]) -> int:
    return len({t.untyped_storage().data_ptr() for t in tensors})


def _pickling(placed: bool) -> dict[str, Any]:
    model = _net()
    opt = sgd_wrapper(model, period=2, parameters_as_bucket_view=placed)
    out: dict[str, Any] = {}
    # Before the first step, the hook that watches for a later DDP is attached.
    out["before_first_step"] = _raised(torch.save, model, io.BytesIO())
    train(model, opt, 3)
    copied = copy.deepcopy(model)
    out["deepcopy_equal"] = torch.equal(flat_params(copied), flat_params(model))
    out["deepcopy_separate"] = _storages(list(copied.parameters())) == 4
    buffer = io.BytesIO()
    out["save_model"] = _raised(torch.save, model, buffer)
    if not out["save_model"]:
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)
        out["restored_separate"] = _storages(list(restored.parameters())) == 4
        out["restored_equal"] = torch.equal(flat_params(restored), flat_params(model))
    one = io.BytesIO()
    torch.save(model[2].bias, one)
    out["one_tensor_bytes"] = one.tell()
    model.share_memory()
    shared = io.BytesIO()
    out["after_share_memory"] = _raised(torch.save, model, shared)
    opt.close()
    closed = io.BytesIO()
    torch.save(model, closed)  # after close(): every tensor in memory of its own again
    closed.seek(0)
    out["after_close_separate"] = (
        _storages(list(torch.load(closed, weights_only=False).parameters())) == 4
    )
    return out


@pytest.mark.parametrize("placed", [False, True])
def test_modules_pickle_or_raise_naming_the_option(ranks: Any, placed: bool) -> None:
    for r in ranks.run(_pickling, placed):
        assert r["deepcopy_equal"] and r["deepcopy_separate"] and r["after_close_separate"]
        if placed:
            for key in ("before_first_step", "save_model", "after_share_memory"):
                assert "parameters_as_bucket_view" in r[key] and "state_dict()" in r[key]
        else:
            assert r["before_first_step"] == r["save_model"] == r["after_share_memory"] == ""
            assert r["restored_separate"] and r["restored_equal"]
            assert r["one_tensor_bytes"] < 2000  # 3 floats and the pickle, not the model


# --- 4: buffers that are not statistics --------------------------------------------------------


class _Pruned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


def _pruning(average_buffers: bool | str) -> dict[str, Any]:
    from torch.nn.utils import prune

    model = _Pruned()
    opt = LocalSGDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, 2, average_buffers=average_buffers
    )
    g = torch.Generator().manual_seed(rank())
    for step in range(4):
        if step == 1:  # between rounds, each rank prunes its own way
            torch.manual_seed(rank())
            prune.random_unstructured(model.fc, "weight", amount=0.5)
            own_mask = model.fc.weight_mask.clone()
        x = torch.randn(16, 8, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    opt.close()
    return {
        "own_mask": own_mask,
        "mask": model.fc.weight_mask.clone(),
        "running_mean": model.bn.running_mean.clone(),
        "weight": model.fc.weight_orig.detach().clone(),  # the parameter; .weight is derived
    }


@pytest.mark.parametrize("average_buffers", [True, "all"])
def test_a_pruning_mask_stays_a_mask(ranks: Any, average_buffers: bool | str) -> None:
    r0, r1 = ranks.run(_pruning, average_buffers)
    assert not torch.equal(r0["own_mask"], r1["own_mask"])
    assert torch.equal(r0["running_mean"], r1["running_mean"])  # statistics averaged
    assert torch.equal(r0["mask"], r1["mask"]) and torch.equal(r0["weight"], r1["weight"])
    binary = bool(((r0["mask"] == 0) | (r0["mask"] == 1)).all())
    # True: the mask is copied from rank 0, like DDP's buffer broadcast; "all" asks for the
    # old behaviour, a mean of masks, which is what that option says.
    assert binary == (average_buffers is True)


# --- 5: the fingerprint tells different weights apart ------------------------------------------


def _small_learning_rate(lr: float, placed: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 2))
    model.register_buffer("table", torch.ones(64, 1024))  # large, equal on every rank
    opt = LocalSGDOptimizer(
        torch.optim.Adam(model.parameters(), lr=lr),
        model,
        period=1,
        parameters_as_bucket_view=placed,
    )
    g = torch.Generator().manual_seed(rank())
    error, differ = "", 0
    for _ in range(40):
        x = torch.randn(4, 512, generator=g)
        model(x).square().mean().backward()
        try:
            opt.step()
        except RoundError as exc:  # raised before any payload: each rank's own weights
            error = str(exc)
            local = flat_params(model)
            gathered = [torch.empty_like(local) for _ in range(2)]
            torch.distributed.all_gather(gathered, local)
            differ = int((gathered[0] != gathered[1]).sum())
            break
        opt.zero_grad()
    return {"error": error, "differ": differ, "rounds": opt.stats.rounds}


@pytest.mark.parametrize("lr", [1e-5, 1e-6])
def test_small_learning_rates_do_not_raise_identical_ranks(ranks: Any, lr: float) -> None:
    for placed in (False, True):
        for r in ranks.run(_small_learning_rate, lr, placed):
            assert r["error"] == "", (r["error"], r["differ"])
            assert r["rounds"] == 40


def test_the_fingerprint_reads_bits() -> None:
    from local_sgd_optim.comm.tensors import finite_and_fingerprint

    a = torch.randn(300_000)
    b = a.clone()
    b[123_456] = torch.nextafter(b[123_456], torch.tensor(1.0))  # one bit, one element
    assert finite_and_fingerprint([a]) == finite_and_fingerprint([a.clone()])
    assert finite_and_fingerprint([a])[1] != finite_and_fingerprint([b])[1]
    assert finite_and_fingerprint([a[1:], torch.randn(5, dtype=torch.bfloat16)])[0]
    b[7] = float("inf")
    assert not finite_and_fingerprint([b])[0]
    # Two elements swapped across the slices the tensor is read in: equal norms, other bits.
    c = a.clone()
    c[0], c[-1] = a[-1].item(), a[0].item()
    assert finite_and_fingerprint([a])[1] != finite_and_fingerprint([c])[1]


# --- 6, 7: re-planning -------------------------------------------------------------------------


class _Replaced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 2)
        self.head.bias.requires_grad_(False)
        self.register_buffer("noise", torch.zeros(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.noise = torch.randn(32) * 0.01  # a new tensor at every forward
        return self.head(torch.tanh(self.fc(x) + self.noise))


def _replanning(average_buffers: bool | str) -> dict[str, Any]:
    model = _Replaced()
    opt = LocalSGDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        period=2,
        comm_dtype=torch.bfloat16,
        parameters_as_bucket_view=True,
        average_buffers=average_buffers,
    )
    g = torch.Generator().manual_seed(rank())
    per_round: list[int] = []
    averagers = []

    def steps(n: int) -> None:
        for _ in range(n):
            model(torch.randn(8, 32, generator=g)).square().mean().backward()
            before = opt.stats.bytes_communicated
            opt.step()
            opt.zero_grad()
            if opt.stats.bytes_communicated > before:
                per_round.append(opt.stats.bytes_communicated - before)
                averagers.append(opt._rounds.averager)

    steps(4)
    residence = opt._rounds._residence
    assert residence is not None
    flats = [f.untyped_storage().data_ptr() for f in residence.flats]
    model.head.bias.requires_grad_(True)  # unfrozen: the next round re-plans
    steps(2)
    kept = [f.untyped_storage().data_ptr() for f in residence.flats]
    return {
        "per_round": per_round,
        "kept_flats": kept[0] == flats[0] and len(kept) == len(flats) + 1,
        "weight_still_placed": residence.holds(model.fc.weight),
        "bias_placed": residence.holds(model.head.bias),
        "same_averager": averagers[0] is averagers[1],
        "wire_fp32": 4 * sum(p.numel() for p in model.parameters()),
    }


@pytest.mark.parametrize("average_buffers", [True, "all"])
def test_replanning_keeps_placement_and_the_anchor(ranks: Any, average_buffers: bool | str) -> None:
    for r in ranks.run(_replanning, average_buffers):
        # 6. Unfreezing a bias places the bias alone; the rest stays where it was.
        assert r["kept_flats"] and r["weight_still_placed"] and r["bias_placed"]
        first, second, _ = r["per_round"]
        if average_buffers is True:
            # The replaced buffer is copied from rank 0, not averaged: no re-plan at all.
            assert r["same_averager"]
        # 7. A buffer replaced at every forward does not send a round in full precision:
        # rounds 1 and 2 send 16-bit deltas (the anchor was set at construction).
        assert first < 0.6 * r["wire_fp32"] and second < 0.6 * r["wire_fp32"]


# --- 8: two optimizers, each wrapped, on one model ---------------------------------------------


class _TwoParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
        self.critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(self.generator(x))


def _outer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def _two_optimizers(split: bool) -> dict[str, Any]:
    model = _TwoParts()
    g_params, c_params = list(model.generator.parameters()), list(model.critic.parameters())
    if split:
        opts = [
            LocalSGDOptimizer(torch.optim.SGD(ps, lr=0.05), model, 3, outer_optimizer=_outer)
            for ps in (g_params, c_params)
        ]
    else:
        base = torch.optim.SGD([{"params": g_params}, {"params": c_params}], lr=0.05)
        opts = [LocalSGDOptimizer(base, model, 3, outer_optimizer=_outer)]
    g = torch.Generator().manual_seed(rank())
    for _ in range(9):
        model(torch.randn(16, 4, generator=g)).square().mean().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for opt in opts:
        opt.close()
    return {
        "params": flat_params(model),
        "running_mean": model.generator[1].running_mean.clone(),
        "rounds": [opt.stats.rounds for opt in opts],
    }


def test_two_wrapped_optimizers_equal_one_wrapper_over_both_groups(ranks: Any) -> None:
    one = ranks.run(_two_optimizers, False)
    two = ranks.run(_two_optimizers, True)
    assert torch.equal(two[0]["params"], two[1]["params"])
    assert two[0]["rounds"] == [3, 3] and one[0]["rounds"] == [3]
    # Each parameter is averaged and outer-stepped once per round, as by one wrapper.
    torch.testing.assert_close(two[0]["params"], one[0]["params"], rtol=0, atol=1e-6)
    torch.testing.assert_close(two[0]["running_mean"], one[0]["running_mean"], rtol=0, atol=0)


# --- 9: DCP with a Stateful one level down -----------------------------------------------------


def _dcp_nested(tmp: str) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from local_sgd_optim.checkpoint.dcp import per_replica

    class AppState:
        def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            self.model, self.optimizer = model, optimizer

        def state_dict(self) -> dict[str, Any]:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            return {"model": model_sd, "optim": optim_sd}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
            )

    def make(seed: int) -> tuple[nn.Module, LocalSGDOptimizer]:
        model = _net(seed)
        return model, LocalSGDOptimizer(
            torch.optim.Adam(model.parameters(), lr=0.01), model, 4, broadcast_initial=False
        )

    model, opt = make(0)
    train(model, opt, 6)
    path = f"{tmp}/nested"
    dcp.save(per_replica({"app": AppState(model, opt), "epoch": 3}), checkpoint_id=path)
    train(model, opt, 6, start=6)
    straight = flat_params(model)
    model, opt = make(5)
    state = {"app": AppState(model, opt), "epoch": 0}
    dcp.load(per_replica(state), checkpoint_id=path)
    train(model, opt, 6, start=6)
    dist.barrier()
    return {"equal": torch.equal(straight, flat_params(model)), "epoch": state["epoch"]}


def test_dcp_with_a_stateful_one_level_down_resumes_exactly(ranks: Any, tmp_path: Any) -> None:
    for r in ranks.run(_dcp_nested, str(tmp_path)):
        assert r["equal"] and r["epoch"] == 3
