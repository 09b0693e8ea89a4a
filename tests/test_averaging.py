"""How rounds move bytes: buckets, mixed dtypes, 16-bit deltas, overlapped rounds, stats and
memory, checked against manual averaging on gloo ranks."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from _common import bn_net, flat_params, rank, roundtrip, sgd_wrapper, train
from torch import Tensor

from local_sgd_optim import LocalSGDOptimizer
from local_sgd_optim.averaging import BucketedAverager

KIB = 1 / 1024  # bucket_cap_mb for a bucket of 1 KiB

# --- functions run on every rank -----------------------------------------------------------

# The header before every round: 2 ranks x 6 int64 slots (what, step, flag, fingerprint,
# changed, plan).
HEADER_BYTES = 2 * 6 * 8


def _learnable_loss(model: Any, rank: int, step: int) -> Tensor:
    """Cross-entropy on labels a linear teacher assigns: a task the model can learn."""
    teacher = torch.randn(6, 3, generator=torch.Generator().manual_seed(42))
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1000 * rank + step))
    return torch.nn.functional.cross_entropy(model(x), (x @ teacher).argmax(dim=1))


def _tensors_with_awkward_sizes() -> list[Tensor]:
    """One tensor of many buckets, many tiny ones, an empty one, a transposed (non-contiguous)
    one and a 16-bit group of its own, with values that differ by rank."""
    g = torch.Generator().manual_seed(100 + rank())
    big = torch.randn(3000, generator=g)  # 11.7 KiB: about 12 buckets of 1 KiB
    tiny = [torch.randn(3, generator=g) for _ in range(40)]
    empty = torch.empty(0)
    transposed = torch.randn(20, 30, generator=g).t()  # 2.3 KiB, cannot be sliced
    half = torch.randn(700, generator=g).to(torch.bfloat16)
    wide = torch.randn(50, generator=g, dtype=torch.float64)
    assert not transposed.is_contiguous()
    return [big, *tiny, empty, transposed, half, wide]


def _average_awkward(bucket_cap_mb: float) -> dict[str, Any]:
    tensors = _tensors_with_awkward_sizes()
    before = [t.clone() for t in tensors]
    pointers = [t.data_ptr() for t in tensors]
    averager = BucketedAverager(tensors, None, bucket_cap_mb=bucket_cap_mb)
    averager.average()
    return {
        "before": before,
        "after": [t.clone() for t in tensors],
        "same_storage": pointers == [t.data_ptr() for t in tensors],
        "buckets": len(averager.buckets),
        "largest_bucket_bytes": max(b.wire_bytes for b in averager.buckets),
        "workspace_bytes": averager.workspace_bytes,
        "bytes": averager.stats.bytes_communicated,
    }


def _delta_precision(comm_dtype: torch.dtype | None) -> dict[str, Any]:
    """Large weights that move a little: deltas keep the error at the size of the move."""
    base = torch.full((4096,), 1000.0)
    tensor = base.clone()
    averager = BucketedAverager([tensor], None, comm_dtype=comm_dtype)
    averager.set_anchor_from_tensors()  # every rank starts from the same values
    g = torch.Generator().manual_seed(rank())
    moves = [torch.randn(4096, generator=g) * 1e-2 for _ in range(3)]
    for move in moves:
        tensor += move
        averager.average()
    return {"after": tensor.clone(), "moves": moves, "bytes": averager.stats.bytes_communicated}


def _overlap_semantics(comm_dtype: torch.dtype | None) -> dict[str, Any]:
    """start(), local progress, finish(): mean of the snapshots plus this rank's progress."""
    g = torch.Generator().manual_seed(7)
    shared = torch.randn(2000, generator=g)
    tensor = shared.clone()
    averager = BucketedAverager(
        [tensor], None, bucket_cap_mb=KIB, comm_dtype=comm_dtype, overlap=True
    )
    averager.set_anchor_from_tensors()
    tensor += (rank() + 1) * 0.25  # diverge before the snapshot
    snapshot = tensor.clone()
    averager.start()
    tensor += (rank() + 1) * 0.5  # local progress while the round is in flight
    averager.finish()
    return {"snapshot": snapshot, "after": tensor.clone(), "progress": (rank() + 1) * 0.5}


