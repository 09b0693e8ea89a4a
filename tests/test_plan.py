"""The cost model of ``local_sgd_optim.plan`` against numbers computed by hand."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

from local_sgd_optim import plan

# 1 Gbit/s moves 125e6 bytes per second; with 2 ranks a ring sends 2 (N - 1) / N = 1x the payload.
GBIT = 125e6


def test_allreduce_seconds_ring_traffic() -> None:
    assert plan.allreduce_seconds(125e6, 2, 1.0, latency_s=0.0) == pytest.approx(1.0)
    # 4 ranks: 2 * 3 / 4 = 1.5x the payload.
    assert plan.allreduce_seconds(125e6, 4, 1.0, latency_s=0.0) == pytest.approx(1.5)
    # 64 ranks over 10 Gbit/s, 4 GB: 2 * 63 / 64 * 4e9 / 1.25e9 = 6.3 s.
    assert plan.allreduce_seconds(4e9, 64, 10.0, latency_s=0.0) == pytest.approx(6.3)


def test_allreduce_seconds_latency_per_bucket_and_hop() -> None:
    # 100 MiB in 25 MiB buckets: 4 collectives of 2 ms each, plus the bytes.
    nbytes = 100 * 1024 * 1024
    expected = 4 * 2e-3 + nbytes / GBIT
    got = plan.allreduce_seconds(nbytes, 2, 1.0, latency_s=2e-3, bucket_cap_mb=25)
    assert got == pytest.approx(expected)
    # One byte over 25 MiB is a second bucket.
    assert plan.allreduce_seconds(
        25 * 1024 * 1024 + 1, 2, 1.0, latency_s=1.0, bucket_cap_mb=25
    ) == pytest.approx(2.0 + (25 * 1024 * 1024 + 1) / GBIT)
    # 8 ranks: 2 * 7 = 14 hops of 10 us on top of the fixed 1 ms, no bytes.
    assert plan.allreduce_seconds(
        1e-9, 8, 1e9, latency_s=1e-3, hop_latency_s=1e-5
    ) == pytest.approx(1e-3 + 14e-5, rel=1e-6)


def test_allreduce_seconds_efficiency_and_trivial_cases() -> None:
    assert plan.allreduce_seconds(
        125e6, 2, 1.0, latency_s=0.0, bandwidth_efficiency=0.5
    ) == pytest.approx(2.0)
    assert plan.allreduce_seconds(125e6, 1, 1.0) == 0.0
    assert plan.allreduce_seconds(0, 8, 1.0) == 0.0


def test_effective_gbps_inverts_allreduce_seconds() -> None:
    # 44.7 MB in 0.37 s between two hosts, as measured in DEVELOPERS.md: about 0.97 Gbit/s.
    gbps = plan.effective_gbps(44.7e6, 2, 0.37, latency_s=0.0)
    assert gbps == pytest.approx(44.7e6 * 8 / 0.37 / 1e9)
    assert plan.allreduce_seconds(44.7e6, 2, gbps, latency_s=0.0) == pytest.approx(0.37)
    gbps = plan.effective_gbps(10e6, 4, 0.05, latency_s=0.002)
    assert plan.allreduce_seconds(10e6, 4, gbps, latency_s=0.002) == pytest.approx(0.05)


def test_predict_local_sgd_synchronous() -> None:
    # c = 0.3 s, 125 MB over 1 Gbit/s between 2 ranks: a 1 s round every 8 steps.
    rate = plan.predict_steps_per_second(
        step_seconds=0.3,
        model_bytes=125e6,
        ranks=2,
        gbps=1.0,
        period=8,
        latency_s=0.0,
        bucket_cap_mb=None,
    )
    assert rate == pytest.approx(8 / (8 * 0.3 + 1.0))
    # 16-bit: a 0.5 s round.
    rate16 = plan.predict_steps_per_second(
        step_seconds=0.3,
        model_bytes=125e6,
        ranks=2,
        gbps=1.0,
        period=8,
        comm_bits=16,
        latency_s=0.0,
        bucket_cap_mb=None,
    )
    assert rate16 == pytest.approx(8 / (8 * 0.3 + 0.5))


def test_predict_local_sgd_overlap() -> None:
    common: dict[str, Any] = {
        "step_seconds": 0.3,
        "model_bytes": 125e6,
        "ranks": 2,
        "gbps": 1.0,
        "period": 8,
        "latency_s": 0.0,
        "bucket_cap_mb": None,
    }
    # A 1 s round behind 2 steps of 0.3 s: 0.4 s is still waited for.
    assert plan.predict_steps_per_second(**common, overlap_steps=2) == pytest.approx(
        8 / (8 * 0.3 + 0.4)
    )
    # Behind 4 steps (1.2 s) it is hidden entirely: the compute floor.
    assert plan.predict_steps_per_second(**common, overlap_steps=4) == pytest.approx(1 / 0.3)


def test_predict_ddp_hides_behind_backward() -> None:
    # 1 s of gradient all-reduce; backward is 2/3 of 0.3 s, so 0.1 + 1.0 per step.
    rate = plan.predict_ddp_steps_per_second(
        step_seconds=0.3, model_bytes=125e6, ranks=2, gbps=1.0, latency_s=0.0, bucket_cap_mb=None
    )
    assert rate == pytest.approx(1 / 1.1)
    # A fast link: communication fits in backward, compute bound.
    fast = plan.predict_ddp_steps_per_second(
        step_seconds=0.3, model_bytes=125e6, ranks=2, gbps=100.0, latency_s=0.0
    )
    assert fast == pytest.approx(1 / 0.3)
    assert plan.predict_ddp_steps_per_second(
        step_seconds=0.3, model_bytes=125e6, ranks=1, gbps=1.0
    ) == pytest.approx(1 / 0.3)


def test_suggest_period_is_the_smallest_that_reaches_the_target() -> None:
    common: dict[str, Any] = {"step_seconds": 0.3, "model_bytes": 125e6, "ranks": 2, "gbps": 1.0}
    link: dict[str, Any] = {"latency_s": 0.0, "bucket_cap_mb": None}
    # 1 / (0.3 + 1 / p) >= 0.9 / 0.3  <=>  1 / p <= 0.3 / 9  <=>  p >= 30.
    assert plan.suggest_period(**common, target_efficiency=0.9, **link) == 30
    # 16-bit halves the round: p >= 15.
    assert plan.suggest_period(**common, comm_bits=16, **link) == 15
    # Overlap of 4 steps hides the whole 1 s round from period 4 on.
    assert plan.suggest_period(**common, target_efficiency=1.0, overlap_steps=4, **link) == 4
    assert plan.suggest_period(**common, target_efficiency=0.9, max_period=29, **link) is None


def test_predict_table_rows() -> None:
    rows = plan.predict(
        step_seconds=0.3,
        model_bytes=125e6,
        ranks=2,
        gbps=1.0,
        periods=(1, 8),
        overlap_steps=2,
        latency_s=0.0,
        bucket_cap_mb=None,
    )
    assert [(r.method, r.period) for r in rows] == [
        ("DDP (fp32 gradients)", None),
        ("Local SGD fp32", 1),
        ("Local SGD bf16", 1),
        ("Local SGD fp32", 8),
        ("Local SGD bf16", 8),
        ("Local SGD bf16, overlap 2", 8),
    ]
    assert rows[3].steps_per_second == pytest.approx(8 / 3.4)
    assert rows[3].efficiency == pytest.approx(0.3 * 8 / 3.4)
    assert rows[3].bytes_per_step == pytest.approx(125e6 / 8)
    assert rows[4].bytes_per_step == pytest.approx(125e6 / 16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"period": 0}, "period must be a positive integer"),
        ({"comm_bits": 8}, "comm_bits must be 16 or 32"),
        ({"overlap_steps": 9}, "overlap_steps must be at most period"),
        ({"overlap_steps": -1}, "overlap_steps must be a non-negative integer"),
        ({"step_seconds": 0.0}, "step_seconds must be a positive number"),
        ({"gbps": -1.0}, "gbps must be a positive number"),
        ({"ranks": 0}, "ranks must be a positive integer"),
        ({"bandwidth_efficiency": 1.5}, "bandwidth_efficiency must be at most 1"),
    ],
)
def test_bad_input_is_a_value_error(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, Any] = {
        "step_seconds": 0.3,
        "model_bytes": 125e6,
        "ranks": 2,
        "gbps": 1.0,
        "period": 8,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        plan.predict_steps_per_second(**args)


def test_effective_gbps_needs_time_for_bytes() -> None:
    with pytest.raises(ValueError, match="must exceed latency_s"):
        plan.effective_gbps(1e6, 2, 0.001, latency_s=0.002)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "local_sgd_optim.plan", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_prints_the_table_and_a_period() -> None:
    result = _run_cli(
        "--params", "31.25e6", "--ranks", "2", "--gbps", "1", "--step-seconds", "0.3",
        "--periods", "1,8", "--latency-ms", "0", "--bucket-cap-mb", "1000",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "| method | period | steps/s |" in out
    # 31.25e6 parameters = 125 MB: period 8 fp32 is 8 / 3.4 = 2.35 steps/s, 71% of compute.
    assert "| Local SGD fp32 | 8 | 2.35 | 71% | 15.6 MB |" in out
    assert "| DDP (fp32 gradients) | - | 0.909 | 27% | 125 MB |" in out
    assert "shortest period reaching 90% of compute, fp32: period 30" in out


def test_cli_rejects_bad_input() -> None:
    result = _run_cli("--params", "1e9", "--ranks", "0", "--gbps", "10", "--step-seconds", "0.5")
    assert result.returncode == 2
    assert "ranks must be a positive integer" in result.stderr
    result = _run_cli("--params", "1e9", "--ranks", "8", "--gbps", "10", "--step-seconds", "0.5",
                      "--periods", "0,4")  # fmt: skip
    assert result.returncode == 2
    assert "periods must be positive integers" in result.stderr


def test_cli_default_table_shows_every_suggested_period() -> None:
    result = _run_cli("--params", "1e9", "--ranks", "64", "--gbps", "10", "--step-seconds", "0.5")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    suggested = [int(p) for p in re.findall(r"of compute, .*: period (\d+)", out)]
    assert suggested == [119, 60, 42]  # fp32 well beyond the powers of two up to 64
    tabulated = {int(p) for p in re.findall(r"^\| Local SGD fp32 \| (\d+) \|", out, re.M)}
    assert tabulated == {1, 2, 4, 8, 16, 32, 64, 119, 60, 42}
    assert "| Local SGD fp32 | 119 | 1.8 | 90% |" in out
