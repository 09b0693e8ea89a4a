"""Resuming: what a checkpoint's entry may be continued with, and what to tell the user.

The rule: counters and state come from the checkpoint, settings from the constructor. What the
constructor changed is named in a warning; what cannot carry over is refused before anything
changes.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from local_sgd_optim import state_entry
from local_sgd_optim.clock import Clock
from local_sgd_optim.comm.averager import BucketedAverager
from local_sgd_optim.comm.stats import CommStats
from local_sgd_optim.fragments import FragmentedAverager
from local_sgd_optim.outer import OuterOptimizer
from local_sgd_optim.settings import Settings

__all__ = ["BroadcastRecord", "check_loadable", "fresh_entry", "load_round_state", "warn_changes"]

# Settings that shape the averager's buckets: a round in flight or a 16-bit anchor saved with
# other values cannot be applied.
_LAYOUT = frozenset({"bucket_cap_mb", "comm_dtype", "average_buffers", "fragments"})


def fresh_entry(settings: Settings, world_size: int) -> dict[str, Any]:
    """The entry of a wrapper that has not stepped yet (for a plain optimizer checkpoint)."""
    counters = Clock.from_settings(settings).counters()
    return state_entry.build(counters, settings, world_size, CommStats(), {})


def check_loadable(
    entry: state_entry.Entry,
    settings: Settings,
    world_size: int,
    outer: OuterOptimizer | None,
) -> list[str]:
    """Raise a ValueError if ``entry`` cannot be continued; the settings that changed.

    Example::

        >>> changed = check_loadable(state_entry.parse(ours), settings, 2, None)
    """
    world = world_size if entry.world_size is None else entry.world_size
    if world != world_size:
        raise ValueError(
            f"the checkpoint was taken with world_size={world}, but this LocalSGDOptimizer "
            f"averages over {world_size} rank(s). Resume on {world} ranks, or convert "
            "the per-rank checkpoints with local_sgd_optim.checkpoint.reshard_state_dicts "
            "(parameters averaged, optimizer state by its documented rule)"
        )
    if entry.settings["local_period"] != settings.local_period:
        raise ValueError(
            f"the checkpoint was taken with local_period={entry.settings['local_period']}, "
            f"this LocalSGDOptimizer has local_period={settings.local_period}; build it with the "
            "checkpoint's two-level setting to resume"
        )
    if (entry.outer is None) != (outer is None):
        raise ValueError(
            "the checkpoint was taken "
            + ("with" if entry.outer is not None else "without")
            + " an outer_optimizer and this LocalSGDOptimizer has "
            + ("none" if outer is None else "one")
            + "; build it the same way to resume"
        )
    if entry.outer is not None and outer is not None:
        outer.check_state_dict(entry.outer)
    changed = settings.changed_from(entry.settings)
    if entry.pending is not None and (not settings.overlap_steps or _LAYOUT & set(changed)):
        raise ValueError(
            "the checkpoint holds an averaging round in flight (overlap_steps), which can "
            "only be applied with overlap_steps > 0 and the same bucket_cap_mb, comm_dtype, "
            f"average_buffers and fragments; this LocalSGDOptimizer changes {', '.join(changed)}. "
            "Resume once with the checkpoint's settings, or call opt.average() before "
            "saving so that nothing is in flight"
        )
    return changed


def warn_changes(settings: Settings, entry: state_entry.Entry, changed: list[str]) -> None:
    """One warning naming each setting the constructor changed since the checkpoint."""
    if changed:
        described = (
            f"{name}={getattr(settings, name)!r} (checkpoint: {entry.settings[name]!r})"
            for name in changed
        )
        warnings.warn(
            "LocalSGDOptimizer.load_state_dict: settings differ from the checkpoint's; the "
            "constructor's apply: " + ", ".join(described),
            stacklevel=3,
        )


def load_round_state(
    entry: state_entry.Entry,
    changed: list[str],
    averager: FragmentedAverager | None,
    local_averager: BucketedAverager | None,
) -> None:
    """Restore the anchors for 16-bit deltas and a round in flight from a checked entry."""
    anchor, local_anchor = entry.anchor, entry.local_anchor
    if _LAYOUT & set(changed):
        anchor = local_anchor = []  # another layout: the next round sets new ones
    if averager is not None:
        averager.load_anchor_tensors(anchor)
        averager.load_pending_state(entry.pending)
    elif entry.pending is not None:
        warnings.warn(
            "LocalSGDOptimizer.load_state_dict: the checkpoint holds a round in flight, "
            "but this wrapper does not communicate (one rank, or enabled=False); the "
            "round is dropped",
            stacklevel=3,
        )
    if local_averager is not None:
        local_averager.load_anchor_tensors(local_anchor)


class BroadcastRecord:
    """Whether the initial broadcast changed this rank's model, to warn when it replaced a
    per-rank checkpoint loaded into the model before the wrapper was built.

    Example::

        >>> record = BroadcastRecord()
        >>> record.note(model, changed=broadcast_tensors(state, None))
        >>> record.warn_if_replaced(model, clock)  # after load_state_dict
    """

    def __init__(self) -> None:
        self.changed = False
        self._versions: list[int] | None = None

    @staticmethod
    def _state_versions(model: nn.Module) -> list[int]:
        return [t._version for t in (*model.parameters(), *model.buffers())]

    def note(self, model: nn.Module, changed: bool) -> None:
        """The broadcast just ran; ``changed`` says whether it changed anything here."""
        self.changed = changed
        self._versions = self._state_versions(model)

    def warn_if_replaced(self, model: nn.Module, clock: Clock) -> None:
        """Warn if a checkpoint taken between rounds was loaded into the model before the
        broadcast replaced it, and nothing has written to the model since."""
        if (
            clock.optimizer_steps > clock.last_round_step
            and self.changed
            and self._versions is not None
            and self._state_versions(model) == self._versions
        ):
            warnings.warn(
                "LocalSGDOptimizer: this rank's parameters are rank 0's initial broadcast, "
                "not the checkpoint this rank saved between averaging rounds. Load the "
                "model's state dict after constructing LocalSGDOptimizer, or pass "
                "broadcast_initial=False when resuming",
                stacklevel=3,
            )
