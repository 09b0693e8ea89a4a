"""LocalSGDOptimizer under Hugging Face Accelerate: 2 CPU processes, gloo, multi-CPU mode.

The adapter's helpers are tested in this process without Accelerate. One launch of
``tests/_accelerate_script.py`` under ``torch.distributed.run`` (7-30 s here, with the load)
records what every rank saw; the tests below assert on that record. With ``period`` 3 and
Accelerate's ``gradient_accumulation_steps`` 2, an averaging round is due every 6 micro-batches.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from _common import ROOT, mlp, sgd_wrapper, torchrun
from torch.nn.parallel import DistributedDataParallel as DDP

from local_sgd_optim.accelerate import _ddp_wrappers_of, _keep_ddp_gradients_local

PERIOD, ACCUMULATION, WINDOWS = 3, 2, 2


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("accelerate")
    args = ["--period", str(PERIOD), "--accumulation", str(ACCUMULATION)]
    args += ["--windows", str(WINDOWS)]
    args += ["--checkpoint-dir", str(tmp_path_factory.mktemp("accelerate_checkpoint"))]
    # Multi-CPU mode, gloo. The script leaves with os._exit, so torchrun's one retry after a gloo
    # abort at exit (pytorch/pytorch#179291) is a last resort, and that run must exit cleanly.
    proc = torchrun(ROOT / "tests" / "_accelerate_script.py", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    parsed: dict[str, Any] = json.loads(lines[0][len("RESULT ") :])
    return parsed


def test_runs_in_accelerate_multi_cpu_mode(result: dict[str, Any]) -> None:
    assert result["multi_cpu"], result["distributed_type"]
    assert result["world_size"] == 2
    assert result["backend"] == "gloo"
    assert result["prepared"] == {
        "ddp": True,  # Accelerate wrapped the model in DDP...
        "ddp_wraps_model": True,
        "opt_wraps_ours": True,  # ...and our optimizer in its AcceleratedOptimizer
        "broadcast_buffers": False,  # prepare_local_sgd switched the buffer broadcast off
        "comm_hooks": 1,  # and installed the hook that keeps gradients local
    }


def test_rounds_count_real_optimizer_steps(result: dict[str, Any]) -> None:
    trace = result["trace"]
    assert len(trace) == WINDOWS * PERIOD * ACCUMULATION == 12
    for entry in trace:
        micro = entry["micro_batch"]
        # Accelerate calls step() only at the end of each accumulation window.
        assert entry["sync_gradients"] == (micro % ACCUMULATION == 0)
        assert entry["step_calls"] == entry["optimizer_steps"] == micro // ACCUMULATION
        assert entry["averaging_rounds"] == micro // (PERIOD * ACCUMULATION)
    round_batches = [e["micro_batch"] for e in trace if "round_vs_mean" in e]
    # Accelerate's own LocalSGD, stepped per micro-batch, would average at 3, 6, 9, 12.
    assert round_batches == [6, 12]


def test_gradients_stay_local_between_rounds(result: dict[str, Any]) -> None:
    for entry in result["trace"]:
        if entry["micro_batch"] % (PERIOD * ACCUMULATION) == 0:
            # Right after a round: every parameter and float buffer bitwise equal on both ranks.
            assert entry["equal"] and entry["max_diff"] == 0.0, entry
        else:
            # Between rounds the ranks drift apart: DDP all-reduced no gradient.
            assert not entry["equal"] and entry["max_diff"] > 1e-3, entry


def test_round_is_the_mean_of_the_local_copies(result: dict[str, Any]) -> None:
    rounds = [e for e in result["trace"] if "round_vs_mean" in e]
    assert len(rounds) == 2
    for entry in rounds:
        assert entry["round_vs_mean"] <= 1e-7, entry  # parameters and BatchNorm statistics
        assert entry["bn_local_spread"] > 1e-3, entry  # the running means did differ...
        assert entry["bn_vs_mean"] <= 1e-7, entry  # ...and now hold their average


def test_matches_local_sgd_accumulating_by_itself(result: dict[str, Any]) -> None:
    # Reference: the same model, data and seed without Accelerate, with accumulation_steps=2
    # on the LocalSGDOptimizer. Halving the loss (Accelerate) or the summed gradient (ours) is
    # exact in floating point, so the two agree bit for bit at every micro-batch.
    assert [e["vs_reference"] for e in result["trace"]] == [0.0] * len(result["trace"])


def test_save_state_load_state_round_trips_counters(result: dict[str, Any]) -> None:
    ckpt = result["checkpoint"]
    assert ckpt["saved"]["counters"] == [6, 6, 2]  # step() calls, optimizer steps, rounds
    assert ckpt["after_more"] == [10, 10, 3]  # training went on past the checkpoint
    assert ckpt["loaded"] == [[6, 6, 2], [6, 6, 2]]  # every rank is back at the checkpoint
    assert ckpt["accelerator_step_loaded"] == ckpt["saved"]["accelerator_step"] == 12
    assert ckpt["params_restored"] == [True, True]  # saved right after a round
    # Training resumes on schedule: the next round comes 3 optimizer steps after step 6.
    assert ckpt["resumed"] == [[6, 2], [7, 2], [7, 2], [8, 2], [8, 2], [9, 3]]
    assert ckpt["resumed_ranks"]["equal"]


def test_building_on_the_prepared_model_needs_no_adapter(result: dict[str, Any]) -> None:
    # model = accelerator.prepare(model); LocalSGDOptimizer(..., model, ...); prepare(opt)
    order = result["model_first"]
    assert order["optimizer_steps"] == 1 and order["averaging_rounds"] == 0
    assert order["comm_hooks"] == 1
    assert not order["equal"] and order["max_diff"] > 1e-3


def test_plain_prepare_is_found_at_the_first_forward(result: dict[str, Any]) -> None:
    # The naive path: accelerator.prepare alone wraps the model in DDP after the optimizer was
    # built. The wrapper finds that DDP at its first forward and keeps gradients local, so one
    # optimizer step later the ranks differ (DDP would have kept them identical).
    plain = result["plain_prepare"]
    assert plain["optimizer_steps"] == 1 and plain["averaging_rounds"] == 0
    assert not plain["params_equal"]
    assert plain["broadcast_buffers"] is False


def test_accumulating_on_both_sides_is_refused(result: dict[str, Any]) -> None:
    message = result["double_accumulation"]
    assert message is not None
    assert "accumulation_steps=1" in message


# --- the adapter's helpers, in this process (no Accelerate needed) --------------------------


def test_finds_the_ddp_wrapper_through_torch_compile(single_rank_group: None) -> None:
    model = mlp()
    ddp = DDP(model)
    compiled = torch.compile(ddp, backend="eager")  # what Accelerator(dynamo_backend=...) returns
    others = [object(), mlp(), DDP(mlp())]
    assert _ddp_wrappers_of(model, [*others, compiled]) == [ddp]
    assert _ddp_wrappers_of(torch.compile(model, backend="eager"), [compiled]) == [ddp]
    assert _ddp_wrappers_of(ddp, [compiled, ddp]) == [ddp]
    assert _ddp_wrappers_of(mlp(), [compiled]) == []


def test_keeps_gradients_local_once_and_refuses_a_foreign_hook(single_rank_group: None) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    inner = mlp()
    opt = sgd_wrapper(inner, period=2)
    ddp = DDP(inner)
    _keep_ddp_gradients_local(opt, ddp)
    _keep_ddp_gradients_local(opt, ddp)  # a second call (or one after the optimizer's): no-op
    assert len(ddp._comm_hooks) == 1
    assert ddp.broadcast_buffers is False

    other = DDP(mlp())
    other.register_comm_hook(None, allreduce_hook)
    with pytest.raises(RuntimeError, match="already has a communication hook"):
        _keep_ddp_gradients_local(opt, other)
