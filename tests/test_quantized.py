"""8-bit and 4-bit deltas (``comm_dtype="int8"``/``"int4"``): the mean within the format's bound
against a float64 reference, both reductions, on 2 and 4 gloo ranks; bitwise identical ranks
after every round; non-finite and out-of-step rounds that change nothing; exact resume; DiLoCo,
overlap and FSDP2 shards; the bytes a round sends."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from _common import flat_params, loss_of, mlp, raised, rank, roundtrip, sgd_wrapper, train
from torch import Tensor, nn

from local_sgd_optim import LocalSGDOptimizer
from local_sgd_optim.averaging import BucketedAverager
from local_sgd_optim.comm.quantize import FORMATS, choose_reduction
from local_sgd_optim.settings import Settings

KIB = 1 / 1024  # bucket_cap_mb for a bucket of 1 KiB
QMAX = {"int8": 127, "int4": 7}
RECORD = {"int8": 128 + 4, "int4": 64 + 4}  # bytes of a block of 128 values: codes, fp32 scale
EPS = torch.finfo(torch.float32).eps


def _header_bytes(world: int) -> int:
    return world * 6 * 8  # the header before every round: 6 int64 slots per rank


# --- functions run on every rank -----------------------------------------------------------


def _starts() -> list[Tensor]:
    """The same on every rank: a tensor of several buckets, one that no rank moves, and a
    transposed (non-contiguous) one, all float32."""
    g = torch.Generator().manual_seed(11)
    return [
        torch.randn(5000, generator=g) * 3,
        torch.randn(300, generator=g),
        torch.randn(20, 30, generator=g).t(),
    ]


def _mean_of_moves(comm_dtype: str, reduction: str) -> dict[str, Any]:
    """Every rank moves the tensors its own way, by amounts spread over four decades from one
    run of values to the next (so blocks get different scales), and averages once."""
    starts = _starts()
    tensors = [s.clone() for s in starts]
    averager = BucketedAverager(
        tensors, None, bucket_cap_mb=8 * KIB, comm_dtype=comm_dtype, quantized_reduction=reduction
    )
    averager.set_anchor_from_tensors()  # every rank holds the same values
    g = torch.Generator().manual_seed(100 + rank())
    magnitude = 10.0 ** (-4 * torch.rand(40, generator=g))
    with torch.no_grad():
        tensors[0] += torch.randn(5000, generator=g) * magnitude.repeat_interleave(125)
        tensors[2] += torch.randn(30, 20, generator=g) * 1e-2
    deltas = [(t - s).reshape(-1) for t, s in zip(tensors, starts)]  # as the bucket forms them
    before = averager.stats.bytes_communicated
    averager.average(step=1)
    return {
        "after": [t.clone() for t in tensors],
        "deltas": deltas,
        "layout": [(b.numel, b.shares, b.wire_bytes) for b in averager.buckets],
        "bytes": averager.stats.bytes_communicated - before,
        "reduction": averager.reduction,
    }


def _overlap_semantics(comm_dtype: str) -> dict[str, Any]:
    """start(), local progress, finish(): the mean of the snapshots plus this rank's progress."""
    g = torch.Generator().manual_seed(7)
    shared = torch.randn(2000, generator=g)
    tensor = shared.clone()
    averager = BucketedAverager(
        [tensor], None, bucket_cap_mb=KIB, comm_dtype=comm_dtype, overlap=True
    )
    averager.set_anchor_from_tensors()
    mine = torch.Generator().manual_seed(rank())
    with torch.no_grad():
        tensor += (rank() + 1) * 0.25 + 0.05 * torch.randn(2000, generator=mine)
    snapshot = tensor.clone()
    averager.start(step=1)
    with torch.no_grad():
        tensor += (rank() + 1) * 0.5  # local progress while the round is in flight
    averager.finish()
    return {
        "start": shared,
        "snapshot": snapshot,
        "after": tensor.clone(),
        "progress": (rank() + 1) * 0.5,
        "anchor": averager.anchor_tensors()[0].clone(),
    }


