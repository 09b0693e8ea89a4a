"""Convergence on real data: digits on 4 gloo ranks, Local SGD variants against DDP.

A short version of ``benchmarks/convergence_digits.py`` (one seed, 8 epochs, 176 steps per
rank) with the same data, model and training code (``tests/_digits.py``). Every method
sees the same samples with the same hyperparameters; the test checks test accuracy against DDP's
and the bytes each rank all-reduced.
"""

from __future__ import annotations

import math
from typing import Any

import _digits
import pytest

pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")

EPOCHS = 8
# One seed and 360 test images (0.28 points each): allow 7 images of noise against DDP.
MARGIN = 0.02
METHODS = (
    "DDP",
    "local SGD H=16",
    "post-local SGD H=16",
    "outer Nesterov H=16",
    "two-level 4 / 16",
)
# MLP 64-128-10: what DDP all-reduces per step, and what a round averages.
PARAM_BYTES = 4 * (64 * 128 + 128 + 128 * 10 + 10)


def _train_all(methods: tuple[str, ...], seed: int, epochs: int) -> list[dict[str, Any]]:
    """Train each method in turn on this rank (every rank runs the same list)."""
    import dataclasses

    import torch

    torch.set_num_threads(1)
    hyper = dataclasses.replace(_digits.Hyper(), epochs=epochs)
    return [_digits.train(method, seed, hyper) for method in methods]


@pytest.fixture(scope="module")
def results(ranks) -> dict[str, list[dict[str, Any]]]:
    """Per method, the 4 ranks' results of one short run."""
    per_rank = ranks.run(_train_all, METHODS, 0, EPOCHS, world_size=4, timeout=180)
    return {m: [r[i] for r in per_rank] for i, m in enumerate(METHODS)}


def test_methods_need_no_missing_feature() -> None:
    assert {m: _digits.missing_features(m) for m in _digits.METHODS} == {
        m: [] for m in _digits.METHODS
    }


def test_same_samples_for_every_method(results) -> None:
    steps = {m: {r["steps"] for r in rs} for m, rs in results.items()}
    assert steps == {m: {EPOCHS * 22} for m in METHODS}  # 1437 // 4 // 16 = 22 steps per epoch


def test_shards_are_disjoint_and_cover_the_epoch() -> None:
    shards = [_digits.shard(3, 0, rank, 4) for rank in range(4)]
    seen = set().union(*(s.tolist() for s in shards))
    assert len(seen) == 4 * (_digits.TRAIN_SIZE // 4) == sum(len(s) for s in shards)
    assert _digits.shard(3, 0, 0, 4).tolist() != _digits.shard(4, 0, 0, 4).tolist()


def test_ranks_end_identical(results) -> None:
    for method, rs in results.items():
        assert len({r["accuracy"] for r in rs}) == 1, method


def test_ddp_learns_digits(results) -> None:
    ddp = results["DDP"][0]["accuracy"]
    assert ddp >= 0.93, ddp  # chance is 0.10


@pytest.mark.parametrize("method", METHODS[1:])
def test_accuracy_within_margin_of_ddp(results, method) -> None:
    ddp = results["DDP"][0]["accuracy"]
    ours = results[method][0]["accuracy"]
    assert ours >= 0.90, (method, ours)
    assert ours >= ddp - MARGIN, (method, ours, ddp)


def test_ddp_bytes_are_every_gradient_every_step(results) -> None:
    ddp = results["DDP"][0]
    assert ddp["bytes"] == ddp["steps"] * PARAM_BYTES


def test_local_sgd_sends_period_times_fewer_bytes(results) -> None:
    ddp, ours = results["DDP"][0], results["local SGD H=16"][0]
    assert ours["rounds"] == ours["steps"] // 16
    # Each round also carries a header of 9 floats per rank (steps and finiteness checks), 144
    # bytes on 4 ranks against 38,440 of parameters: within 1% of 16x fewer.
    assert ddp["bytes"] / ours["bytes"] >= 16 * 0.99, (ddp["bytes"], ours["bytes"])
    assert ddp["bytes"] / ours["bytes"] <= 16


def test_post_local_sgd_is_synchronous_for_its_warmup_only(results) -> None:
    ddp, post = results["DDP"][0], results["post-local SGD H=16"][0]
    warmup = post["steps"] // 4
    # Gradients at each warm-up step, then parameters every 16 steps and at close().
    assert post["rounds"] == math.ceil((post["steps"] - warmup) / 16)
    expected = (warmup + post["rounds"]) * PARAM_BYTES
    assert expected <= post["bytes"] <= 1.01 * expected, (post["bytes"], expected)
    assert post["bytes"] < ddp["bytes"] / 3


def test_two_level_adds_rounds_within_pairs_only(results) -> None:
    flat, two = results["local SGD H=16"][0], results["two-level 4 / 16"][0]
    # Across all 4 ranks: the same rounds as plain H=16, byte for byte.
    assert two["rounds"] == flat["rounds"]
    assert two["bytes"] - two["bytes_within_subgroup"] == flat["bytes"]
    # Within pairs: every 4th step except where a round across all ranks falls.
    local = two["steps"] // 4 - two["steps"] // 16
    expected = local * PARAM_BYTES
    assert expected <= two["bytes_within_subgroup"] <= 1.01 * expected
