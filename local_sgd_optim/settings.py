"""The wrapper's settings, defined once.

:class:`Settings` lists every setting of :class:`~local_sgd_optim.LocalSGDOptimizer` with its
check, whether a checkpoint keeps it and how, and what the cross-rank agreement compares. The
constructor's validation, the agreement, ``state_dict``/``load_state_dict``, ``repr`` and the
log line all iterate over these fields, so a setting cannot be left out of one of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from local_sgd_optim.checks import (
    check_average_buffers,
    check_bool,
    check_bucket_cap,
    check_comm_dtype,
    check_non_negative_int,
    check_on_nonfinite,
    check_overlap_steps,
    check_positive_int,
)
from local_sgd_optim.fault_tolerance import check_manager, check_settings, describe_manager
from local_sgd_optim.fragments import check_fragments

__all__ = ["PeriodSchedule", "Settings"]

PeriodSchedule = Callable[[int], int]
OuterFactory = Callable[[list[Tensor]], Optimizer]
_COMM_DTYPE_NAMES: dict[torch.dtype | str | None, str | None] = {
    None: None,
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    "int8": "int8",
    "int4": "int4",
}
_COMM_DTYPES_BY_NAME = {name: dtype for dtype, name in _COMM_DTYPE_NAMES.items()}


def _check_period(value: object) -> int | PeriodSchedule:
    if callable(value):
        return value  # each period it returns is checked
    return check_positive_int("period", value)


def _check_optional_positive(name: str) -> Callable[[object], int | None]:
    return lambda value: None if value is None else check_positive_int(name, value)


def _check_outer(value: object) -> OuterFactory | None:
    if value is not None and not callable(value):
        raise TypeError(
            "outer_optimizer must be a callable that takes a list of tensors and returns a "
            f"torch.optim.Optimizer, e.g. lambda ps: torch.optim.SGD(ps, lr=0.7), got "
            f"{type(value).__name__}"
        )
    return value


def _check_local_group(value: object) -> dist.ProcessGroup | str | None:
    if value is None or value == "node" or isinstance(value, dist.ProcessGroup):
        return value
    raise TypeError(
        "local_group must be a torch.distributed.ProcessGroup (this rank's subgroup) or "
        f"'node', got {type(value).__name__}"
    )


def _name_of(value: object) -> str:
    """A callable described by name: its repr would hold an address, different on each rank."""
    if value is None or not callable(value):
        return repr(value)
    return getattr(value, "__qualname__", type(value).__qualname__)


def _describe_period(value: object) -> str:
    """A period, or a schedule by its name and first periods (what it produces)."""
    if not callable(value):
        return repr(value)
    try:
        first = [value(step) for step in range(4)]
    except Exception as problem:  # checked properly when the wrapper asks for a period
        first = [f"raises {type(problem).__name__}"]
    return f"{_name_of(value)} giving {first} at steps 0-3"


def _describe_outer(value: object) -> str:
    """An outer optimizer factory by what it builds: the class and its hyperparameters."""
    if value is None or not callable(value):
        return repr(value)
    try:
        built = value([torch.zeros(1, requires_grad=True)])
    except Exception as problem:  # reported properly when the wrapper builds it
        return f"{_name_of(value)} raising {type(problem).__name__}"
    defaults = getattr(built, "defaults", {})
    settings = ", ".join(f"{k}={defaults[k]!r}" for k in sorted(defaults))
    return f"{type(built).__qualname__}({settings})"


def _encode_period(value: object) -> object:
    return None if callable(value) else value  # a schedule is code, not state


def _about(
    check: Callable[[object], Any],
    *,
    saved: bool = True,
    required_since: int | None = 1,
    encode: Callable[[Any], object] = lambda value: value,
    decode: Callable[[object], Any] | None = None,
    describe: Callable[[Any], str] = repr,
) -> Any:
    """What each consumer needs to know about a field of :class:`Settings`.

    ``saved``: kept in the state entry; ``required_since``: the entry version from which a
    checkpoint must hold it (``None``: never; a missing one takes the default);
    ``encode``/``decode``: between the value and what the entry holds (``decode`` also
    validates); ``describe``: for the cross-rank agreement.
    """
    return {
        "check": check,
        "saved": saved,
        "required_since": required_since,
        "encode": encode,
        "decode": decode or check,
        "describe": describe,
    }


def _decode_comm_dtype(name: object) -> torch.dtype | str | None:
    if name not in _COMM_DTYPES_BY_NAME:
        raise ValueError(
            f"comm_dtype must be one of {sorted(map(str, _COMM_DTYPES_BY_NAME))}, got {name!r}"
        )
    return _COMM_DTYPES_BY_NAME[name]


def _decode_period(value: object) -> int | None:
    return None if value is None else check_positive_int("period", value)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of :class:`~local_sgd_optim.LocalSGDOptimizer`, validated.

    The fields are the constructor's keyword arguments of the same names; see its docstring
    for what each does. Build one with :meth:`from_arguments`, which checks each value and the
    combinations.

    Example::

        >>> s = Settings.from_arguments(period=8, comm_dtype=torch.bfloat16)
        >>> s.describe()[0]
        'setting period=8'
    """

    period: int | PeriodSchedule = dataclasses.field(
        metadata=_about(
            _check_period, encode=_encode_period, decode=_decode_period, describe=_describe_period
        )
    )
    accumulation_steps: int = dataclasses.field(
        default=1, metadata=_about(lambda v: check_positive_int("accumulation_steps", v))
    )
    average_buffers: bool | str = dataclasses.field(
        default=True, metadata=_about(check_average_buffers)
    )
    broadcast_initial: bool = dataclasses.field(
        default=True, metadata=_about(lambda v: check_bool("broadcast_initial", v), saved=False)
    )
    enabled: bool = dataclasses.field(
        default=True, metadata=_about(lambda v: check_bool("enabled", v), saved=False)
    )
    bucket_cap_mb: float = dataclasses.field(
        default=25.0, metadata=_about(check_bucket_cap, required_since=3)
    )
    comm_dtype: torch.dtype | str | None = dataclasses.field(
        default=None,
        metadata=_about(
            check_comm_dtype,
            required_since=3,
            encode=lambda dtype: _COMM_DTYPE_NAMES[dtype],
            decode=_decode_comm_dtype,
            describe=str,
        ),
    )
    overlap_steps: int = dataclasses.field(
        default=0,
        metadata=_about(lambda v: check_non_negative_int("overlap_steps", v), required_since=3),
    )
    on_nonfinite: str = dataclasses.field(
        default="raise", metadata=_about(check_on_nonfinite, required_since=3)
    )
    warmup_steps: int = dataclasses.field(
        default=0,
        metadata=_about(lambda v: check_non_negative_int("warmup_steps", v), required_since=None),
    )
    outer_optimizer: OuterFactory | None = dataclasses.field(
        default=None, metadata=_about(_check_outer, saved=False, describe=_describe_outer)
    )
    # Where copies live, not what they hold: kept so that a change is named on resume, and
    # older entries, which lack it, take the default.
    cpu_offload: bool = dataclasses.field(
        default=False,
        metadata=_about(lambda v: check_bool("cpu_offload", v), required_since=None),
    )
    local_period: int | None = dataclasses.field(
        default=None, metadata=_about(_check_optional_positive("local_period"), required_since=None)
    )
    local_group: dist.ProcessGroup | str | None = dataclasses.field(
        default=None,
        metadata=_about(
            _check_local_group,
            saved=False,
            describe=lambda g: repr(g) if g is None or isinstance(g, str) else "a subgroup",
        ),
    )
    allow_identical_ranks: bool = dataclasses.field(
        default=False,
        metadata=_about(lambda v: check_bool("allow_identical_ranks", v), saved=False),
    )
    parameters_as_bucket_view: bool = dataclasses.field(
        default=False,
        metadata=_about(lambda v: check_bool("parameters_as_bucket_view", v), saved=False),
    )
    # Saved: the fragments' layout decides what the anchors and a round in flight mean.
    fragments: int = dataclasses.field(
        default=1,
        metadata=_about(lambda v: check_positive_int("fragments", v), required_since=None),
    )
    # A torchft Manager: rounds through its quorum (local_sgd_optim.fault_tolerance). Not
    # saved: which replicas average together is the Manager's business, not a checkpoint's.
    fault_tolerance: Any = dataclasses.field(
        default=None, metadata=_about(check_manager, saved=False, describe=describe_manager)
    )

    @classmethod
    def from_arguments(cls, **arguments: Any) -> Settings:
        """Check each argument and their combinations; the canonical :class:`Settings`.

        Args:
            **arguments: the constructor's settings by name; missing ones take their defaults.

        Raises:
            TypeError: a flag is not a bool, or a callable or group argument has the wrong type.
            ValueError: a value is out of range, or two settings do not go together.
        """
        values = {
            f.name: f.metadata["check"](arguments[f.name])
            for f in dataclasses.fields(cls)
            if f.name in arguments
        }
        settings = cls(**values)
        settings._check_combinations()
        return settings

    def _check_combinations(self) -> None:
        check_overlap_steps(self.overlap_steps, self.period)
        period, local = self.period, self.local_period
        if local is not None and isinstance(period, int) and local >= period:
            raise ValueError(
                f"local_period must be smaller than period, got local_period={local} with "
                f"period={period}: the subgroup rounds fall between the global ones"
            )
        if self.local_group is not None and local is None:
            raise ValueError("local_group was given without local_period; pass both")
        if self.overlap_steps and local is not None:
            raise ValueError(
                "overlap_steps cannot be combined with local_period yet; use overlap_steps=0 "
                "with two-level averaging"
            )
        if self.fragments > 1:
            check_fragments(self.fragments, period, self.overlap_steps)
            if local is not None:
                raise ValueError(
                    "fragments cannot be combined with local_period yet; use fragments=1 with "
                    "two-level averaging"
                )
        check_settings(self)

    def _fields(self, saved_only: bool = False) -> Iterator[dataclasses.Field[Any]]:
        return (f for f in dataclasses.fields(self) if f.metadata["saved"] or not saved_only)

    def describe(self) -> list[str]:
        """One ``setting name=value`` line per setting, equal on ranks with equal settings."""
        return [
            f"setting {f.name}={f.metadata['describe'](getattr(self, f.name))}"
            for f in self._fields()
        ]

    def to_state(self) -> dict[str, object]:
        """The settings a checkpoint keeps, as plain values."""
        return {f.name: f.metadata["encode"](getattr(self, f.name)) for f in self._fields(True)}

    @classmethod
    def missing_from_state(cls, entry: dict[str, Any], version: int) -> list[str]:
        """The saved settings that an entry of ``version`` must hold and ``entry`` lacks."""
        return [
            f.name
            for f in dataclasses.fields(cls)
            if f.metadata["saved"]
            and f.name not in entry
            and f.metadata["required_since"] is not None
            and version >= f.metadata["required_since"]
        ]

    @classmethod
    def from_state(cls, entry: dict[str, Any]) -> dict[str, object]:
        """The saved settings of ``entry``, validated, in their canonical types (a schedule's
        ``period`` is ``None``); the defaults for any it lacks.

        Raises:
            ValueError: a value is invalid.
        """
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            if not f.metadata["saved"]:
                continue
            raw = entry[f.name] if f.name in entry else f.metadata["encode"](f.default)
            try:
                values[f.name] = f.metadata["decode"](raw)
            except (TypeError, ValueError) as problem:
                raise ValueError(
                    f"the state dict's 'local_sgd' setting is invalid: {problem}"
                ) from None
        try:
            check_overlap_steps(values["overlap_steps"], values["period"])
            if values["fragments"] != 1:
                check_fragments(values["fragments"], values["period"], values["overlap_steps"])  # type: ignore[arg-type]
        except ValueError as problem:
            raise ValueError(
                f"the state dict's 'local_sgd' setting is invalid: {problem}"
            ) from None
        return values

    def changed_from(self, saved: dict[str, object]) -> list[str]:
        """The saved settings whose value here differs from ``saved`` (from :meth:`from_state`)."""
        changed = []
        for f in self._fields(saved_only=True):
            mine = getattr(self, f.name)
            if f.name == "period" and callable(mine):
                mine = None
            if saved[f.name] != mine:
                changed.append(f.name)
        return changed

    def summary(self, always: tuple[str, ...] = ("period", "accumulation_steps")) -> list[str]:
        """``name=value`` for the settings in ``always`` and those off their defaults."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in always or (value is not f.default and value != f.default):
                parts.append(f"{f.name}={f.metadata['describe'](value)}")
        return parts
