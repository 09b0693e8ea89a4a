"""What averaging costs (:class:`CommStats`); :class:`RoundError`, defined in
:mod:`local_sgd_optim.errors`, is re-exported here for the modules that import it from here."""

from __future__ import annotations

import math
from dataclasses import dataclass

from local_sgd_optim.errors import RoundError

__all__ = ["CommStats", "RoundError"]


@dataclass
class CommStats:
    """What averaging has cost this rank so far (``LocalSGDOptimizer.stats``).

    Args:
        rounds (int): averaging rounds applied (skipped ones and rounds on one rank do not
            count).
        bytes_communicated (int): payload bytes this rank contributed to all-reduces (a ring
            all-reduce moves about twice that over each rank's link).
        comm_seconds (float): time the training thread spent blocked waiting on communication.
        round_seconds (float): time the training thread spent in rounds, packing and unpacking
            included (communication that overlaps compute is not counted).
        step_seconds (float): time between consecutive optimizer steps outside rounds: what
            the training loop itself takes (data, forward, backward, the base step).
        steps_timed (int): the optimizer steps ``step_seconds`` covers.
        peak_step_bytes (int): the most payload bytes any one ``step()`` call handed to
            collectives (its round, or its fragment's; gradients in warm-up): the burst the
            link must carry, against ``bytes_communicated``, the total. Rounds run by
            ``average()`` and ``close()`` are not steps and do not count.

    To choose ``overlap_steps``: run some rounds with ``overlap_steps=0`` and read
    :meth:`steps_to_hide_a_round`, the number of optimizer steps one round takes. A round in
    flight must land within ``overlap_steps`` steps to cost nothing; with overlap on,
    ``comm_seconds`` is the time it did not (the training thread waiting for it to land).

    Example::

        >>> s = opt.stats
        >>> print(f"{s.bytes_communicated / 2**20:.0f} MiB over {s.rounds} rounds, "
        ...       f"{s.comm_seconds:.1f} s blocked on the network")
    """

    rounds: int = 0
    bytes_communicated: int = 0
    comm_seconds: float = 0.0
    round_seconds: float = 0.0
    step_seconds: float = 0.0
    steps_timed: int = 0
    peak_step_bytes: int = 0

    def as_dict(self) -> dict[str, int | float]:
        """The numbers as a plain dict (for logs, metrics files and checkpoints)."""
        return {
            "rounds": self.rounds,
            "bytes_communicated": self.bytes_communicated,
            "comm_seconds": self.comm_seconds,
            "round_seconds": self.round_seconds,
            "step_seconds": self.step_seconds,
            "steps_timed": self.steps_timed,
            "peak_step_bytes": self.peak_step_bytes,
        }

    def record_step(self, sent_before: int) -> None:
        """A ``step()`` call ended; ``sent_before`` was ``bytes_communicated`` at its start."""
        self.peak_step_bytes = max(self.peak_step_bytes, self.bytes_communicated - sent_before)

    def steps_to_hide_a_round(self) -> int | None:
        """Optimizer steps one round takes, rounded up: the smallest ``overlap_steps`` that
        hides it behind training. Measure with ``overlap_steps=0`` (an overlapped round spends
        most of its time off the training thread); ``None`` before a round and two steps.

        Example::

            >>> k = opt.stats.steps_to_hide_a_round()  # after some rounds with overlap_steps=0
            >>> print(f"overlap_steps={k} hides a round (period must be larger)")
        """
        if not self.rounds or not self.steps_timed or self.step_seconds <= 0:
            return None
        per_round = self.round_seconds / self.rounds
        per_step = self.step_seconds / self.steps_timed
        return max(1, math.ceil(per_round / per_step))
