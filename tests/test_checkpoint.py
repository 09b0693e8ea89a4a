"""``local_sgd_optim.checkpoint``: atomic per-rank files, the COMPLETE marker, truncation and
corruption detection, weights_only loading, random states, and resharding 4 -> 2 -> 4 ranks."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _common import (
    batch,
    flat_params,
    launcher_env,
    mlp,
    raised,
    rank,
    roundtrip,
    sgd_wrapper,
    train,
)
from torch import nn

from local_sgd_optim import LocalSGDOptimizer, checkpoint


def _state(value: float, step: int = 0) -> dict[str, Any]:
    return {"model": {"w": torch.full((3,), value)}, "step": step}


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


# --- one process --------------------------------------------------------------------------


def test_save_writes_files_and_marker_and_keeps_the_newest(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        path = checkpoint.save(tmp_path, step, _state(step, step), keep=2)
        assert path == _step_dir(tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020", "step-00000030"]
    newest = _step_dir(tmp_path, 30)
    assert sorted(p.name for p in newest.iterdir()) == ["COMPLETE", "rank0.pt"]  # no temp file
    marker = json.loads((newest / "COMPLETE").read_text())
    data = (newest / "rank0.pt").read_bytes()
    assert marker == {
        "format": 1,
        "step": 30,
        "world_size": 1,
        "files": {"rank0.pt": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
    }
    assert checkpoint.latest(tmp_path) == (30, newest)
    loaded = checkpoint.load(tmp_path)  # the root: the newest complete checkpoint
    assert loaded["step"] == 30 and torch.equal(loaded["model"]["w"], torch.full((3,), 30.0))
    assert checkpoint.load(_step_dir(tmp_path, 20))["step"] == 20
    assert checkpoint.latest(tmp_path / "nothing") is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.load(tmp_path / "nothing")


def test_keep_none_keeps_everything_and_bad_arguments_raise(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, _state(step), keep=None)
    assert len(list(tmp_path.iterdir())) == 3
    with pytest.raises(ValueError, match="keep must be an integer >= 1, got 0"):
        checkpoint.save(tmp_path, 4, _state(4), keep=0)
    with pytest.raises(ValueError, match="step must be"):
        checkpoint.save(tmp_path, -1, _state(4))
    with pytest.raises(ValueError, match="rank must be smaller than world_size"):
        checkpoint.save(tmp_path, 4, _state(4), rank=2, world_size=2)
    with pytest.raises(TypeError, match="state must be a dict"):
        checkpoint.save(tmp_path, 4, [torch.ones(1)])  # type: ignore[arg-type]


_CRASH_MID_WRITE = """
import os, signal, sys, torch
from local_sgd_optim import checkpoint

def crash(obj, f, *args, **kwargs):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handler runs

