"""Argument checks of the cost model: each returns the number, or raises the ValueError a user
should see (what was wrong and what was given)."""

from __future__ import annotations

__all__ = ["check_comm_bits", "check_non_negative", "check_positive", "check_positive_int"]


def check_positive(name: str, value: float) -> float:
    """``value`` as a float if it is a number > 0 (not a bool), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """``value`` as a float if it is a number >= 0 (not a bool), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def check_positive_int(name: str, value: int) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_comm_bits(comm_bits: int) -> int:
    """``comm_bits`` if it is 16 or 32, else a ValueError."""
    if comm_bits not in (16, 32):
        raise ValueError(f"comm_bits must be 16 or 32, got {comm_bits!r}")
    return comm_bits
