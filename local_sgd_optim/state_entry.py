"""The ``"local_sgd"`` entry of a :class:`~local_sgd_optim.LocalSGDOptimizer`'s state dict.

Its keys are named here once; the optimizer writes and reads the entry through :func:`build`
and :func:`parse`, and :mod:`local_sgd_optim.checkpoint` adjusts it through
:func:`for_world_size`. Everything in it is tensors and plain containers, loadable with
``torch.load(..., weights_only=True)``.

Versions: 1 had the counters and ``period``, ``accumulation_steps``, ``average_buffers``; 2
added the communication settings; 3 added the next round's step, statistics, warm-up,
two-level and outer state. Older entries load with the defaults of what they lack.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import Tensor

from local_sgd_optim.comm.stats import CommStats
from local_sgd_optim.settings import Settings

__all__ = [
    "ANCHOR",
    "ENTRY_KEY",
    "LOCAL_ANCHOR",
    "OPTIMIZER_STEPS",
    "OUTER",
    "PENDING",
    "VERSION",
    "WORLD_SIZE",
    "Entry",
    "build",
    "for_world_size",
    "optimizer_steps_of",
    "parse",
]

ENTRY_KEY = "local_sgd"
VERSION = 3
OPTIMIZER_STEPS = "optimizer_steps"
WORLD_SIZE = "world_size"
ANCHOR = "anchor"
LOCAL_ANCHOR = "local_anchor"
PENDING = "pending"
OUTER = "outer"
STATS = "stats"
# Every version has these; the later ones are derived when an older entry lacks them.
COUNTERS = ("micro_steps", OPTIMIZER_STEPS, "averaging_rounds", "last_round_step")
LATER_COUNTERS = (
    "next_round_step",
    "local_rounds",
    "window_start",
    "period_start",
    "last_whole_round_step",
)
_PENDING_KEYS = {"step", "received", "sent"}
_LIMIT = 2**62  # counters beyond this are crafted: no run takes that many steps


@dataclasses.dataclass
class Entry:
    """A validated entry: what :func:`parse` read, in canonical types.

    Args:
        counters (dict): ``COUNTERS`` and ``LATER_COUNTERS`` by name.
        settings (dict): the saved settings (see :meth:`Settings.from_state`).
        world_size (int, optional): the ranks it was saved on (``None``: not recorded).
        stats (dict): the :class:`CommStats` fields.
        anchor (list of Tensor): the full-precision copy for 16-bit deltas (``[]``: none).
        local_anchor (list of Tensor): the same for the two-level subgroup's rounds.
        pending (dict, optional): a round in flight (``overlap_steps``).
        outer (dict, optional): the outer optimizer's kept copy, state and readiness.

    Example::

        >>> entry = parse(opt.state_dict()["local_sgd"])
        >>> entry.counters["optimizer_steps"]
        120
    """

    counters: dict[str, int]
    settings: dict[str, object]
    world_size: int | None
    stats: dict[str, Any]
    anchor: list[Tensor]
    local_anchor: list[Tensor]
    pending: dict[str, Any] | None
    outer: dict[str, Any] | None


def _bad(what: str) -> ValueError:
    return ValueError(f"the state dict's 'local_sgd' {what}")


def build(
    counters: dict[str, int],
    settings: Settings,
    world_size: int,
    stats: CommStats,
    tensors: dict[str, Any],
) -> dict[str, Any]:
    """The entry for a state dict: ``tensors`` holds ``ANCHOR``, ``LOCAL_ANCHOR``, ``PENDING``
    and ``OUTER`` where the wrapper has them (already copies).

    Example::

        >>> build(clock.counters(), settings, 2, stats, {})["version"]
        3
    """
    entry: dict[str, Any] = {"version": VERSION, **counters, **settings.to_state()}
    entry[WORLD_SIZE] = world_size
    entry[STATS] = stats.as_dict()
    entry.update(tensors)
    return entry


def parse(ours: object) -> Entry:
    """Check an entry read from a state dict; the :class:`Entry` it holds.

    Raises:
        ValueError: something is missing, of the wrong type, or inconsistent.

    Example::

        >>> parse(state["local_sgd"]).settings["period"]
        8
    """
    if not isinstance(ours, dict):
        raise ValueError(
            f"the state dict's 'local_sgd' entry must be a dict, got {type(ours).__name__}"
        )
    version = ours.get("version", VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version not in (1, 2, 3):
        raise _bad(f"version must be 1, 2 or 3, got {version!r}")
    missing = [name for name in COUNTERS if name not in ours]
    missing += Settings.missing_from_state(ours, version)
    if missing:
        raise _bad(f"entry lacks {', '.join(missing)}")
    settings = Settings.from_state(ours)
    return Entry(
        counters=_counters(ours, settings["period"], settings["warmup_steps"]),
        settings=settings,
        world_size=ours.get(WORLD_SIZE),
        stats=_stats(ours.get(STATS, {})),
        anchor=_finite(_tensor_list(ours, ANCHOR), ANCHOR),
        local_anchor=_finite(_tensor_list(ours, LOCAL_ANCHOR), LOCAL_ANCHOR),
        pending=_pending(ours.get(PENDING)),
        outer=_outer(ours.get(OUTER)),
    )


def _counter(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < _LIMIT:
        what = "non-negative" if minimum == 0 else "positive"
        raise _bad(f"counter {name} must be a {what} integer below 2**62, got {value!r}")
    return value


def _counters(ours: dict[str, Any], period: object, warmup: object) -> dict[str, int]:
    counters = {name: _counter(name, ours[name]) for name in COUNTERS}
    if counters["last_round_step"] > counters[OPTIMIZER_STEPS]:
        raise _bad(
            f"entry is inconsistent: last_round_step {counters['last_round_step']} is after "
            f"optimizer_steps {counters[OPTIMIZER_STEPS]}"
        )
    for name in ("local_rounds", "window_start"):
        counters[name] = _counter(name, ours.get(name, 0))
    steps = counters[OPTIMIZER_STEPS]
    if counters["micro_steps"] < steps:
        raise _bad(
            f"entry is inconsistent: micro_steps {counters['micro_steps']} is fewer than "
            f"optimizer_steps {steps} (each optimizer step takes at least one step() call)"
        )
    if "next_round_step" in ours:
        next_round = _counter("next_round_step", ours["next_round_step"], minimum=1)
        # A round at a step schedules the next after it (a disabled wrapper never rounds);
        # equal: taken in the round due at this step, which a fault-tolerance peer's state
        # is (sent from inside its quorum), and which the next step() runs if it is not.
        if counters["averaging_rounds"] and next_round < steps:
            raise _bad(
                f"entry is inconsistent: next_round_step {next_round} is before "
                f"optimizer_steps {steps}"
            )
    elif isinstance(period, int) and isinstance(warmup, int):
        # An older entry: rounds fell on multiples of the period after warm-up.
        next_round = warmup + period * (max(0, steps - warmup) // period + 1)
    else:
        raise _bad("entry lacks next_round_step")
    counters["next_round_step"] = next_round
    if "period_start" in ours:
        counters["period_start"] = _counter("period_start", ours["period_start"])
        if counters["period_start"] >= next_round:
            raise _bad(
                f"entry is inconsistent: period_start {counters['period_start']} is not before "
                f"next_round_step {next_round}"
            )
    else:
        # An older entry, saved without fragments: where the period that ends at the next
        # round began, as far as the counters tell.
        start = next_round - period if isinstance(period, int) else counters["last_round_step"]
        counters["period_start"] = max(0, start)
    whole = ours.get("last_whole_round_step", counters["last_round_step"])
    counters["last_whole_round_step"] = _counter("last_whole_round_step", whole)
    if counters["last_whole_round_step"] > counters["last_round_step"]:
        raise _bad(
            f"entry is inconsistent: last_whole_round_step {counters['last_whole_round_step']} "
            f"is after last_round_step {counters['last_round_step']}"
        )
    return counters


def _stats(stats: object) -> dict[str, Any]:
    fields = CommStats().as_dict()
    if not isinstance(stats, dict) or set(stats) - set(fields):
        raise _bad(f"stats must be a dict with keys {sorted(fields)}, got {stats!r}")
    if any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf
        for v in stats.values()
    ):
        raise _bad(f"stats must hold non-negative finite numbers, got {stats!r}")
    return {**fields, **stats}


def _finite(tensors: list[Tensor], key: str) -> list[Tensor]:
    """Refuse a full-precision copy holding NaN or inf: every round would spread it."""
    if not all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point()):
        raise _bad(f"{key} holds non-finite values (NaN or inf); it would spread to every rank")
    return tensors


def _tensor_list(ours: dict[str, Any], key: str) -> list[Tensor]:
    value = ours.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, Tensor) for t in value):
        raise _bad(f"{key} must be a list of tensors")
    return value


def _pending(pending: object) -> dict[str, Any] | None:
    if pending is not None and not (
        isinstance(pending, dict)
        and set(pending) - {"fragment"} == _PENDING_KEYS
        and isinstance(pending["step"], int)
        and isinstance(pending.get("fragment", 0), int)
        and all(
            isinstance(pending[k], list) and all(isinstance(t, Tensor) for t in pending[k])
            for k in ("received", "sent")
        )
    ):
        raise _bad(
            "pending must be None or a dict of 'step' and the 'received' and 'sent' tensor "
            "lists (and, with fragments, the 'fragment' index)"
        )
    return pending


def _outer(outer: object) -> dict[str, Any] | None:
    if outer is not None and not (
        isinstance(outer, dict)
        and isinstance(outer.get("params"), list)
        and all(isinstance(t, Tensor) for t in outer["params"])
        and isinstance(outer.get("state"), dict)
        and isinstance(outer.get("ready"), bool)
    ):
        raise _bad("outer must be None or a dict of 'params' (tensors), 'state' and 'ready'")
    return outer


def optimizer_steps_of(optimizer_state: object) -> object:
    """The optimizer steps an optimizer state dict records (``None`` if it has no entry)."""
    ours = optimizer_state.get(ENTRY_KEY) if isinstance(optimizer_state, dict) else None
    return ours.get(OPTIMIZER_STEPS) if isinstance(ours, dict) else None


def for_world_size(optimizer_state: dict[str, Any], world_size: int) -> None:
    """Adjust an optimizer state dict, in place, whose parameters were averaged over the old
    ranks, to continue on ``world_size`` ranks: a round in flight is part of that average, and
    the next round sets the full-precision copies for 16-bit deltas afresh."""
    ours = optimizer_state.get(ENTRY_KEY)
    if isinstance(ours, dict):
        ours = dict(ours)
        ours.update({WORLD_SIZE: world_size, ANCHOR: [], PENDING: None})
        if LOCAL_ANCHOR in ours:
            ours[LOCAL_ANCHOR] = []
        optimizer_state[ENTRY_KEY] = ours