checkpoint.torch.save = crash
checkpoint.save(sys.argv[1], 2, {"model": {"w": torch.zeros(3)}, "step": 2})
"""


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 1, _state(1.0, 1))
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_MID_WRITE, str(tmp_path)],
        env=launcher_env(),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    crashed = _step_dir(tmp_path, 2)
    leftovers = [p.name for p in crashed.iterdir()]
    # The half-written temporary file is there, under a name no reader looks at.
    assert len(leftovers) == 1 and leftovers[0].startswith(".rank0.pt.tmp"), leftovers
    with pytest.warns(
        UserWarning, match=f"skipping an unusable checkpoint: {crashed} is incomplete"
    ):
        assert checkpoint.latest(tmp_path) == (1, _step_dir(tmp_path, 1))
    with pytest.warns(UserWarning):
        assert checkpoint.load(tmp_path)["step"] == 1
    with pytest.raises(ValueError, match="incomplete: it has no COMPLETE marker"):
        checkpoint.load(crashed)
    # The next save at that step cleans up and completes; the old one goes only afterwards.
    checkpoint.save(tmp_path, 2, _state(2.0, 2), keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]
    assert sorted(p.name for p in crashed.iterdir()) == ["COMPLETE", "rank0.pt"]
    assert checkpoint.load(tmp_path)["step"] == 2


def test_an_exception_mid_write_removes_the_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint.save(tmp_path, 1, _state(1.0, 1))

    def fail(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", fail)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path, 2, _state(2.0, 2))
    monkeypatch.undo()
    assert list(_step_dir(tmp_path, 2).iterdir()) == []
    with pytest.warns(UserWarning, match="step-00000002"):
        assert checkpoint.latest(tmp_path) == (1, _step_dir(tmp_path, 1))


def test_a_set_missing_a_rank_is_incomplete(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 1, _state(0.0), rank=0, world_size=2)
    checkpoint.save(tmp_path, 1, _state(1.0), rank=1, world_size=2)
    checkpoint.save(tmp_path, 2, _state(0.0), rank=0, world_size=2)  # rank 1 never got there
    assert not (_step_dir(tmp_path, 2) / "COMPLETE").exists()
    with pytest.warns(UserWarning, match="step-00000002 is incomplete"):
        assert checkpoint.latest(tmp_path) == (1, _step_dir(tmp_path, 1))
    with pytest.warns(UserWarning, match="step-00000002 is incomplete"):
        assert checkpoint.load(tmp_path, rank=1, world_size=2)["model"]["w"][0] == 1.0


def test_truncated_and_corrupted_files_raise_naming_the_previous_checkpoint(
    tmp_path: Path,
) -> None:
    checkpoint.save(tmp_path, 1, _state(1.0, 1))
    checkpoint.save(tmp_path, 2, _state(2.0, 2))
    file = _step_dir(tmp_path, 2) / "rank0.pt"
    data = file.read_bytes()

    file.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=f"skipping an unusable checkpoint: {file} is truncated"):
        assert checkpoint.latest(tmp_path) == (1, _step_dir(tmp_path, 1))
    with pytest.raises(ValueError) as truncated:
        checkpoint.load(_step_dir(tmp_path, 2))
    message = str(truncated.value)
    assert f"checkpoint file {file} is truncated or corrupted" in message
    assert f"{len(data) // 2} bytes" in message and f"records {len(data)} bytes" in message
    assert f"The previous checkpoint {_step_dir(tmp_path, 1)} is still there" in message

    # Same length, one byte flipped: only the SHA-256 tells, and load() checks it.
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(flipped))
    assert checkpoint.latest(tmp_path) == (2, _step_dir(tmp_path, 2))
    with pytest.raises(ValueError, match=r"truncated or corrupted: .* SHA-256"):
        checkpoint.load(tmp_path)

    file.unlink()
    with pytest.raises(ValueError, match=r"rank0.pt is missing. The previous checkpoint"):
        checkpoint.load(_step_dir(tmp_path, 2))

    (_step_dir(tmp_path, 1) / "rank0.pt").write_bytes(b"")
    file.write_bytes(data[:10])
    with pytest.raises(ValueError, match="No earlier complete checkpoint is left"):
        checkpoint.load(_step_dir(tmp_path, 2))
    (_step_dir(tmp_path, 2) / "COMPLETE").write_text("{not json")
    with pytest.raises(ValueError, match="COMPLETE is unreadable or malformed"):
        checkpoint.load(_step_dir(tmp_path, 2))


class _Custom:
    pass


def _touch(path: str) -> object:
    Path(path).touch()
    return object()


class _Evil:
    """Unpickling it would call ``_touch``: code run by loading a checkpoint."""

    def __init__(self, flag: Path) -> None:
        self.flag = str(flag)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_touch, (self.flag,))


def test_only_tensors_and_plain_containers_are_saved_or_loaded(tmp_path: Path) -> None:
    import argparse

    with pytest.raises(TypeError, match=r"state\['extra'\]\[1\] is a .*_Custom.*weights_only"):
        checkpoint.save(tmp_path, 1, {"extra": [1, _Custom()]})
    with pytest.raises(TypeError, match=r"state\['args'\] is a argparse.Namespace.*vars\(args\)"):
        checkpoint.save(tmp_path, 1, {"args": argparse.Namespace(lr=0.1)})
    with pytest.raises(TypeError, match=r"state\['numpy'\] is a numpy.ndarray"):
        checkpoint.save(tmp_path, 1, {"numpy": np.zeros(2)})
    assert not _step_dir(tmp_path, 1).exists() or not list(_step_dir(tmp_path, 1).iterdir())

    # What torch's own state dicts hold is fine, including the _metadata of a module's.
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "misc": (torch.float16, torch.device("cpu"), torch.Size([2]), None, 1j, b"x"),
    }
    checkpoint.save(tmp_path, 1, state)
    loaded = checkpoint.load(tmp_path)
    assert loaded["model"]._metadata == state["model"]._metadata
    assert loaded["misc"] == state["misc"]

    # A checkpoint from elsewhere, consistent with its marker, that would run code when loaded.
    flag = tmp_path / "code-ran"
    file = _step_dir(tmp_path, 1) / "rank0.pt"
    torch.save({"model": {}, "payload": _Evil(flag)}, file)
    data = file.read_bytes()
    marker = json.loads((_step_dir(tmp_path, 1) / "COMPLETE").read_text())
    marker["files"]["rank0.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (_step_dir(tmp_path, 1) / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(ValueError, match=r"(?s)other than tensors and plain containers.*_touch"):
        checkpoint.load(tmp_path)
    assert not flag.exists()


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(5)
    random.seed(6)
    np.random.seed(7)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.normal()
    saved = checkpoint.rng_state()
    assert set(saved) >= {"torch", "python", "numpy"}
    first = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3).tolist())
    checkpoint.save(tmp_path, 1, {"rng": saved})
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    checkpoint.set_rng_state(checkpoint.load(tmp_path)["rng"])
    again = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3).tolist())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    checkpoint.set_rng_state(roundtrip(saved))  # also through a plain torch.save/load
    assert torch.equal(torch.rand(4), first[0])
    with pytest.raises(ValueError, match=r"expects what checkpoint.rng_state"):
        checkpoint.set_rng_state({"python": 1})


# --- resharding ---------------------------------------------------------------------------


def _rank_state(r: int, world_size: int) -> dict[str, Any]:
    """What rank ``r`` would save: values chosen so that means are exact in binary."""
    g = torch.Generator().manual_seed(r)
    return {
        "model": {
            "0.weight": torch.full((2, 3), float(r)) + torch.arange(6.0).reshape(2, 3),
            "0.bias": torch.randn(2, generator=g),
            "1.running_mean": torch.full((2,), 4.0 * r, dtype=torch.float16),
            "1.num_batches_tracked": torch.tensor(10 + r),
        },
        "optimizer": {
            "state": {
                0: {"step": torch.tensor(7.0), "exp_avg": torch.full((2, 3), 2.0 * r)},
                1: {"step": torch.tensor(7.0), "exp_avg": torch.randn(2, generator=g)},
            },
            "param_groups": [{"lr": 0.01, "params": [0, 1]}],
            "local_sgd": {
                "version": 2,
                "micro_steps": 14,
                "optimizer_steps": 7,
                "averaging_rounds": 2,
                "last_round_step": 6,
                "period": 3,
                "world_size": world_size,
                "stats": {"rounds": 2},
                "anchor": [torch.full((5,), 1.0)],
                "pending": {"received": [torch.ones(5)], "sent": [torch.ones(5)]},
            },
        },
        "rng": {"torch": torch.get_rng_state()},
        "epoch": 3 + r,  # not a key the rule knows: rank 0's
    }


@pytest.mark.parametrize(("old", "new"), [(4, 2), (2, 4)])
def test_reshard_rule_in_numbers(old: int, new: int) -> None:
    states = [_rank_state(r, old) for r in range(old)]
    resharded = checkpoint.reshard_state_dicts(states, new)
    assert len(resharded) == new
    mean = (old - 1) / 2  # of 0, 1, ..., old - 1
    for state in resharded:
        model = state["model"]
        assert torch.equal(model["0.weight"], mean + torch.arange(6.0).reshape(2, 3))
        expected_bias = torch.stack([s["model"]["0.bias"] for s in states]).double().mean(0)
        assert torch.equal(model["0.bias"], expected_bias.float())
        assert model["1.running_mean"].dtype == torch.float16
        assert torch.equal(model["1.running_mean"], torch.full((2,), 4.0 * mean).half())
        assert model["1.num_batches_tracked"].item() == 10  # integers: rank 0's
        opt_state = state["optimizer"]["state"]
        assert torch.equal(opt_state[0]["exp_avg"], torch.full((2, 3), 2.0 * mean))
        expected = torch.stack([s["optimizer"]["state"][1]["exp_avg"] for s in states])
        assert torch.equal(opt_state[1]["exp_avg"], expected.double().mean(0).float())
        assert opt_state[0]["step"].item() == 7.0
        assert state["optimizer"]["param_groups"] == [{"lr": 0.01, "params": [0, 1]}]
        ours = state["optimizer"]["local_sgd"]
        assert ours["world_size"] == new and ours["anchor"] == [] and ours["pending"] is None
        kept = ("micro_steps", "optimizer_steps", "averaging_rounds", "last_round_step", "period")
        assert {k: ours[k] for k in kept} == {
            k: states[0]["optimizer"]["local_sgd"][k] for k in kept
        }
        assert state["rng"] is None and state["epoch"] == 3
    # No tensor is shared between entries or with the input.
    storages = {t.untyped_storage().data_ptr() for t in _tensors(resharded)}
    assert len(storages) == len(list(_tensors(resharded)))
    assert not storages & {t.untyped_storage().data_ptr() for t in _tensors(states)}
    # The input is left alone.
    assert states[1]["optimizer"]["local_sgd"]["world_size"] == old


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_reshard_rejects_states_that_do_not_belong_together() -> None:
    states = [_rank_state(r, 2) for r in range(2)]
    states[1]["optimizer"]["local_sgd"]["optimizer_steps"] = 8
    with pytest.raises(ValueError, match=r"different optimizer steps.*rank 1: 8"):
        checkpoint.reshard_state_dicts(states, 4)
    states = [_rank_state(r, 2) for r in range(2)]
    states[1]["model"]["0.weight"] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"old rank 1's state has shape \(3, 2\) at \['model'\]"):
        checkpoint.reshard_state_dicts(states, 4)
    with pytest.raises(ValueError, match="no 'model' entry"):
        checkpoint.reshard_state_dicts([{"optimizer": {}}], 2)
    with pytest.raises(ValueError, match="at least one"):
        checkpoint.reshard_state_dicts([], 2)
    with pytest.raises(ValueError, match="new_world_size must be"):
        checkpoint.reshard_state_dicts(states, 0)


def test_load_on_another_world_size_raises_unless_asked_to_reshard(tmp_path: Path) -> None:
    states = [_rank_state(r, 4) for r in range(4)]
    for r, state in enumerate(states):
        checkpoint.save(tmp_path, 7, state, rank=r, world_size=4)
    with pytest.raises(ValueError) as changed:
        checkpoint.load(tmp_path, rank=1, world_size=2)
    message = str(changed.value)
    assert "written by 4 rank(s) but the world size is now 2" in message
    assert "reshard=True" in message and "reshard_state_dicts" in message
    loaded = checkpoint.load(tmp_path, rank=1, world_size=2, reshard=True)
    expected = checkpoint.reshard_state_dicts(states, 2)[1]
    assert torch.equal(loaded["model"]["0.bias"], expected["model"]["0.bias"])
    assert loaded["optimizer"]["local_sgd"] == expected["optimizer"]["local_sgd"]
    # The same world size reads this rank's own file, with or without reshard.
    own = checkpoint.load(tmp_path, rank=3, world_size=4, reshard=True)
    assert torch.equal(own["model"]["0.bias"], states[3]["model"]["0.bias"])


# --- several ranks: save on 4, resume on 2 with reshard, then on 4 again ------------------


def _build() -> tuple[nn.Module, LocalSGDOptimizer]:
    model = mlp(seed=0)
    return model, sgd_wrapper(model, period=3, momentum=0.9)


def _save_state(model: nn.Module, opt: LocalSGDOptimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": rank()}


def _first_run(directory: str) -> dict[str, Any]:
    """Train 5 steps (a round at 3; steps 4 and 5 local, so ranks differ), then save."""
    model, opt = _build()
    train(model, opt, 5)
    checkpoint.save(directory, opt.optimizer_steps, _save_state(model, opt))
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    return {"params": flat_params(model), "momentum": momentum}


def _resume(directory: str, steps: int) -> dict[str, Any]:
    """On a new world size: the error without asking, then resharded, then more training."""
    model, opt = _build()
    refused = raised(checkpoint.load, directory)
    found = checkpoint.latest(directory)
    assert found is not None
    raw = torch.load(found[1] / "rank0.pt", weights_only=True)  # read around load()'s check
    refused_by_optimizer = raised(opt.load_state_dict, raw["optimizer"])
    state = checkpoint.load(directory, reshard=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    dist.barrier()  # no rank starts writing the next checkpoint while another still looks
    loaded = {
        "params": flat_params(model),
        "momentum": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        "counters": (opt.micro_steps, opt.optimizer_steps, opt.averaging_rounds),
        "epoch": state["epoch"],
    }
    start = opt.optimizer_steps
    train(model, opt, steps, start)
    checkpoint.save(directory, opt.optimizer_steps, _save_state(model, opt))
    return {
        "refused": refused,
        "refused_by_optimizer": refused_by_optimizer,
        "loaded": loaded,
        "params": flat_params(model),
        "counters": (opt.micro_steps, opt.optimizer_steps, opt.averaging_rounds),
        "world_size": dist.get_world_size(),
    }


def _reference_continuation(
    state: dict[str, Any], world_size: int, steps: range, period: int = 3
) -> torch.Tensor:
    """The resharded state trained on ``world_size`` simulated ranks, averaged every ``period``."""
    models = []
    for _ in range(world_size):
        model = mlp(seed=0)
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.load_state_dict(state["model"])
        plain = copy.deepcopy(state["optimizer"])  # load_state_dict keeps these tensors
        plain.pop("local_sgd")
        base.load_state_dict(plain)
        models.append((model, base))
    for step in steps:
        for r, (model, base) in enumerate(models):
            x, y = batch(r, step)
            nn.functional.cross_entropy(model(x), y).backward()
            base.step()
            base.zero_grad()
        if (step + 1) % period == 0:
            with torch.no_grad():
                for tensors in zip(*(m.parameters() for m, _ in models)):
                    mean = torch.stack(tensors).mean(0)
                    for t in tensors:
                        t.copy_(mean)
    return flat_params(models[0][0])


def test_save_on_4_resume_on_2_then_on_4(ranks: Any, tmp_path: Path) -> None:
    directory = str(tmp_path)
    first = ranks.run(_first_run, directory, world_size=4)
    assert not torch.equal(first[0]["params"], first[1]["params"])  # saved between rounds
    marker = json.loads((_step_dir(tmp_path, 5) / "COMPLETE").read_text())
    assert marker["world_size"] == 4 and sorted(marker["files"]) == [
        f"rank{r}.pt" for r in range(4)
    ]
    mean = torch.stack([f["params"] for f in first]).double().mean(0).float()
    expected_state = checkpoint.load(directory, world_size=2, reshard=True)

    second = ranks.run(_resume, directory, 4, world_size=2)  # steps 6..9: a round at 6 and 9
    for r, result in enumerate(second):
        assert result["refused"][0] == "ValueError"
        assert "written by 4 rank(s) but the world size is now 2" in result["refused"][1]
        assert result["refused_by_optimizer"][0] == "ValueError"
        assert "reshard_state_dicts" in result["refused_by_optimizer"][1]
        assert torch.equal(result["loaded"]["params"], mean)
        for got, *saved in zip(result["loaded"]["momentum"], *(f["momentum"] for f in first)):
            assert torch.equal(got, torch.stack(saved).double().mean(0).float())
        assert result["loaded"]["counters"] == (5, 5, 1)  # kept from the 4-rank run
        assert result["loaded"]["epoch"] == 0, r
        assert result["counters"] == (9, 9, 3)
    assert torch.equal(second[0]["params"], second[1]["params"])  # a round at step 9
    reference = _reference_continuation(expected_state, 2, range(5, 9))
    torch.testing.assert_close(second[0]["params"], reference, rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005", "step-00000009"]

    third = ranks.run(_resume, directory, 2, world_size=4)  # from step 9 on 4 ranks
    for result in third:
        assert "written by 2 rank(s) but the world size is now 4" in result["refused"][1]
        assert result["refused_by_optimizer"][0] == "ValueError"
        assert torch.equal(result["loaded"]["params"], second[0]["params"])
        assert result["loaded"]["counters"] == (9, 9, 3)
        assert result["counters"] == (11, 11, 3)
        assert result["world_size"] == 4
    assert not torch.equal(third[0]["params"], third[1]["params"])  # no round since step 9
    marker = json.loads((_step_dir(tmp_path, 11) / "COMPLETE").read_text())
    assert marker["world_size"] == 4 and marker["step"] == 11


def _save_fails_on_rank_1(directory: str) -> tuple[str, str]:
    state: dict[str, Any] = {"model": {"w": torch.ones(2)}}
    if rank() == 1:
        state["bad"] = _Custom()
    return raised(checkpoint.save, directory, 3, state)


def test_a_rank_that_cannot_save_raises_on_every_rank(ranks: Any, tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 1, _state(1.0), rank=0, world_size=2)
    checkpoint.save(tmp_path, 1, _state(1.0), rank=1, world_size=2)
    errors = ranks.run(_save_fails_on_rank_1, str(tmp_path), world_size=2, timeout=60)
    assert errors[1][0] == "TypeError" and "state['bad']" in errors[1][1]
    assert errors[0][0] == "RuntimeError"
    assert "rank 1 (TypeError: state['bad']" in errors[0][1]
    assert "previous complete checkpoint is still there" in errors[0][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert checkpoint.latest(tmp_path) == (1, _step_dir(tmp_path, 1))