def _train(
    steps: int,
    *,
    period: int,
    overlap_steps: int = 0,
    comm_dtype: torch.dtype | None = None,
    accumulation: int = 1,
    close: bool = True,
) -> dict[str, Any]:
    model = bn_net(seed=rank())
    opt = sgd_wrapper(
        model,
        period=period,
        momentum=0.9,
        overlap_steps=overlap_steps,
        comm_dtype=comm_dtype,
        accumulation_steps=accumulation,
        bucket_cap_mb=KIB,
    )
    losses = []
    for i in range(steps * accumulation):
        loss = _learnable_loss(model, rank(), i)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    if close:
        opt.close()
    return {
        "params": torch.cat([flat_params(model), model[1].running_mean]),
        "losses": losses,
        "rounds": opt.averaging_rounds,
        "stats": opt.stats.as_dict(),
    }


def _debug_log_of_rounds() -> list[str]:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger("local_sgd_optim")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        _train(8, period=4, comm_dtype=torch.bfloat16)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return records


def _resume_with_round_in_flight(comm_dtype: torch.dtype | None) -> dict[str, Any]:
    """A checkpoint taken while an overlapped round is in flight resumes bitwise."""

    def make(seed: int) -> tuple[Any, LocalSGDOptimizer]:
        model = bn_net(seed=seed)
        opt = sgd_wrapper(
            model, period=4, momentum=0.9, overlap_steps=2, comm_dtype=comm_dtype, bucket_cap_mb=KIB
        )
        return model, opt

    model, opt = make(0)
    train(model, opt, 13)
    opt.close()
    straight = torch.cat([flat_params(model), model[1].running_mean])

    model, opt = make(0)
    train(model, opt, 9)  # the round of step 8 lands at step 10
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    in_flight = saved["opt"]["local_sgd"]["pending"] is not None
    model, opt = make(123)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(model, opt, 4, start=9)
    opt.close()
    resumed = torch.cat([flat_params(model), model[1].running_mean])
    return {"straight": straight, "resumed": resumed, "in_flight": in_flight}


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bucket_cap_mb", [KIB, 25.0])
def test_buckets_of_any_shape_average_to_the_mean(ranks: Any, bucket_cap_mb: float) -> None:
    r0, r1 = ranks.run(_average_awkward, bucket_cap_mb)
    for before0, before1, after0, after1 in zip(
        r0["before"], r1["before"], r0["after"], r1["after"]
    ):
        assert torch.equal(after0, after1)  # bitwise equal across ranks
        mean = (before0.double() + before1.double()) / 2
        tolerance = 1e-2 if after0.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(after0.double(), mean, rtol=0, atol=tolerance)
    assert r0["same_storage"] and r1["same_storage"]
    numel_bytes = sum(t.numel() * t.element_size() for t in r0["before"])
    # Every element sent once, plus the round's header.
    assert r0["bytes"] == numel_bytes + HEADER_BYTES
    if bucket_cap_mb == KIB:
        # fp32: 3000 + 120 elements fill 13 buckets of 256, the transposed tensor is one more;
        # bf16: 700 in buckets of 512 is two; fp64: one.
        assert r0["buckets"] == 14 + 2 + 1
        # Only the non-contiguous 2.3 KiB tensor may exceed the 1 KiB cap.
        assert r0["largest_bucket_bytes"] == 20 * 30 * 4
        assert r0["workspace_bytes"] <= 2 * 20 * 30 * 4
    else:
        assert r0["buckets"] == 3  # one per (device, dtype): bf16, fp32, fp64


