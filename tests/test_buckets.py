"""Buckets and the pipeline alone: where each piece comes from, and the order of a pool."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from local_sgd_optim.comm.buckets import cut_into_buckets, group_by_device_and_dtype, pool_plan
from local_sgd_optim.comm.collectives import pipeline
from local_sgd_optim.comm.overlap import Piece


def test_pieces_remember_their_tensor_and_offset() -> None:
    tensors = [torch.arange(10.0), torch.zeros(0), torch.arange(6.0).view(2, 3).t(), torch.ones(3)]
    buckets = cut_into_buckets(group_by_device_and_dtype(tensors), 4 * 4, None)
    seen: dict[int, list[tuple[int, int]]] = {}
    for b in buckets:
        for source, (index, offset) in zip(b.sources, b.origins):
            seen.setdefault(index, []).append((offset, source.numel()))
            expected = Piece.slice_of(tensors[index].contiguous(), offset, source)
            assert torch.equal(source, expected)
    assert seen[0] == [(0, 4), (4, 4), (8, 2)]  # cut at the equal bucket size, 4 of fp32
    assert 1 not in seen  # empty tensors never travel
    assert seen[2] == [(0, 6)]  # non-contiguous: whole
    assert sum(n for pieces in seen.values() for _, n in pieces) == 19


def test_pool_plan_reuses_each_slot_after_the_bucket_before() -> None:
    buckets = cut_into_buckets(group_by_device_and_dtype([torch.zeros(20)]), 4 * 4, None)
    assert pool_plan(buckets, 2) == [(0, -1), (1, -1), (0, 0), (1, 1), (0, 2)]
    assert [p for _, p in pool_plan(buckets, 1)] == [-1, 0, 1, 2, 3]


class _Work:
    def __init__(self, name: int, log: list[str]) -> None:
        self.name, self.log = name, log


def _drive(previous: list[int], fail_at: int | None, raise_at: int | None) -> list[str]:
    log: list[str] = []

    def start(i: int) -> Any:
        log.append(f"start {i}")
        return _Work(i, log)

    def land(i: int, work: Any) -> bool:
        if i == raise_at:
            raise RuntimeError("verdict")
        log.append(f"land {i}")
        return i != fail_at

    def drain(work: Any) -> None:
        log.append(f"drain {work.name}")

    try:
        log.append(f"result {pipeline(previous, start, land, drain)}")
    except RuntimeError:
        log.append("raised")
    return log


def test_pipeline_packs_a_buffer_only_after_its_previous_user_landed() -> None:
    log = _drive([-1, -1, 0, 1], None, None)
    assert log == [
        "start 0", "start 1", "land 0", "start 2", "land 1", "start 3", "land 2", "land 3",
        "result True",
    ]  # fmt: skip


@pytest.mark.parametrize(("fail_at", "raise_at"), [(0, None), (None, 0)])
def test_a_refused_first_bucket_drains_what_was_started_and_stops(
    fail_at: int | None, raise_at: int | None
) -> None:
    log = _drive([-1, -1, 0, 1], fail_at, raise_at)
    end = ["land 0", "drain 1", "result False"] if fail_at == 0 else ["drain 1", "raised"]
    assert log == ["start 0", "start 1", *end]
