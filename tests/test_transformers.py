"""LocalSGDTrainer: transformers.Trainer with Local SGD, on 2 gloo CPU processes.

Two launches of ``tests/_transformers_script.py`` (15-30 s each here) record what every rank
saw; the tests below assert on those records. A tiny GPT-2 built from a config trains on
byte-level tokens of ``argparse.py`` from the stdlib: 24 optimizer steps of Trainer's own
``gradient_accumulation_steps=2``, ``period=3``, checkpoints every 8 steps. The second launch
is a new process that resumes from the first one's step-8 checkpoint, then runs a plain
``Trainer`` (DDP) on the same data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _common import ROOT, torchrun

from local_sgd_optim.transformers import (
    LocalSGDTrainerMixin,
    rank_model_file,
    rank_optimizer_file,
)

SCRIPT = ROOT / "tests" / "_transformers_script.py"
PERIOD, SAVE_STEPS, MAX_STEPS = 3, 8, 24


def _launch(*args: str) -> dict[str, Any]:
    proc = torchrun(SCRIPT, *args, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    parsed: dict[str, Any] = json.loads(lines[0][len("RESULT ") :])
    return parsed


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    pytest.importorskip("transformers")
    folder = str(tmp_path_factory.mktemp("transformers"))
    first = _launch("--phase", "first", "--dir", folder)
    resumed = _launch("--phase", "resume", "--dir", folder)
    return {"first": first, "resumed": resumed}


def _save_steps() -> set[int]:
    return set(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))


def test_wraps_what_trainer_builds(runs: dict[str, dict[str, Any]]) -> None:
    first = runs["first"]
    assert first["optimizer_class"] == "AdamW"  # Trainer's optim="adamw_torch"
    assert first["accelerated"] == "AcceleratedOptimizer"  # Accelerate wraps ours
    assert first["ddp"] == "DistributedDataParallel"


def test_rounds_every_period_real_optimizer_steps(runs: dict[str, dict[str, Any]]) -> None:
    trace = runs["first"]["trace"]
    assert [e["global_step"] for e in trace] == list(range(1, MAX_STEPS + 1))
    rounds = 0
    for entry in trace:
        step = entry["global_step"]
        # one step() per accumulation window: the wrapper counts Trainer's optimizer steps
        assert entry["optimizer_steps"] == step
        if step % PERIOD == 0:
            rounds += 1  # the scheduled round
        assert entry["rounds"] == rounds, entry
    # Checkpoints between rounds add none: the saved model is computed and put back.
    assert runs["first"]["final_counters"] == [MAX_STEPS, rounds] == [24, 8]


def test_ranks_equal_right_after_each_round_and_differ_between(
    runs: dict[str, dict[str, Any]],
) -> None:
    for entry in runs["first"]["trace"]:
        step = entry["global_step"]
        if step % PERIOD == 0:
            assert entry["spread"] == 0.0, entry  # bitwise equal on both ranks
        elif step > 1:  # step 1 runs at learning rate 0 (linear warm-up from 0)
            assert entry["spread"] > 1e-4, entry
    # and they move: no two consecutive rounds hold the same parameters
    hashes = [e["hash"] for e in runs["first"]["trace"] if e["global_step"] % PERIOD == 0]
    assert len(set(hashes)) == len(hashes)


def test_gradients_never_all_reduced(runs: dict[str, dict[str, Any]]) -> None:
    # Right before every optimizer step, after Trainer's accumulation and clipping, the ranks'
    # gradients differ: DDP (built by Accelerate after the optimizer) all-reduced none of them.
    spreads = runs["first"]["grad_spread"]
    assert len(spreads) == MAX_STEPS
    assert min(spreads) > 1e-3, spreads


def test_checkpoints_hold_the_average_and_every_ranks_own_state(
    runs: dict[str, dict[str, Any]],
) -> None:
    saves = runs["first"]["saves"]
    assert [s["step"] for s in saves] == sorted(_save_steps())
    for save in saves:
        between_rounds = save["step"] % PERIOD != 0
        # The model file holds the mean of the ranks; saving did not average them.
        assert save["written_minus_mean"] < 1e-6, save
        assert (save["spread"] > 0) == between_rounds
        own = ["model-rank0.pt", "model-rank1.pt"] if between_rounds else []
        assert save["files"] == [*own, "optimizer-rank1.pt", "optimizer.pt"]
        assert save["counters"][0] == save["counters"][1]
        assert save["state"][0] != save["state"][1]  # each rank's own Adam moments
    assert runs["first"]["final_spread"] == 0.0


def test_resume_restores_every_ranks_counters_and_state(runs: dict[str, dict[str, Any]]) -> None:
    saved = runs["first"]["saves"][0]
    loaded = runs["resumed"]["loaded"]
    assert loaded["global_step"] == SAVE_STEPS
    assert loaded["counters"] == saved["counters"] == ["[8, 2]", "[8, 2]"]
    assert loaded["state"] == saved["state"]  # rank 1 got its own, not rank 0's
    assert loaded["params_spread"] == saved["spread"] > 0  # each rank's own model back
    assert runs["resumed"]["warnings"] == []


def test_resumed_run_repeats_the_uninterrupted_one_bitwise(
    runs: dict[str, dict[str, Any]],
) -> None:
    first, resumed = runs["first"]["trace"], runs["resumed"]["trace"]
    assert [e["global_step"] for e in resumed] == list(range(SAVE_STEPS + 1, MAX_STEPS + 1))
    for a, b in zip(first[SAVE_STEPS:], resumed):
        assert {k: a[k] for k in ("optimizer_steps", "rounds", "hash")} == {
            k: b[k] for k in ("optimizer_steps", "rounds", "hash")
        }
    assert runs["resumed"]["final_hash"] == runs["first"]["final_hash"]
    assert runs["resumed"]["eval_loss"] == runs["first"]["eval_loss"]


def test_loss_comparable_to_ddp_with_fewer_bytes(runs: dict[str, dict[str, Any]]) -> None:
    local, ddp = runs["first"], runs["resumed"]["ddp_run"]
    print(  # the figures the docs quote (pytest -s shows them)
        f"held-out loss {local['eval_loss']:.4f} (DDP {ddp['eval_loss']:.4f}), "
        f"bytes {local['bytes']} (DDP {ddp['bytes']})"
    )
    assert local["eval_loss"] < 4.5  # from ln(256) = 5.55 at the start
    assert local["eval_loss"] <= ddp["eval_loss"] * 1.05, (local["eval_loss"], ddp["eval_loss"])
    # 8 rounds and the 2 global models saved between rounds (plus small headers) against 24
    # gradient all-reduces
    assert local["bytes"] < 10 * ddp["param_bytes"] * 1.01
    assert local["bytes"] < 0.45 * ddp["bytes"]


def test_evaluating_and_saving_never_change_training(tmp_path: Path) -> None:
    """Evaluation every 5 steps and a save every 10 end bitwise where a run with neither ends,
    with an outer optimizer (DiLoCo) and without; and a GPT-2 with dropout at a learning rate
    of 1e-5, evaluated every 5 steps at period 4, runs to the end (it once raised 'Local SGD
    is not happening'; the cause, a float-norm fingerprint, is tested in test_conventions)."""
    result = _launch("--phase", "neutral", "--dir", str(tmp_path))
    for outer in (False, True):
        quiet, looked = result[f"False-{outer}"], result[f"True-{outer}"]
        assert looked == quiet, (outer, looked, quiet)
        assert looked["spread"] == 0.0 and looked["rounds"] == 6  # 24 steps, period 4
    assert result["dropout"]["rounds"] == 6 and result["dropout"]["spread"] == 0.0


# --- in this process, without launching ----------------------------------------------------


def test_rank_optimizer_file() -> None:
    assert rank_optimizer_file(0) == "optimizer.pt"
    assert rank_optimizer_file(1) == "optimizer-rank1.pt"
    assert rank_model_file(0) == "model-rank0.pt"


@pytest.mark.parametrize("key", ["accumulation_steps", "period", "model"])
def test_refuses_what_trainer_or_the_mixin_owns(key: str) -> None:
    class Base:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

    class Mixed(LocalSGDTrainerMixin, Base):
        pass

    with pytest.raises(ValueError, match=key):
        Mixed(local_sgd_kwargs={key: 2})
    assert Mixed(period=4, local_sgd_kwargs={"warmup_steps": 2}, x=1).kwargs == {"x": 1}


def test_imports_without_transformers(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import local_sgd_optim.transformers as m\n"
        "assert m.LocalSGDTrainerMixin\n"
        "try:\n"
        "    m.LocalSGDTrainer\n"
        "except ImportError:\n"
        "    print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.stdout.strip() == "ok", proc.stderr
