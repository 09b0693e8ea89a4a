"""``local_sgd_optim.testing`` as users meet it: the assertions' verdicts and messages, the
docs' example test (run here, on this session's ranks), and the plugin staying opt-in."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from local_sgd_optim.testing import (
    COUNTERS,
    assert_counters_equal,
    assert_ranks_equal,
    assert_resumed_equal,
    counters_of,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "test_train_minimal.py"
EXAMPLE_CONFTEST = ROOT / "examples" / "conftest.py"

# The docs' example tests, collected here as tests of this module: they run on this session's
# ranks fixture, with the example's own functions imported by the workers from examples/.
sys.path.insert(0, str(EXAMPLE.parent))
from test_train_minimal import (  # noqa: E402, F401
    test_a_resumed_run_continues_exactly,
    test_ranks_meet_every_period_and_end_identical,
)

sys.path.remove(str(EXAMPLE.parent))


# --- assert_ranks_equal / assert_resumed_equal -----------------------------------------------


def test_equal_results_pass_bitwise() -> None:
    state = {"w": torch.tensor([1.0, float("nan"), -0.0]), "n": torch.tensor(3), "k": [1, "a"]}
    assert_ranks_equal([state, {k: v for k, v in state.items()}, state])
    assert_resumed_equal([state, state], [state, state])
    assert_ranks_equal([torch.nn.Linear(2, 2)] * 2)  # a module: through its state_dict


def test_a_differing_rank_is_named_with_the_entry_and_the_gap() -> None:
    a = {"layer": {"weight": torch.zeros(3), "steps": 4}}
    b = {"layer": {"weight": torch.tensor([0.0, 0.5, 0.0]), "steps": 5}}
    with pytest.raises(AssertionError) as info:
        assert_ranks_equal([a, a, b])
    message = str(info.value)
    assert "(bitwise)" in message
    assert "rank 2 vs rank 0, layer.weight: max abs difference 0.5" in message
    assert "rank 2 vs rank 0, layer.steps: 5 vs 4" in message
    assert "rank 1" not in message


def test_bitwise_sees_signed_zeros_and_tolerance_forgives_small_gaps() -> None:
    with pytest.raises(AssertionError, match="signed zeros or NaN bits differ"):
        assert_ranks_equal([torch.tensor([0.0]), torch.tensor([-0.0])])
    near = [torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-6])]
    with pytest.raises(AssertionError, match=r"max abs difference 9\.54e-07"):
        assert_ranks_equal(near)
    assert_ranks_equal(near, atol=1e-5)
    with pytest.raises(AssertionError, match=r"atol=1e-07, rtol=0"):
        assert_ranks_equal(near, atol=1e-7)
    with pytest.raises(AssertionError, match=r"torch\.float64 \(2,\) vs torch\.float32 \(2,\)"):
        assert_ranks_equal([near[0], near[0].double()])
    with pytest.raises(ValueError, match="non-negative"):
        assert_ranks_equal(near, atol=-1.0)


def test_a_resumed_run_is_compared_rank_by_rank() -> None:
    uninterrupted = [{"w": torch.ones(2)}, {"w": torch.full((2,), 2.0)}]
    resumed = [{"w": torch.ones(2)}, {"w": torch.tensor([2.0, 2.25])}]
    with pytest.raises(AssertionError, match=r"rank 1, w: max abs difference 0\.25"):
        assert_resumed_equal(resumed, uninterrupted)
    # Ranks that differ from each other, each equal to its own uninterrupted self: a pass.
    assert_resumed_equal(uninterrupted, uninterrupted)
    with pytest.raises(AssertionError, match="has 1 ranks, the uninterrupted one 2"):
        assert_resumed_equal(resumed[:1], uninterrupted)


# --- counters ---------------------------------------------------------------------------------


def test_counters_of_reads_every_counter(single_rank_group: None) -> None:
    from local_sgd_optim import LocalSGDOptimizer

    model = torch.nn.Linear(2, 1)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, period=2)
    for _ in range(3):
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
    counters = counters_of(opt)
    opt.close()
    assert set(counters) == set(COUNTERS)
    assert counters["optimizer_steps"] == counters["micro_steps"] == 3
    with pytest.raises(TypeError, match="must be a LocalSGDOptimizer, got SGD"):
        counters_of(opt.base_optimizer)  # type: ignore[arg-type]


def test_counters_that_disagree_or_miss_the_expected_value_are_named() -> None:
    rank0 = dict.fromkeys(COUNTERS, 4)
    rank1 = {**rank0, "optimizer_steps": 5}
    assert_counters_equal([rank0, rank0], averaging_rounds=4)
    with pytest.raises(AssertionError, match="optimizer_steps: rank 0 at 4, rank 1 at 5"):
        assert_counters_equal([rank0, rank1])
    with pytest.raises(AssertionError, match="averaging_rounds: 4 on every rank, expected 3"):
        assert_counters_equal([rank0, rank0], averaging_rounds=3)
    with pytest.raises(ValueError, match=r"unknown counters \['rounds'\]"):
        assert_counters_equal([rank0], rounds=3)


# --- the docs ---------------------------------------------------------------------------------


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_docs_show_the_example_files_exactly() -> None:
    blocks = _code_blocks((ROOT / "docs" / "testing.md").read_text())
    assert EXAMPLE.read_text() in blocks, "docs/testing.md must show examples/test_train_minimal.py"
    assert EXAMPLE_CONFTEST.read_text() in blocks, "docs/testing.md must show examples/conftest.py"


# --- opt-in only ------------------------------------------------------------------------------


def test_the_package_neither_imports_the_plugin_nor_registers_it(tmp_path: Path) -> None:
    probe = (
        "import sys, local_sgd_optim, importlib.metadata as md\n"
        "names = [m for m in sys.modules if m.split('.')[0] == 'pytest' or 'testing' in m]\n"
        "print(sorted(m for m in names if m == 'pytest' or m.startswith('local_sgd_optim.')))\n"
        "print([e.name for e in md.entry_points(group='pytest11') if 'local_sgd' in e.value])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "[]"], proc.stdout


def test_functions_given_to_ranks_may_take_arguments_and_return_tensors(ranks: Any) -> None:
    results = ranks.run(_scaled_rank, torch.arange(3.0), scale=2.0)
    assert_ranks_equal([r[0] for r in results])
    assert [r[1].tolist() for r in results] == [[0.0, 2.0, 4.0], [0.0, 4.0, 8.0]]


def _scaled_rank(t: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    import torch.distributed as dist

    return t, t * scale * (dist.get_rank() + 1)
