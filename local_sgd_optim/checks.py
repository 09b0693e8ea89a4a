"""Argument checks shared by the settings and the state entry.

Each returns the value in its canonical type, or raises the error a user should see: what was
wrong and what was given.
"""

from __future__ import annotations

import math
import operator

import torch

__all__ = [
    "QUANTIZED_COMM_DTYPES",
    "SUPPORTED_COMM_DTYPES",
    "check_average_buffers",
    "check_bool",
    "check_bucket_cap",
    "check_comm_dtype",
    "check_non_negative_int",
    "check_on_nonfinite",
    "check_overlap_steps",
    "check_positive_int",
]

SUPPORTED_COMM_DTYPES = (torch.bfloat16, torch.float16)
# 8- and 4-bit deltas, by name: they are formats (codes and scales), not tensor dtypes.
QUANTIZED_COMM_DTYPES = ("int8", "int4")
_COMM_DTYPES = "None (full precision), torch.bfloat16, torch.float16, 'int8' or 'int4'"


def _as_int(value: object) -> int | None:
    """``value`` as an int when it is an integer (NumPy integers welcome, bools not)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an int if it is one >= 1, else a ValueError."""
    as_int = _as_int(value)
    if as_int is None or as_int < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return as_int


def check_non_negative_int(name: str, value: object) -> int:
    """``value`` as an int if it is one >= 0, else a ValueError."""
    as_int = _as_int(value)
    if as_int is None or as_int < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return as_int


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool, else a TypeError."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_average_buffers(value: object) -> bool | str:
    """``value`` if it is ``True``, ``False`` or ``"all"``, else a TypeError or ValueError."""
    if isinstance(value, bool) or value == "all":
        return value
    if isinstance(value, str):
        raise ValueError(
            f"average_buffers must be True (average running statistics, copy the other "
            f"floating-point buffers from the first rank), 'all' or False, got {value!r}"
        )
    raise TypeError(f"average_buffers must be a bool or 'all', got {type(value).__name__}")


def check_bucket_cap(value: object) -> float:
    """``value`` as a float if it is a positive, finite number of MiB."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and value > 0:  # type: ignore[arg-type,operator]
        return float(value)  # type: ignore[arg-type]
    raise ValueError(f"bucket_cap_mb must be a positive number of MiB, got {value!r}")


def check_overlap_steps(value: object, period: object) -> int:
    """``value`` as an int if it is >= 0 and below ``period`` (an int; anything else is a
    schedule, whose periods are checked as they come)."""
    steps = check_non_negative_int("overlap_steps", value)
    if steps and isinstance(period, int) and steps >= period:
        raise ValueError(
            f"overlap_steps must be smaller than period, got overlap_steps={steps} with "
            f"period={period}: a round must land before the next one starts"
        )
    return steps


def check_comm_dtype(comm_dtype: object) -> torch.dtype | str | None:
    """``comm_dtype`` if it is ``None``, ``torch.bfloat16``, ``torch.float16``, ``"int8"`` or
    ``"int4"``, else raise."""
    if isinstance(comm_dtype, str):
        if comm_dtype in QUANTIZED_COMM_DTYPES:
            return comm_dtype
        raise ValueError(f"comm_dtype must be {_COMM_DTYPES}, got {comm_dtype!r}")
    if comm_dtype is None or comm_dtype in SUPPORTED_COMM_DTYPES:
        return comm_dtype
    if not isinstance(comm_dtype, torch.dtype):
        raise TypeError(f"comm_dtype must be {_COMM_DTYPES}, got {type(comm_dtype).__name__}")
    # torch.int8 is a tensor dtype; the 8-bit deltas' format is named by a string.
    hint = " (for 8-bit deltas pass the string 'int8')" if comm_dtype == torch.int8 else ""
    raise ValueError(f"comm_dtype must be {_COMM_DTYPES}, got {comm_dtype}{hint}")


def check_on_nonfinite(value: object) -> str:
    """``value`` if it is ``"raise"`` or ``"skip"``."""
    if value not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {value!r}")
    return value
