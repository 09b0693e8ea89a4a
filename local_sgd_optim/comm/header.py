"""The header: a small fixed-size collective before every payload the wrapper sends.

Each rank writes, in its own slots, what it is about to do (a round, a subgroup round,
``average()``, ``close()``, a warm-up gradient average), at which optimizer step, a flag (its
tensors hold NaN or inf; at ``close()``: a final round is due), a fingerprint of its averaged
tensors and whether they changed since its last round. The others write zeros, so after one
all-reduce every rank reads every rank's slots exactly (int64), and every rank reaches the same
verdict before any payload moves: ranks that are doing different things, or are at different
steps, raise the same :class:`RoundError` instead of meeting in mismatched collectives (which
gloo answers by aborting the process, NCCL by hanging).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from local_sgd_optim.comm.groups import collective_device
from local_sgd_optim.comm.stats import CommStats, RoundError

__all__ = ["KINDS", "MAX_SKIPPED_ROUNDS", "NONFINITE", "TOO_LARGE", "HeaderView", "RoundHeader"]

# What a rank can be about to do, by code: 0 stays free (a rank that wrote nothing).
KINDS = {
    "round": 1,
    "local round": 2,
    "average()": 3,
    "close()": 4,
    "gradient average": 5,
    "add_param_group()": 6,
    "first step()": 7,
    "global model": 8,
}
_NAMES = {code: name for name, code in KINDS.items()}
_SLOTS = 6  # kind, step, flag, fingerprint, changed, plan
# The flag of a round: this rank's tensors hold NaN or inf, or its float16 deltas would not fit.
NONFINITE = 1
TOO_LARGE = 2
# With on_nonfinite="skip", this many rounds in a row skipped for non-finite values raise.
MAX_SKIPPED_ROUNDS = 4


@dataclass
class HeaderView:
    """Every rank's slots after the exchange.

    Args:
        kinds (list of str): what each rank is about to do.
        steps (list of int): each rank's optimizer step.
        flags (list of int): each rank's flag (``NONFINITE``, ``TOO_LARGE`` or 0 at a round;
            at ``close()``: 1 when a final round is due).
        fingerprints (list of int): each rank's fingerprint of its averaged tensors.
        changed (list of bool): whether each rank's tensors changed since its last round.
        plans (list of int): each rank's digest of what it averages (shapes and dtypes).

    Example::

        >>> view = header.exchange("round", step=8, flag=False)
        >>> view.steps
        [8, 8]
    """

    kinds: list[str]
    steps: list[int]
    flags: list[int]
    fingerprints: list[int]
    changed: list[bool]
    plans: list[int]


class RoundHeader:
    """Exchanges and judges the header of a group of ranks.

    Args:
        process_group (ProcessGroup, optional): the ranks (default: the world).
        world_size (int): ranks in the group.
        rank (int): this rank's index in the group.
        on_nonfinite (str): ``"raise"`` a :class:`RoundError` or ``"skip"`` the round with a
            warning when a rank reports NaN or inf.
        device (torch.device, optional): the model's device (NCCL needs a CUDA tensor).
        stats (CommStats, optional): where the header's bytes and waiting time add up.

    Example::

        >>> header = RoundHeader(None, 2, dist.get_rank(), "raise")
        >>> view = header.exchange("round", step=8, flag=False)
        >>> header.check(view, step=8)  # raises on every rank if the ranks disagree
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None,
        world_size: int,
        rank: int,
        on_nonfinite: str,
        device: torch.device | None = None,
        stats: CommStats | None = None,
    ) -> None:
        self.process_group = process_group
        self.world_size = world_size
        self.rank = rank
        self.on_nonfinite = on_nonfinite
        self.stats = CommStats() if stats is None else stats
        self._device = device
        self.numel = world_size * _SLOTS

    def encode(
        self,
        kind: str,
        step: int,
        flag: int,
        fingerprint: int = 0,
        changed: bool = False,
        plan: int = 0,
    ) -> torch.Tensor:
        """This rank's header: its own slots filled, the others zero."""
        mine = torch.zeros(self.numel, dtype=torch.int64)
        mine[self.rank * _SLOTS : (self.rank + 1) * _SLOTS] = torch.tensor(
            [KINDS[kind], step, int(flag), fingerprint, int(changed), plan], dtype=torch.int64
        )
        return mine

    def decode(self, summed: torch.Tensor) -> HeaderView:
        """Every rank's slots from the summed headers."""
        values = summed.view(self.world_size, _SLOTS).tolist()
        return HeaderView(
            kinds=[_NAMES.get(int(v[0]), "nothing") for v in values],
            steps=[int(v[1]) for v in values],
            flags=[int(v[2]) for v in values],
            fingerprints=[int(v[3]) for v in values],
            changed=[bool(v[4]) for v in values],
            plans=[int(v[5]) for v in values],
        )

    def exchange(
        self,
        kind: str,
        step: int,
        flag: int,
        fingerprint: int = 0,
        changed: bool = False,
        plan: int = 0,
    ) -> HeaderView:
        """All-reduce this rank's header with the others' (blocking); every rank's slots.

        Raises:
            RoundError: the collective failed (a rank exited or timed out).
        """
        device = collective_device(self.process_group, self._device)
        wire = self.encode(kind, step, flag, fingerprint, changed, plan).to(device)
        self.stats.bytes_communicated += wire.numel() * wire.element_size()
        began = time.perf_counter()
        try:
            dist.all_reduce(wire, group=self.process_group)
        except Exception as failure:
            raise RoundError(
                f"the {kind} at step {step} failed in its collective ({failure}). Another "
                "rank has probably exited, crashed or stopped calling step(); see its log. "
                "Nothing was changed on this rank"
            ) from failure
        finally:
            self.stats.comm_seconds += time.perf_counter() - began
        return self.decode(wire.cpu())

    def check(self, view: HeaderView, step: int, hint: str | None = None) -> None:
        """Raise the same :class:`RoundError` on every rank if the ranks are doing different
        things or are at different steps; ``hint`` replaces the usual advice."""
        doing = set(zip(view.kinds, view.steps))
        if len(doing) > 1:
            at = ", ".join(
                f"rank {r} at {kind} of step {s}"
                for r, (kind, s) in enumerate(zip(view.kinds, view.steps))
            )
            advice = hint or (
                "Every rank must call step() the same number of times, and average() and "
                "close() at the same point (give every rank the same number of batches, e.g. "
                "DistributedSampler with drop_last=True)"
            )
            raise RoundError(f"ranks are out of step ({at}). {advice}; nothing was averaged")
        if len(set(view.plans)) > 1:
            raise RoundError(
                f"the ranks average different tensors at the {view.kinds[0]} of step {step}: "
                "a parameter was added (add_param_group), unfrozen, replaced or reshaped on "
                "some ranks only. Every rank must change the model and the optimizer the same "
                "way at the same step; nothing was averaged"
            )

    def finite_verdict(self, view: HeaderView, step: int, skipped: int = 0) -> bool:
        """Whether a round may be applied given the ranks' non-finite flags; raises (on every
        rank alike) with ``on_nonfinite="raise"``, warns and returns ``False`` with ``"skip"``.

        ``skipped`` rounds in a row were skipped before this one: with ``"skip"``, the
        :data:`MAX_SKIPPED_ROUNDS`-th more raises too (a rank whose parameters hold NaN does not
        recover by local steps), and so does ``close()``, whose round must leave every rank
        with the same values."""
        too_large = [r for r, flag in enumerate(view.flags) if flag == TOO_LARGE]
        if too_large:
            raise RoundError(
                f"the change since the last round on rank(s) {', '.join(map(str, too_large))} at "
                f"step {step} does not fit float16 (at most 65504 after dividing by the "
                "world size); the round was not applied, so no rank's values changed. Use "
                "comm_dtype=torch.bfloat16 (the float32 range) or full precision"
            )
        nonfinite = [r for r, flag in enumerate(view.flags) if flag]
        if not nonfinite:
            return True
        names = ", ".join(map(str, nonfinite))
        message = (
            f"non-finite values (NaN or inf) in the averaged tensors of rank(s) {names} at "
            f"step {step}; the round was not applied, so no rank's values changed"
        )
        if self.on_nonfinite == "raise":
            raise RoundError(
                message + ". Lower the learning rate or clip gradients, or pass "
                "on_nonfinite='skip' to skip such rounds with a warning"
            )
        if "close()" in view.kinds:
            raise RoundError(
                message + ". close() cannot skip its round: it would leave the ranks with "
                "different values. Restore the rank(s) from a checkpoint"
            )
        if skipped + 1 >= MAX_SKIPPED_ROUNDS:
            raise RoundError(
                message + f". That makes {skipped + 1} rounds in a row skipped for non-finite "
                "values: the rank does not recover by itself. Restore it from a checkpoint, "
                "lower the learning rate or clip gradients"
            )
        warnings.warn(message, RuntimeWarning, stacklevel=5)
        return False

    def check_diverged(self, view: HeaderView, step: int) -> None:
        """Raise on every rank when every rank's tensors changed since its last round and yet
        are bitwise identical across ranks: gradients were synchronised, or every rank trains
        on the same data."""
        if self.world_size > 1 and all(view.changed) and len(set(view.fingerprints)) == 1:
            raise RoundError(
                f"every rank holds bitwise identical parameters at the round of step {step}, "
                "after local steps that changed them: Local SGD is not happening. Either the "
                "gradients are all-reduced at every step (a DistributedDataParallel built "
                "around the model after the LocalSGDOptimizer and not seen by it: build the "
                "optimizer on the DDP model, or call opt.attach_ddp(ddp_model)), or every "
                "rank trains on the same data (shard it, e.g. with DistributedSampler). If "
                "every rank really is meant to see the same data, pass "
                "allow_identical_ranks=True"
            )