def test_workspace_is_a_small_pool_not_a_copy_of_the_model() -> None:
    mib = 1024 * 1024
    params = [torch.zeros(250_000) for _ in range(8)]  # 8 MB, 8 MiB buckets' worth
    model_bytes = 8 * 250_000 * 4
    full = BucketedAverager(params, None, bucket_cap_mb=1.0)
    delta = BucketedAverager(params, None, bucket_cap_mb=1.0, comm_dtype=torch.bfloat16)
    delta.set_anchor_from_tensors()
    overlap = BucketedAverager(params, None, bucket_cap_mb=1.0, overlap=True)
    # 2M elements in buckets of at most 1 MiB of fp32 (262,144): 8 equal buckets of 250,000.
    # (The header is a collective of its own, a few dozen bytes allocated per round.)
    assert len(full.buckets) == 8 and {b.numel for b in full.buckets} == {250_000}
    # Each bucket is one whole tensor: all-reduced where it lies, with no buffer at all.
    assert all(b.in_place for b in full.buckets) and full.workspace_bytes == 0
    # Tensors of their own memory, two to a bucket: copied through a pool of two buffers.
    halves = [torch.zeros(125_000) for _ in range(16)]
    pooled = BucketedAverager(halves, None, bucket_cap_mb=1.0)
    assert not any(b.in_place for b in pooled.buckets)
    assert pooled.workspace_bytes == 2 * 250_000 * 4 <= 2 * mib
    # The full-precision copy, two 16-bit wire buffers and one fp32 staging buffer.
    assert delta.workspace_bytes == model_bytes + 2 * 250_000 * 2 + 250_000 * 4
    assert overlap.workspace_bytes == 2 * model_bytes  # in flight: wire + sent


@pytest.mark.parametrize("comm_dtype", [None, torch.bfloat16, torch.float16])
def test_deltas_keep_rounding_error_at_the_size_of_the_move(
    ranks: Any, comm_dtype: torch.dtype | None
) -> None:
    r0, r1 = ranks.run(_delta_precision, comm_dtype)
    assert torch.equal(r0["after"], r1["after"])
    exact = torch.full((4096,), 1000.0, dtype=torch.float64)
    for m0, m1 in zip(r0["moves"], r1["moves"]):
        exact += (m0.double() + m1.double()) / 2
    error = (r0["after"].double() - exact).abs().max().item()
    if comm_dtype is None:
        assert error <= 2.5e-4  # four fp32 spacings at 1000 (6.1e-5 each)
    else:
        # A move of ~3e-2 rounded to 8 (bf16) or 11 (fp16) mantissa bits, three times over.
        # Sending the weights themselves in bf16 would be off by up to 4.
        assert 0 < error <= (3e-3 if comm_dtype == torch.bfloat16 else 4e-4)
    itemsize = 4 if comm_dtype is None else 2
    assert r0["bytes"] == 3 * (4096 * itemsize + HEADER_BYTES)  # three rounds, each with its header


@pytest.mark.parametrize("comm_dtype", [None, torch.bfloat16])
def test_overlapped_round_is_mean_of_snapshots_plus_own_progress(
    ranks: Any, comm_dtype: torch.dtype | None
) -> None:
    results = ranks.run(_overlap_semantics, comm_dtype)
    mean_snapshot = (results[0]["snapshot"].double() + results[1]["snapshot"].double()) / 2
    tolerance = 1e-6 if comm_dtype is None else 4e-3  # bf16 delta of ~0.4
    for r in results:
        torch.testing.assert_close(
            r["after"].double(), mean_snapshot + r["progress"], rtol=0, atol=tolerance
        )
    assert not torch.equal(results[0]["after"], results[1]["after"])


