"""Assertions on what the ranks returned: parameters, ``LocalSGDOptimizer`` counters, resumes.

Each takes the per-rank results of a call (a list in rank order) and raises an
``AssertionError`` that names the rank, the entry and the values that differ. Results may be
tensors, state dicts, or any nesting of mappings, lists and tuples of tensors and plain values;
an ``nn.Module`` is compared through its ``state_dict()``. Tensors are compared bitwise by
default (NaN equals NaN, ``0.0`` differs from ``-0.0``), or within ``atol + rtol * |expected|``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from local_sgd_optim.optimizer import LocalSGDOptimizer

__all__ = [
    "COUNTERS",
    "assert_counters_equal",
    "assert_ranks_equal",
    "assert_resumed_equal",
    "counters_of",
]

# The progress a LocalSGDOptimizer keeps; ranks in step agree on every one of them.
COUNTERS = ("micro_steps", "optimizer_steps", "averaging_rounds", "local_rounds", "next_round_step")
_SHOWN = 10  # differences listed in a message; the rest are counted


def counters_of(optimizer: LocalSGDOptimizer) -> dict[str, int]:
    """The optimizer's counters as plain integers, to return from a rank.

    Args:
        optimizer (LocalSGDOptimizer): the optimizer of this rank.

    Example::

        >>> def train(steps):
        ...     ...
        ...     return {"model": model.state_dict(), "counters": counters_of(opt)}
    """
    if not isinstance(optimizer, LocalSGDOptimizer):
        raise TypeError(f"optimizer must be a LocalSGDOptimizer, got {type(optimizer).__name__}")
    return {name: int(getattr(optimizer, name)) for name in COUNTERS}


def _bits(t: Tensor) -> Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _tensor_difference(got: Tensor, want: Tensor, atol: float, rtol: float) -> str | None:
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"{got.dtype} {tuple(got.shape)} vs {want.dtype} {tuple(want.shape)}"
    got, want = got.detach().cpu(), want.detach().cpu()
    if atol == 0 and rtol == 0:
        if torch.equal(_bits(got), _bits(want)):
            return None
    elif torch.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True).all():
        return None
    if got.is_floating_point() or got.is_complex():
        gap = (got.double() - want.double()).abs().nan_to_num(nan=math.inf).max().item()
        return f"max abs difference {gap:.3g}" if gap > 0 else "signed zeros or NaN bits differ"
    changed = int((got != want).sum().item())
    return f"{changed} of {got.numel()} elements differ"


def _value_difference(got: Any, want: Any, atol: float, rtol: float) -> str | None:
    if isinstance(got, float) and isinstance(want, float) and (atol or rtol):
        close = math.isclose(got, want, rel_tol=rtol, abs_tol=atol)
        return None if close or (math.isnan(got) and math.isnan(want)) else f"{got!r} vs {want!r}"
    if type(got) is not type(want):
        return f"{type(got).__name__} {got!r} vs {type(want).__name__} {want!r}"
    if isinstance(got, float) and math.isnan(got) and math.isnan(want):
        return None
    return None if got == want else f"{got!r} vs {want!r}"


def _differences(got: Any, want: Any, atol: float, rtol: float, path: str = "") -> list[str]:
    """Where ``got`` and ``want`` differ: ``"path: how"`` for each differing entry."""
    where = path or "(the result)"
    if isinstance(got, nn.Module):
        got = got.state_dict()
    if isinstance(want, nn.Module):
        want = want.state_dict()
    if isinstance(got, Tensor) and isinstance(want, Tensor):
        how = _tensor_difference(got, want, atol, rtol)
        return [] if how is None else [f"{where}: {how}"]
    if isinstance(got, Mapping) and isinstance(want, Mapping):
        if list(got) != list(want):
            only_got = [k for k in got if k not in want]
            only_want = [k for k in want if k not in got]
            if only_got or only_want:
                return [f"{where}: keys {only_got} only here, {only_want} only there"]
        found = []
        for key in got:
            found += _differences(
                got[key], want[key], atol, rtol, f"{path}.{key}" if path else str(key)
            )
        return found
    sequences = (list, tuple)
    if isinstance(got, sequences) and isinstance(want, sequences) and type(got) is type(want):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items vs {len(want)}"]
        found = []
        for i, (a, b) in enumerate(zip(got, want)):
            found += _differences(a, b, atol, rtol, f"{path}[{i}]")
        return found
    how = _value_difference(got, want, atol, rtol)
    return [] if how is None else [f"{where}: {how}"]


def _listed(found: list[str]) -> str:
    shown = "\n".join(f"  {line}" for line in found[:_SHOWN])
    more = len(found) - _SHOWN
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def _check_tolerances(atol: float, rtol: float) -> None:
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"atol and rtol must be non-negative, got atol={atol!r}, rtol={rtol!r}")


def assert_ranks_equal(results: Sequence[Any], *, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Assert that every rank returned the same thing as rank 0: bitwise, or within a tolerance.

    Args:
        results (Sequence): one result per rank, in rank order (what ``ranks.run`` returns):
            tensors, state dicts, modules, or nestings of them with plain values.
        atol (float): absolute tolerance for tensors and floats; ``0`` with ``rtol=0`` compares
            bits (default: ``0.0``).
        rtol (float): relative tolerance (default: ``0.0``).

    Raises:
        AssertionError: a rank differs from rank 0; the message names the rank, the entry and
            by how much.

    Example::

        >>> results = ranks.run(train, steps=16)
        >>> assert_ranks_equal([r["model"] for r in results])
    """
    __tracebackhide__ = True  # pytest shows the caller's line
    _check_tolerances(atol, rtol)
    found = []
    for rank in range(1, len(results)):
        found += [
            f"rank {rank} vs rank 0, {line}"
            for line in _differences(results[rank], results[0], atol, rtol)
        ]
    if found:
        kind = "bitwise" if atol == 0 and rtol == 0 else f"atol={atol:g}, rtol={rtol:g}"
        raise AssertionError(f"the ranks' results differ ({kind}):\n{_listed(found)}")


