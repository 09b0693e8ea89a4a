"""The clock: counters, accumulation windows, the period schedule and warm-up.

:class:`Clock` answers "what is due at this step?" from counters alone, so that every rank, given
the same calls, reaches the same answer. It does no communication and knows no tensors.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Callable

from local_sgd_optim import state_entry
from local_sgd_optim.fragments import check_fragments, fragment_offsets

if TYPE_CHECKING:
    from local_sgd_optim.settings import Settings

__all__ = ["Clock"]

PeriodSchedule = Callable[[int], int]


class Clock:
    """Counters of one :class:`~local_sgd_optim.LocalSGDOptimizer` and what they make due.

    Args:
        period (int or Callable[[int], int]): steps between rounds, or a schedule.
        accumulation_steps (int): ``step()`` calls per optimizer step.
        overlap_steps (int): steps between a round's start and its landing.
        warmup_steps (int): synchronous steps before the first round.
        local_period (int, optional): steps between subgroup rounds (two-level).
        fragments (int): fragments of the model averaged at staggered steps of each period
            (default: 1, the whole model at the period's end).

    Example::

        >>> clock = Clock(period=4, accumulation_steps=2, overlap_steps=0, warmup_steps=0)
        >>> clock.schedule_first_round()
        >>> [clock.count_micro_step() for _ in range(4)]
        [False, True, False, True]
        >>> clock.count_optimizer_step(); clock.round_due()
        False
    """

    def __init__(
        self,
        period: int | PeriodSchedule,
        accumulation_steps: int,
        overlap_steps: int,
        warmup_steps: int,
        local_period: int | None = None,
        fragments: int = 1,
    ) -> None:
        self.period = period
        self.accumulation_steps = accumulation_steps
        self.overlap_steps = overlap_steps
        self.warmup_steps = warmup_steps
        self.local_period = local_period
        self.fragments = fragments
        self.micro_steps = 0
        self.optimizer_steps = 0
        self.averaging_rounds = 0
        self.last_round_step = 0
        self.local_rounds = 0
        # micro_steps where the grid of accumulation windows starts (moves when a resumed run
        # changes accumulation_steps), so that windows stay whole.
        self.window_start = 0
        self.next_round_step = 0
        self.period_start = 0  # the step the current period started at (its fragments' origin)
        self.last_whole_round_step = 0  # the last round of every fragment at once

    @classmethod
    def from_settings(cls, settings: Settings) -> Clock:
        """A clock at step 0 for ``settings``, its first round scheduled."""
        clock = cls(
            settings.period,
            settings.accumulation_steps,
            settings.overlap_steps,
            settings.warmup_steps,
            settings.local_period,
            settings.fragments,
        )
        clock.schedule_first_round()
        return clock

    def schedule_first_round(self) -> None:
        """The first round: a period after warm-up."""
        self.period_start = self.warmup_steps
        self.next_round_step = self.warmup_steps + self.period_from(self.warmup_steps)

    # --- micro-steps and windows ----------------------------------------------------------

    def count_micro_step(self) -> bool:
        """Count one ``step()`` call; whether it ends an accumulation window."""
        self.micro_steps += 1
        return self.at_window_end()

    def at_window_end(self) -> bool:
        """Whether the last ``step()`` call ended a window (``zero_grad`` may clear then)."""
        return (self.micro_steps - self.window_start) % self.accumulation_steps == 0

    def next_call_ends_window(self) -> bool:
        """Whether the next ``step()`` call will end a window (the backward before it is the
        window's last)."""
        return (self.micro_steps + 1 - self.window_start) % self.accumulation_steps == 0

    # --- optimizer steps and rounds -------------------------------------------------------

    def count_optimizer_step(self) -> None:
        """Count one step of the base optimizer (taken or skipped alike)."""
        self.optimizer_steps += 1

    @property
    def in_warmup(self) -> bool:
        """Whether the next optimizer step is a synchronous (warm-up) one."""
        return self.optimizer_steps < self.warmup_steps

    def landing_due(self) -> bool:
        """Whether a round started ``overlap_steps`` ago must land now."""
        return bool(self.overlap_steps) and (
            self.optimizer_steps - self.last_round_step >= self.overlap_steps
        )

    def round_due(self) -> bool:
        """Whether this optimizer step is a round's."""
        return self.optimizer_steps >= self.next_round_step

    def fragment_due(self) -> int | None:
        """The fragment whose round falls on this optimizer step (with ``fragments > 1``: the
        last one at the period's end, the others at their offsets inside it), or ``None``."""
        if self.fragments == 1:
            return None
        offsets = fragment_offsets(self.next_round_step - self.period_start, self.fragments)
        into = self.optimizer_steps - self.period_start
        return offsets.index(into) if into in offsets else None

    def local_round_due(self) -> bool:
        """Whether this optimizer step is a subgroup round's (two-level averaging)."""
        if self.local_period is None or self.optimizer_steps <= self.warmup_steps:
            return False
        return (self.optimizer_steps - self.warmup_steps) % self.local_period == 0

    def record_round(self, whole: bool = True) -> None:
        """A round ran at this step (applied, skipped or started); ``whole``: of the whole
        model, not of one fragment."""
        self.averaging_rounds += 1
        self.last_round_step = self.optimizer_steps
        if whole:
            self.last_whole_round_step = self.optimizer_steps

    def fragments_behind(self) -> list[int] | None:
        """With ``fragments > 1``: the fragments not averaged at this very step, which a
        round of the whole model (``average()``, ``close()``) must average; ``None`` without
        fragments. A fragment averaged at this step is left out: its outer step is taken."""
        if self.fragments == 1:
            return None
        now = self.optimizer_steps
        if now == self.last_whole_round_step:  # no step since every fragment was averaged
            return []
        if not self.averaging_rounds or self.last_round_step != now:
            return list(range(self.fragments))
        done = self.fragment_due()
        if done is None and now == self.period_start:
            # The period's last fragment ended the period that just rolled over.
            done = self.fragments - 1
        return [k for k in range(self.fragments) if k != done]

    def schedule_next_round(self) -> None:
        """After a scheduled round: the next one is a period later."""
        self.period_start = self.optimizer_steps
        self.next_round_step = self.optimizer_steps + self.period_from(self.optimizer_steps)

    def period_from(self, step: int) -> int:
        """The number of optimizer steps from a round at ``step`` to the next one.

        Raises:
            ValueError: a schedule returned something other than a positive integer, or a
                period not longer than ``overlap_steps``.
        """
        if not callable(self.period):
            return self.period
        returned: object = self.period(step)
        try:
            value = -1 if isinstance(returned, bool) else operator.index(returned)  # type: ignore[arg-type]
        except TypeError:
            value = -1
        if value < 1:
            raise ValueError(
                f"the period schedule {self.period!r} returned {returned!r} at optimizer step "
                f"{step}; it must return a positive integer"
            )
        if self.fragments > 1:
            try:
                check_fragments(self.fragments, value, self.overlap_steps)
            except ValueError as problem:
                raise ValueError(
                    f"the period schedule returned {value} at optimizer step {step}: {problem}"
                ) from None
        if self.overlap_steps >= value:
            raise ValueError(
                f"the period schedule returned {value} at optimizer step {step}, not more than "
                f"overlap_steps={self.overlap_steps}: a round must land before the next starts"
            )
        return value

    # --- state ----------------------------------------------------------------------------

    # The state entry names them (every version's, then those derived for older ones).
    COUNTERS = (*state_entry.COUNTERS, *state_entry.LATER_COUNTERS)

    def counters(self) -> dict[str, int]:
        """Every counter by name, for a checkpoint."""
        return {name: getattr(self, name) for name in self.COUNTERS}

    @staticmethod
    def window_start_after_resume(
        counters: dict[str, int], accumulation_changed: bool, old_accumulation: int
    ) -> int:
        """Where the windows' grid starts when resuming from ``counters``, saved with
        ``old_accumulation`` steps per window.

        Raises:
            ValueError: ``accumulation_steps`` changed in the middle of a window.
        """
        micro, start = counters["micro_steps"], counters["window_start"]
        if not accumulation_changed:
            return start
        if (micro - start) % old_accumulation:
            raise ValueError(
                f"the checkpoint was taken in the middle of an accumulation window ({micro} "
                f"step() calls with accumulation_steps={old_accumulation}); resume with "
                f"accumulation_steps={old_accumulation}, or save right after the optimizer "
                "step that ends a window"
            )
        return micro

    def load(self, counters: dict[str, int], window_start: int, reschedule: bool) -> None:
        """Take ``counters`` from a checkpoint; with ``reschedule`` (the period or warm-up
        changed), the next round falls a period after the last one (or after warm-up), and a
        step already past it rounds at the next step."""
        for name in self.COUNTERS:
            setattr(self, name, counters[name])
        self.window_start = window_start
        if reschedule:
            base = self.warmup_steps
            if self.averaging_rounds:
                base = max(self.last_round_step, self.warmup_steps)
            self.period_start = base
            self.next_round_step = base + self.period_from(base)