@pytest.mark.parametrize(
    ("overlap_steps", "comm_dtype"),
    [(1, None), (2, None), (2, torch.bfloat16), (0, torch.bfloat16), (0, torch.float16)],
)
def test_training_converges_and_close_leaves_ranks_bitwise_identical(
    ranks: Any, overlap_steps: int, comm_dtype: torch.dtype | None
) -> None:
    reference = ranks.run(_train, 48, period=4)
    results = ranks.run(_train, 48, period=4, overlap_steps=overlap_steps, comm_dtype=comm_dtype)
    assert torch.equal(results[0]["params"], results[1]["params"])
    for r in results:
        first, last = sum(r["losses"][:8]) / 8, sum(r["losses"][-8:]) / 8
        assert last < 0.7 * first, (first, last)
        # One every 4 steps; the round of step 48 is still in flight at close() with overlap,
        # so close() lands it and runs one more, blocking, to make the ranks identical.
        assert r["rounds"] == 12 + (1 if overlap_steps else 0)
    if overlap_steps:
        # A stale average changes the trajectory, not where it goes: the same final loss.
        final = sum(results[0]["losses"][-8:]) / 8
        reference_final = sum(reference[0]["losses"][-8:]) / 8
        assert abs(final - reference_final) < 0.2 * reference_final, (final, reference_final)
    else:
        # 16-bit deltas: close to the full-precision run of the same steps.
        drift = (results[0]["params"] - reference[0]["params"]).abs().max().item()
        assert drift < 0.05, drift  # weights of order 1, after 48 steps of momentum SGD


def test_overlap_composes_with_accumulation(ranks: Any) -> None:
    plain = ranks.run(_train, 12, period=4, overlap_steps=2, accumulation=1, close=False)
    accumulated = ranks.run(_train, 12, period=4, overlap_steps=2, accumulation=3, close=False)
    for r in plain + accumulated:
        assert r["rounds"] == 3
    # Rounds of steps 4 and 8 landed (2 steps later); the one of step 12 is still in flight.
    assert accumulated[0]["stats"]["rounds"] == 2
    assert not torch.equal(accumulated[0]["params"], accumulated[1]["params"])


@pytest.mark.parametrize("comm_dtype", [None, torch.bfloat16])
def test_checkpoint_with_a_round_in_flight_resumes_bitwise(
    ranks: Any, comm_dtype: torch.dtype | None
) -> None:
    results = ranks.run(_resume_with_round_in_flight, comm_dtype)
    for r in results:
        assert r["in_flight"]
        assert torch.equal(r["straight"], r["resumed"])
    assert torch.equal(results[0]["straight"], results[1]["straight"])


def test_stats_count_every_byte_sent(ranks: Any) -> None:
    full, half = (
        ranks.run(_train, 8, period=4, comm_dtype=dtype) for dtype in (None, torch.bfloat16)
    )
    n = sum(p.numel() for p in bn_net().parameters()) + 2 * 8  # BatchNorm mean and var
    assert full[0]["stats"]["rounds"] == 2 and half[0]["stats"]["rounds"] == 2
    # Two rounds, each with its header, and the header of close() (no round due then).
    assert full[0]["stats"]["bytes_communicated"] == 2 * (n * 4 + HEADER_BYTES) + HEADER_BYTES
    assert half[0]["stats"]["bytes_communicated"] == 2 * (n * 2 + HEADER_BYTES) + HEADER_BYTES
    assert full[0]["stats"]["comm_seconds"] > 0
    assert full[0]["stats"]["round_seconds"] >= full[0]["stats"]["comm_seconds"]


def test_rounds_are_logged_at_debug_with_their_bytes(ranks: Any) -> None:
    r0, r1 = ranks.run(_debug_log_of_rounds)
    n = sum(p.numel() for p in bn_net().parameters()) + 2 * 8
    for records in (r0, r1):
        rounds = [line for line in records if line.startswith("DEBUG round")]
        assert len(rounds) == 2
        assert rounds[0].startswith("DEBUG round 1 at step 4 (blocking): ")
        assert f"{n * 2 + HEADER_BYTES} bytes sent" in rounds[0]
    assert sum(line.startswith("INFO LocalSGDOptimizer: period=4") for line in r0) == 1
    assert not any(line.startswith("INFO") for line in r1)  # settings are logged on rank 0
