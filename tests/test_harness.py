"""The multi-process harness, ``local_sgd_optim.testing``: timeouts fail fast and show where the
stuck ranks were, tracebacks come back, pools recover, functions are found, torchrun works."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from local_sgd_optim import LocalSGDOptimizer
from local_sgd_optim.testing import RanksFailed, RemoteError, run_under_torchrun


def _rank_1_waits_forever() -> int:
    if dist.get_rank() == 1:
        dist.all_reduce(torch.ones(1))  # rank 0 never joins
    return dist.get_rank()


def _rank_1_raises() -> int:
    if dist.get_rank() == 1:
        raise ZeroDivisionError("rank 1 divided by zero")
    return dist.get_rank()


def _sum_of_ranks() -> float:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _steps_and_close(steps: int, one_more_on_rank_1: bool) -> int:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, period=2)
    with opt:
        for _ in range(steps + (one_more_on_rank_1 and dist.get_rank() == 1)):
            model(torch.ones(2, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
    return opt.optimizer_steps


def test_a_hang_fails_within_the_timeout_and_the_pool_recovers(ranks: Any) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks still running: \[1\]") as info:
        ranks.run(_rank_1_waits_forever, timeout=8, pg_timeout=600)
    assert time.monotonic() - start < 20
    if sys.platform != "win32":  # the stuck rank's Python stack, from faulthandler
        assert "--- rank 1 was at ---" in str(info.value)
        assert "in _rank_1_waits_forever" in str(info.value)
    assert ranks.run(_sum_of_ranks) == [1.0, 1.0]


def test_a_failing_rank_reports_its_traceback(ranks: Any) -> None:
    with pytest.raises(RanksFailed, match=r"failed on rank\(s\) \[1\]") as info:
        ranks.run(_rank_1_raises)
    assert "rank 1 raised ZeroDivisionError: rank 1 divided by zero" in str(info.value)
    assert "_rank_1_raises" in str(info.value)  # the traceback, not just the message
    assert "_execute" not in str(info.value)  # without the harness's own frame
    results = ranks.run(_rank_1_raises, return_exceptions=True)
    assert results[0] == 0
    assert isinstance(results[1], RemoteError) and results[1].type_name == "ZeroDivisionError"


def test_a_rank_that_steps_once_more_fails_naming_the_ranks_and_steps(ranks: Any) -> None:
    assert ranks.run(_steps_and_close, 2, False) == [2, 2]  # the loop runs as meant
    start = time.monotonic()
    with pytest.raises(RanksFailed, match=r"failed on rank\(s\) \[0, 1\]") as info:
        ranks.run(_steps_and_close, 2, True, timeout=60)
    assert time.monotonic() - start < 30  # the library's check, not the timeout
    expected = "RoundError: ranks are out of step (rank 0 at close() of step 2, rank 1 at close() "
    expected += "of step 3)"
    assert f"ranks [0, 1] raised {expected}" in str(info.value)
    assert "in _steps_and_close" in str(info.value)  # rank 0's traceback, once


def test_only_module_level_functions_are_accepted(ranks: Any) -> None:
    def nested() -> None:
        pass

    for fn in (nested, lambda: None):
        with pytest.raises(TypeError, match="must be defined at module level"):
            ranks.run(fn)


def test_a_module_not_importable_by_name_is_loaded_from_its_file(
    ranks: Any, tmp_path: Path
) -> None:
    # As pytest's --import-mode=importlib imports a test file: under a name, not on sys.path.
    (tmp_path / "_neighbour.py").write_text("OFFSET = 10\n")
    (tmp_path / "loose_module.py").write_text(
        "import torch.distributed as dist\n"
        "from _neighbour import OFFSET\n\n"
        "def rank_plus_offset(extra):\n"
        "    return dist.get_rank() + OFFSET + extra\n"
    )
    spec = importlib.util.spec_from_file_location("not_on_path.loose", tmp_path / "loose_module.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(tmp_path))  # for its own import of _neighbour
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(tmp_path))
    assert ranks.run(module.rank_plus_offset, 100) == [110, 111]


def _rank_environment() -> tuple[float, bool]:
    total = _sum_of_ranks()
    if dist.get_rank() == 1:
        raise KeyError("only rank 1")
    return total, "TORCHELASTIC_RUN_ID" in os.environ


def test_the_same_call_runs_under_torchrun() -> None:
    """One launch (seconds): results, a failing rank, and torchrun's variables on the ranks."""
    results = run_under_torchrun(_rank_environment, nproc=2, timeout=120, return_exceptions=True)
    assert results[0] == (1.0, True)
    assert isinstance(results[1], RemoteError) and results[1].type_name == "KeyError"
    assert "only rank 1" in results[1].formatted and "_rank_environment" in results[1].formatted