def assert_counters_equal(counters: Sequence[Mapping[str, int]], **expected: int) -> None:
    """Assert that every rank's ``LocalSGDOptimizer`` counters agree, and have the values given.

    Args:
        counters (Sequence[Mapping[str, int]]): one :func:`counters_of` result per rank, in rank
            order.
        **expected (int): values that every rank's counters must have, e.g.
            ``averaging_rounds=4``.

    Raises:
        AssertionError: the ranks disagree on a counter (the message lists every rank's value),
            or a counter is not the expected value.

    Example::

        >>> results = ranks.run(train, steps=16, period=4)
        >>> assert_counters_equal([r["counters"] for r in results], averaging_rounds=4)
    """
    __tracebackhide__ = True  # pytest shows the caller's line
    unknown = sorted(set(expected) - set(COUNTERS))
    if unknown:
        raise ValueError(f"unknown counters {unknown}; the counters are {list(COUNTERS)}")
    found = []
    for name in COUNTERS:
        values = [rank_counters.get(name) for rank_counters in counters]
        if len(set(values)) > 1:
            by_rank = ", ".join(f"rank {rank} at {value}" for rank, value in enumerate(values))
            found.append(f"{name}: {by_rank}")
        elif name in expected and values and values[0] != expected[name]:
            found.append(f"{name}: {values[0]} on every rank, expected {expected[name]}")
    if found:
        raise AssertionError(f"LocalSGDOptimizer counters are wrong:\n{_listed(found)}")


def assert_resumed_equal(
    resumed: Sequence[Any], uninterrupted: Sequence[Any], *, atol: float = 0.0, rtol: float = 0.0
) -> None:
    """Assert that a run resumed from a checkpoint ended where the uninterrupted run did.

    Rank ``r`` of ``resumed`` is compared with rank ``r`` of ``uninterrupted``, bitwise by default.

    Args:
        resumed (Sequence): the per-rank results of the run resumed from a checkpoint.
        uninterrupted (Sequence): the per-rank results of the same run without interruption.
        atol (float): absolute tolerance; ``0`` with ``rtol=0`` compares bits (default: ``0.0``).
        rtol (float): relative tolerance (default: ``0.0``).

    Raises:
        AssertionError: a rank's resumed result differs; the message names the rank, the entry
            and by how much.

    Example::

        >>> uninterrupted = ranks.run(train, steps=16)
        >>> ranks.run(train, steps=16, stop_at=6, checkpoint_dir=str(tmp_path))
        >>> resumed = ranks.run(train, steps=16, checkpoint_dir=str(tmp_path))
        >>> assert_resumed_equal(resumed, uninterrupted)
    """
    __tracebackhide__ = True  # pytest shows the caller's line
    _check_tolerances(atol, rtol)
    if len(resumed) != len(uninterrupted):
        raise AssertionError(
            f"the resumed run has {len(resumed)} ranks, the uninterrupted one {len(uninterrupted)}"
        )
    found = []
    for rank, (got, want) in enumerate(zip(resumed, uninterrupted)):
        found += [f"rank {rank}, {line}" for line in _differences(got, want, atol, rtol)]
    if found:
        raise AssertionError(
            f"the resumed run differs from the uninterrupted one:\n{_listed(found)}"
        )
