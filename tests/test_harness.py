"""The multi-process harness itself: timeouts fail fast, tracebacks come back, pools recover."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _harness import RanksFailed, RemoteError


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


def test_a_hang_fails_within_the_timeout_and_the_pool_recovers(ranks: Any) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks still running: \[1\]"):
        ranks.run(_rank_1_waits_forever, timeout=8, pg_timeout=600)
    assert time.monotonic() - start < 20
    assert ranks.run(_sum_of_ranks) == [1.0, 1.0]


def test_a_failing_rank_reports_its_traceback(ranks: Any) -> None:
    with pytest.raises(RanksFailed, match=r"failed on rank\(s\) \[1\]") as info:
        ranks.run(_rank_1_raises)
    assert "ZeroDivisionError: rank 1 divided by zero" in str(info.value)
    assert "_rank_1_raises" in str(info.value)  # the traceback, not just the message
    results = ranks.run(_rank_1_raises, return_exceptions=True)
    assert results[0] == 0
    assert isinstance(results[1], RemoteError) and results[1].type_name == "ZeroDivisionError"