def _diloco(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def _train(
    comm_dtype: str | None,
    steps: int = 12,
    period: int = 3,
    overlap_steps: int = 0,
    outer: bool = False,
) -> dict[str, Any]:
    """Train with rounds every ``period`` steps; the parameters after every round and after
    close(), and the anchors."""
    model = mlp()
    opt = sgd_wrapper(
        model,
        period=period,
        momentum=0.9,
        comm_dtype=comm_dtype,
        overlap_steps=overlap_steps,
        outer_optimizer=_diloco if outer else None,
        bucket_cap_mb=KIB / 2,  # the model's 163 values in two buckets
    )
    after_rounds = []
    for i in range(steps):
        loss_of(model, rank(), i).backward()
        opt.step()
        opt.zero_grad()
        if (i + 1) % period == 0:
            after_rounds.append(flat_params(model))
    anchors = [a.clone() for a in opt.state_dict()["local_sgd"]["anchor"]]
    opt.close()
    return {
        "after_rounds": after_rounds,
        "final": flat_params(model),
        "anchors": anchors,
        "rounds": opt.stats.rounds,
    }


def _bits(t: Tensor) -> Tensor:
    """The bits of a float32 tensor (NaN compares equal to itself)."""
    return t.view(torch.int32).clone()


def _round_that_changes_nothing(
    comm_dtype: str, what: str, on_nonfinite: str = "raise"
) -> dict[str, Any]:
    """Two quantized rounds (the anchors are set at construction), a local step, then
    ``opt.average()`` with a NaN on rank 1 (``what="nan"``) or with rank 1 a step ahead
    (``"out of step"``)."""
    model = mlp()
    opt = sgd_wrapper(model, period=3, comm_dtype=comm_dtype, on_nonfinite=on_nonfinite)
    train(model, opt, 7)  # rounds at steps 3 and 6
    if rank() == 1:
        if what == "nan":
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("nan")
        else:
            train(model, opt, 1, start=7)  # a local step: the next round is at step 9
    before = _bits(flat_params(model))
    anchors = [_bits(a) for a in opt.state_dict()["local_sgd"]["anchor"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error = raised(opt.average)
    return {
        "error": error,
        "warned": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "unchanged": torch.equal(before, _bits(flat_params(model))),
        "anchors_unchanged": all(
            torch.equal(a, _bits(b))
            for a, b in zip(anchors, opt.state_dict()["local_sgd"]["anchor"])
        ),
        "anchored": bool(anchors),
    }


def _resume(comm_dtype: str, overlap_steps: int) -> dict[str, Any]:
    """A checkpoint taken mid-period (with ``overlap_steps``, while a round is in flight)
    continues bitwise as the run that was never interrupted."""

    def make(seed: int) -> tuple[nn.Module, LocalSGDOptimizer]:
        model = mlp(seed=seed)
        opt = sgd_wrapper(
            model,
            period=4,
            momentum=0.9,
            overlap_steps=overlap_steps,
            comm_dtype=comm_dtype,
            bucket_cap_mb=KIB / 2,
        )
        return model, opt

    model, opt = make(0)
    train(model, opt, 13)
    opt.close()
    straight = flat_params(model)

    model, opt = make(0)
    train(model, opt, 9)  # rounds at 4 and 8; with overlap_steps=2 the one of step 8 is in flight
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    entry = saved["opt"]["local_sgd"]
    model, opt = make(123)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(model, opt, 4, start=9)
    opt.close()
    return {
        "straight": straight,
        "resumed": flat_params(model),
        "in_flight": entry["pending"] is not None,
        "anchored": bool(entry["anchor"]),
    }


def _wide(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))


def _bytes_per_round(comm_dtype: str | None) -> list[int]:
    """Bytes this rank counts for each of three rounds (one per step)."""
    model = _wide()
    opt = LocalSGDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), model, period=1, comm_dtype=comm_dtype
    )
    g = torch.Generator().manual_seed(rank())
    counted = []
    for _ in range(3):
        before = opt.stats.bytes_communicated
        model(torch.randn(8, 64, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        counted.append(opt.stats.bytes_communicated - before)
    opt.close()
    return counted


def _fsdp2(comm_dtype: str) -> dict[str, Any]:
    """The bf16 FSDP2 test's setup with quantized deltas: sharded against the same wrapper on
    an unsharded model, with DiLoCo, and with overlap."""
    from test_fsdp2 import _diloco as fsdp2_diloco
    from test_fsdp2 import _mesh, _sharded_run, _unsharded_run

    mesh = _mesh()
    out: dict[str, Any] = {}
    for name, kwargs in {
        "diloco": {"comm_dtype": comm_dtype, "outer_optimizer": fsdp2_diloco},
        "overlap": {"comm_dtype": comm_dtype, "overlap_steps": 1},
    }.items():
        out[name] = _sharded_run(mesh, 7, 3, **kwargs)["history"]
        out[f"{name}_reference"] = _unsharded_run(mesh, 7, 3, **kwargs)
    out["full_precision"] = _unsharded_run(mesh, 7, 3, outer_optimizer=fsdp2_diloco)
    return out


# --- the bound ------------------------------------------------------------------------------


def _block_scales(flat: Tensor, layout: list[tuple[int, int, int]], qmax: int) -> Tensor:
    """For each element of the float64 ``flat`` (the buckets' values one after another): its
    block's absmax over ``qmax``, blocks of 128 counted from each bucket's start."""
    scales, offset = [], 0
    for numel, _, _ in layout:
        piece = flat[offset : offset + numel].abs()
        offset += numel
        padded = torch.nn.functional.pad(piece, (0, -numel % 128))
        scales.append((padded.view(-1, 128).amax(dim=1) / qmax).repeat_interleave(128)[:numel])
    return torch.cat(scales)


def _expected_payload(numel: int, shares: int, comm_dtype: str) -> int:
    blocks = -(-numel // 128)
    return -(-blocks // shares) * shares * RECORD[comm_dtype]


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["all_gather", "reduce_scatter"])
@pytest.mark.parametrize("comm_dtype", ["int8", "int4"])
@pytest.mark.parametrize("world", [2, 4])
def test_mean_is_within_the_formats_bound_and_bitwise_equal_across_ranks(
    ranks: Any, world: int, comm_dtype: str, reduction: str
) -> None:
    """Each element of the mean is within sum_r scale_r / (2 W) of the exact mean of the deltas
    (scale_r: its block's absmax over qmax on rank r), plus half the requantized block's scale
    for the reduce-scatter; every rank holds the same bits; a tensor no rank moved is exact."""
    results = ranks.run(_mean_of_moves, comm_dtype, reduction, world_size=world)
    r0 = results[0]
    assert r0["reduction"] == reduction
    for other in results[1:]:
        for a, b in zip(r0["after"], other["after"]):
            assert torch.equal(a, b)
    qmax, layout = QMAX[comm_dtype], r0["layout"]
    starts = torch.cat([s.reshape(-1) for s in _starts()]).double()
    deltas = [torch.cat(r["deltas"]).double() for r in results]
    mean = sum(deltas) / world
    bound = sum(_block_scales(d, layout, qmax) for d in deltas) / (2 * world)
    if reduction == "reduce_scatter":
        bound = bound + _block_scales(mean.abs() + bound, layout, qmax) / 2
    after = torch.cat([t.reshape(-1) for t in r0["after"]]).double()
    error = (after - (starts + mean)).abs()
    # float32 arithmetic on top: the scale's reciprocal, the sum, the anchor update.
    slack = 1e-5 * bound + 4 * EPS * (starts.abs() + mean.abs())
    assert (error <= bound + slack).all(), (error - bound - slack).max()
    assert (error / bound.clamp_min(1e-30)).max() > 0.3  # the values really were rounded
    assert torch.equal(r0["after"][1], _starts()[1])  # never moved: exactly as it was
    # Honest bytes: codes and scales of whole blocks (whole shares for the reduce-scatter).
    shares = world if reduction == "reduce_scatter" else 1
    for numel, bucket_shares, wire_bytes in layout:
        assert bucket_shares == shares
        assert wire_bytes == _expected_payload(numel, shares, comm_dtype)
    assert r0["bytes"] == sum(w for _, _, w in layout) + _header_bytes(world)


@pytest.mark.parametrize("comm_dtype", ["int8", "int4"])
def test_overlapped_round_is_mean_of_snapshots_plus_own_progress(
    ranks: Any, comm_dtype: str
) -> None:
    """With overlap, each rank keeps its own rounding error: its snapshot's delta counts as it
    was sent (dequantized), so it ends within one scale of mean + progress."""
    results = ranks.run(_overlap_semantics, comm_dtype)
    mean_snapshot = (results[0]["snapshot"].double() + results[1]["snapshot"].double()) / 2
    largest = max((r["snapshot"] - r["start"]).abs().max().item() for r in results)
    tolerance = largest / QMAX[comm_dtype] + 1e-5  # own half scale + the mean's half scale
    for r in results:
        torch.testing.assert_close(
            r["after"].double(), mean_snapshot + r["progress"], rtol=0, atol=tolerance
        )
        torch.testing.assert_close(r["anchor"].double(), mean_snapshot, rtol=0, atol=tolerance)
    assert torch.equal(results[0]["anchor"], results[1]["anchor"])
    assert not torch.equal(results[0]["after"], results[1]["after"])


@pytest.mark.parametrize(
    ("comm_dtype", "overlap_steps", "outer"),
    [
        ("int8", 0, False),
        ("int4", 0, False),
        ("int8", 0, True),
        ("int4", 0, True),
        ("int8", 2, False),
        ("int4", 2, True),
    ],
)
def test_training_leaves_ranks_bitwise_identical_and_close_to_full_precision(
    ranks: Any, comm_dtype: str, overlap_steps: int, outer: bool
) -> None:
    """Blocking rounds: every rank holds the same bits after every round (and the same
    anchors); with overlap and DiLoCo too after close(). The run stays near full precision."""
    kwargs = {"overlap_steps": overlap_steps, "outer": outer}
    reference = ranks.run(_train, None, **kwargs)
    results = ranks.run(_train, comm_dtype, **kwargs)
    r0, r1 = results
    assert torch.equal(r0["final"], r1["final"])
    if not overlap_steps:
        assert len(r0["after_rounds"]) == 4
        for a, b in zip(r0["after_rounds"], r1["after_rounds"]):
            assert torch.equal(a, b)
        assert r0["anchors"] and all(
            torch.equal(a, b) for a, b in zip(r0["anchors"], r1["anchors"])
        )
    assert r0["rounds"] == reference[0]["rounds"]
    drift = (r0["final"] - reference[0]["final"]).abs().max().item()
    # Measured at most 2.1e-3 (int8) and 3.1e-2 (int4) over these settings.
    assert 0 < drift < (0.01 if comm_dtype == "int8" else 0.1), drift


@pytest.mark.parametrize("comm_dtype", ["int8", "int4"])
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_a_nan_on_one_rank_changes_nothing_on_any_rank(
    ranks: Any, comm_dtype: str, on_nonfinite: str
) -> None:
    for r in ranks.run(_round_that_changes_nothing, comm_dtype, "nan", on_nonfinite):
        assert r["anchored"] and r["unchanged"] and r["anchors_unchanged"]
        if on_nonfinite == "raise":
            name, message = r["error"]
            assert name == "RoundError" and "non-finite" in message and "rank(s) 1" in message
        else:
            assert r["error"] == ("", "")
            assert any("non-finite" in w for w in r["warned"]), r["warned"]


@pytest.mark.parametrize("comm_dtype", ["int8", "int4"])
def test_ranks_at_different_steps_raise_and_change_nothing(ranks: Any, comm_dtype: str) -> None:
    for r in ranks.run(_round_that_changes_nothing, comm_dtype, "out of step"):
        name, message = r["error"]
        assert name == "RoundError" and "out of step" in message
        assert r["anchored"] and r["unchanged"] and r["anchors_unchanged"]


@pytest.mark.parametrize("comm_dtype", ["int8", "int4"])
@pytest.mark.parametrize("overlap_steps", [0, 2])
def test_state_dict_mid_training_resumes_bitwise(
    ranks: Any, comm_dtype: str, overlap_steps: int
) -> None:
    """The anchors (and with overlap_steps a quantized round in flight) round-trip."""
    results = ranks.run(_resume, comm_dtype, overlap_steps)
    for r in results:
        assert r["anchored"]
        assert r["in_flight"] == bool(overlap_steps)
        assert torch.equal(r["straight"], r["resumed"])
    assert torch.equal(results[0]["straight"], results[1]["straight"])


@pytest.mark.parametrize(("comm_dtype", "most"), [("int8", 0.27), ("int4", 0.14)])
def test_a_round_sends_at_most_its_share_of_fp32_bytes(
    ranks: Any, comm_dtype: str, most: float
) -> None:
    """From ``opt.stats.bytes_communicated``, header included: a quantized round against a
    full-precision one of the same 33,088 parameters (the anchors are set at construction,
    after the initial broadcast, so every round is quantized)."""
    full = ranks.run(_bytes_per_round, None)[0]
    quantized = ranks.run(_bytes_per_round, comm_dtype)[0]
    numel = sum(p.numel() for p in _wide().parameters())
    payload = _expected_payload(numel, 1, comm_dtype)  # one bucket, all-gathered on 2 ranks
    assert quantized == [payload + _header_bytes(2)] * 3
    assert full == [numel * 4 + _header_bytes(2)] * 3
    assert quantized[0] / full[0] <= most, quantized[0] / full[0]


@pytest.mark.parametrize("comm_dtype", ["int8"])
def test_fsdp2_shards_match_the_unsharded_wrapper(ranks: Any, comm_dtype: str) -> None:
    """On 2 replicas x 2 shards: DiLoCo and overlap with quantized deltas on FSDP2 shards
    follow the same wrapper on an unsharded model, and DiLoCo ends near full precision. The
    shards are cut into other blocks than the whole tensors, so values round differently:
    within a few scales (deltas of ~0.05 over 127 codes; measured 8.5e-4 at most)."""
    from test_fsdp2 import _shard_of

    results = ranks.run(_fsdp2, comm_dtype, world_size=4, timeout=150)
    for r, out in enumerate(results):
        s = r % 2  # replica r // 2, shard r % 2
        for name in ("diloco", "overlap"):
            got, want = out[name], out[f"{name}_reference"]
            assert len(got) == len(want) == 8
            for i, (mine, full) in enumerate(zip(got, want)):
                expected = _shard_of(full, s)
                torch.testing.assert_close(mine, expected, atol=3e-3, rtol=0, msg=f"{name} {i}")
        full = _shard_of(out["full_precision"][-1], s)
        torch.testing.assert_close(out["diloco"][-1], full, atol=3e-3, rtol=0)
        partner = results[(r + 2) % 4]  # the other replica, same shard: identical at the end
        for name in ("diloco", "overlap"):
            assert torch.equal(out[name][-1], partner[name][-1])


def test_settings_keep_the_formats_by_name_and_refuse_others() -> None:
    for name in ("int8", "int4"):
        settings = Settings.from_arguments(period=8, comm_dtype=name)
        assert settings.to_state()["comm_dtype"] == name
        assert Settings.from_state(settings.to_state())["comm_dtype"] == name
        assert f"setting comm_dtype={name}" in settings.describe()
    accepted = "None (full precision), torch.bfloat16, torch.float16, 'int8' or 'int4'"
    with pytest.raises(ValueError, match=re.escape(f"comm_dtype must be {accepted}, got 'int2'")):
        Settings.from_arguments(period=8, comm_dtype="int2")
    with pytest.raises(ValueError, match=r"got torch\.int8 .*the string 'int8'"):
        Settings.from_arguments(period=8, comm_dtype=torch.int8)


@pytest.mark.usefixtures("single_rank_group")
def test_buffers_are_allocated_once_and_sized_by_the_format() -> None:
    params = [torch.zeros(250_000) for _ in range(8)]  # 8 buckets of 250,000 at 1 MiB
    for name in ("int8", "int4"):
        fmt = FORMATS[name]
        averager = BucketedAverager(params, None, bucket_cap_mb=1.0, comm_dtype=name)
        averager.set_anchor_from_tensors()
        payload = _expected_payload(250_000, 1, name)
        assert {b.wire_bytes for b in averager.buckets} == {payload}
        assert averager.nbytes == 8 * payload
        # The anchor, one float32 staging buffer of whole blocks, two pool slots of the
        # payload and what the all-gather receives (1 rank here), int4's unpacked codes, and
        # float32 for codes cast before they are added (at most 1 MiB).
        staging = fmt.padded(250_000) * 4
        codes = fmt.padded(250_000) if name == "int4" else 0
        casts = min(1 << 18, fmt.padded(250_000)) * 4
        expected = 8 * 250_000 * 4 + staging + 2 * (2 * payload) + codes + casts
        assert averager.workspace_bytes == expected
        pointers = [b.wire.data_ptr() for b in averager.buckets]
        averager.average()
        averager.average()
        assert [b.wire.data_ptr() for b in averager.buckets] == pointers


@pytest.mark.usefixtures("single_rank_group")
def test_quantized_reduction_is_checked() -> None:
    params = [torch.zeros(10)]
    with pytest.raises(ValueError, match="quantized_reduction must be 'auto', 'all_gather' or"):
        BucketedAverager(params, None, comm_dtype="int8", quantized_reduction="ring")
    with pytest.raises(ValueError, match="'reduce_scatter' cannot overlap"):
        BucketedAverager(
            params, None, comm_dtype="int8", overlap=True, quantized_reduction="reduce_scatter"
        )
    assert BucketedAverager(params, None, comm_dtype="int4", overlap=True).reduction == "all_gather"
    # "auto": the all-gather on 2 ranks (the same bytes, one collective), the reduce-scatter
    # from 3 on (fewer bytes), the all-gather again with overlap (one collective in flight).
    assert choose_reduction("auto", 2, overlap=False) == "all_gather"
    assert choose_reduction("auto", 3, overlap=False) == "reduce_scatter"
    assert choose_reduction("auto", 8, overlap=True) == "all_gather"
