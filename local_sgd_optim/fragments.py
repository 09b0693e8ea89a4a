"""Streaming fragments: the averaged tensors in ``F`` runs of layers, each averaged at its own step.

A round of the whole model sends every byte at once, every ``period`` steps: the link idles for
``period - 1`` steps and is the bottleneck in the last one. Streaming DiLoCo (Douillard et al.,
https://arxiv.org/abs/2501.18512) cuts the model into fragments and averages fragment ``i`` at
its own offset inside each period, so each sync moves ``1 / F`` of the bytes and the peak a step
sends drops by ``F``, while each fragment is still averaged once every ``period`` steps. The
offsets are torchft's (``floor(period * (i + 1) / F)`` steps after the period starts), so the
last fragment is averaged at the period's end, where an unfragmented round would be.

:func:`plan_fragments` cuts by module order (a fragment is a run of consecutive layers, its
buffers with it) into fragments of equal size, a tensor that a cut falls inside in pieces.
:class:`FragmentedAverager` holds one
:class:`~local_sgd_optim.comm.averager.BucketedAverager` per fragment, each with its own
header, anchors and round in flight, behind the interface of a single averager: a round of the
whole model (``average()``, ``close()``) averages every fragment; ``fragment=i`` averages one.
Piece and tensor indices it hands out are those of the full tensor list, so that the outer
optimizer steps each fragment with that fragment's own pseudo-gradient.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from local_sgd_optim.comm.averager import BucketedAverager
from local_sgd_optim.comm.buckets import Bucket
from local_sgd_optim.comm.overlap import Piece

__all__ = [
    "FragmentPlan",
    "FragmentedAverager",
    "check_fragments",
    "chosen",
    "fragment_offsets",
    "plan_fragments",
    "smallest_gap",
]


def fragment_offsets(period: int, count: int) -> list[int]:
    """The steps after a period's start at which each of ``count`` fragments is averaged.

    Example::

        >>> fragment_offsets(8, 4)
        [2, 4, 6, 8]
    """
    return [period * (i + 1) // count for i in range(count)]


def smallest_gap(period: int, count: int) -> int:
    """The fewest optimizer steps between two consecutive fragment rounds (``0``: two fall on
    one step, which happens when ``period < count``)."""
    offsets = [0, *fragment_offsets(period, count)]
    return min(b - a for a, b in zip(offsets, offsets[1:]))


def check_fragments(count: int, period: object, overlap_steps: int) -> None:
    """Raise unless ``count`` fragments fit a ``period`` (an int; a schedule's periods are
    checked as they come): each fragment needs a step of its own in the period, and a
    fragment's round in flight must land before the next fragment's starts.

    Raises:
        ValueError: ``period < count``, or ``overlap_steps`` not below the smallest gap.
    """
    if not isinstance(period, int) or count == 1:
        return
    gap = smallest_gap(period, count)
    if gap == 0:
        raise ValueError(
            f"fragments={count} needs a period of at least {count} steps (one step for each "
            f"fragment's round), got period={period}"
        )
    if overlap_steps >= gap:
        raise ValueError(
            f"overlap_steps must be smaller than the {gap} step(s) between two fragments' "
            f"rounds (period={period}, fragments={count}), got overlap_steps={overlap_steps}: "
            "a fragment's round must land before the next fragment's starts"
        )


def chosen(fragment: int | Sequence[int] | None, count: int) -> list[int]:
    """Fragments by index: one, several, or (``None``) every one of ``count``."""
    if fragment is None:
        return list(range(count))
    return [fragment] if isinstance(fragment, int) else list(fragment)


@dataclasses.dataclass
class FragmentPlan:
    """What rounds average, cut into fragments.

    Args:
        tensors (list of Tensor): the averaged tensors, a tensor that a cut falls inside as two
            or more flat views of its pieces: the parameters' first (in order), then the
            buffers'.
        outer_count (int): how many of ``tensors`` are pieces of parameters (an outer
            optimizer's sources).
        fragments (list of list of int): the indices into ``tensors`` of each fragment.
        origins (list of (int, int, int)): for each of ``tensors``, the index of the tensor it
            is a piece of (parameters then buffers) and where the piece starts and stops in
            that tensor's flat view.
    """

    tensors: list[Tensor]
    outer_count: int
    fragments: list[list[int]]
    origins: list[tuple[int, int, int]]

    @property
    def outer_tensors(self) -> list[Tensor]:
        """The pieces of parameters: what an outer optimizer steps."""
        return self.tensors[: self.outer_count]

    def indices(self, fragment: int | Sequence[int] | None) -> list[int] | None:
        """The indices into :attr:`tensors` of one or several fragments (``None``: all)."""
        if fragment is None:
            return None
        return [i for k in chosen(fragment, len(self.fragments)) for i in self.fragments[k]]


def plan_fragments(
    parameters: Sequence[Tensor],
    buffers: Sequence[Tensor],
    positions: Sequence[int],
    count: int,
) -> FragmentPlan:
    """Cut the averaged tensors into ``count`` fragments of equal size in module order.

    The tensors are laid end to end in module order (``positions``: each tensor's place,
    parameters then buffers; ties keep list order) and cut every ``1 / count`` of their
    elements, so every fragment holds the same number of elements to within one and a round
    of one sends ``1 / count`` of the bytes. A contiguous tensor that a cut falls inside
    travels as flat views of its pieces, each in its fragment; a non-contiguous one stays
    whole, in the fragment where it starts. With ``count == 1`` nothing is cut.

    Raises:
        ValueError: fewer elements than fragments, or a fragment left empty by a large
            non-contiguous tensor.

    Example::

        >>> plan = plan_fragments([torch.zeros(6), torch.zeros(2)], [], [0, 1], 2)
        >>> [[t.numel() for t in (plan.tensors[i] for i in f)] for f in plan.fragments]
        [[4], [2, 2]]
    """
    everything = [*parameters, *buffers]
    if count == 1:
        uncut = [(i, 0, t.numel()) for i, t in enumerate(everything)]
        return FragmentPlan(everything, len(parameters), [list(range(len(everything)))], uncut)
    order = sorted(range(len(everything)), key=lambda i: (positions[i], i))
    total = sum(t.numel() for t in everything)
    if total < count:
        raise ValueError(
            f"fragments={count} needs at least {count} averaged values, the model has {total}"
        )
    cuts = [total * k // count for k in range(1, count)]
    # For each tensor, its pieces as (start, stop, fragment), in element order.
    pieces: dict[int, list[tuple[int, int, int]]] = {}
    offset = 0
    for i in order:
        numel = everything[i].numel()
        if numel == 0:
            continue
        inside = [c - offset for c in cuts if offset < c < offset + numel]
        bounds = [0, *inside, numel] if everything[i].is_contiguous() else [0, numel]
        pieces[i] = [
            (a, b, bisect.bisect_right(cuts, offset + a)) for a, b in zip(bounds, bounds[1:])
        ]
        offset += numel
    tensors: list[Tensor] = []
    origins: list[tuple[int, int, int]] = []
    fragments: list[list[int]] = [[] for _ in range(count)]
    outer_count = 0
    for i, tensor in enumerate(everything):
        whole = len(pieces.get(i, [])) <= 1
        for a, b, k in pieces.get(i, [(0, 0, 0)]):
            fragments[k].append(len(tensors))
            tensors.append(tensor if whole else tensor.detach().view(-1)[a:b])
            origins.append((i, a, b))
        if i < len(parameters):
            outer_count = len(tensors)
    if not all(fragments):
        raise ValueError(
            f"fragments={count} leaves a fragment empty: a non-contiguous tensor larger than "
            f"1/{count} of the model cannot be cut; use fewer fragments"
        )
    return FragmentPlan(tensors, outer_count, [sorted(f) for f in fragments], origins)


class FragmentedAverager:
    """One :class:`~local_sgd_optim.comm.averager.BucketedAverager` per fragment of a list of
    tensors, used as one averager.

    Args:
        tensors (Sequence[Tensor]): every tensor to average (indices refer to this list).
        fragments (Sequence[Sequence[int]]): the indices of each fragment's tensors
            (:func:`plan_fragments`; one fragment of every index for a whole-model round).
        build (Callable[[list[Tensor], int], BucketedAverager]): builds the averager of a
            fragment's tensors (its index is the second argument).

    Example::

        >>> plan = plan_fragments(params, [], range(len(params)), 4)
        >>> build = lambda ts, _: BucketedAverager(ts, None)
        >>> averager = FragmentedAverager(plan.tensors, plan.fragments, build)
        >>> averager.average(step=8, fragment=0)  # the first fragment only
        >>> averager.average(step=8)  # every fragment
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        fragments: Sequence[Sequence[int]],
        build: Callable[[list[Tensor], int], BucketedAverager],
    ) -> None:
        self.fragments = [list(f) for f in fragments]
        self.parts = [build([tensors[i] for i in f], k) for k, f in enumerate(self.fragments)]
        self._finished: list[int] = []  # the parts whose round in flight landed last

    # --- what it averages -----------------------------------------------------------------

    @property
    def count(self) -> int:
        """The number of fragments."""
        return len(self.parts)

    @property
    def buckets(self) -> list[Bucket]:
        """Every fragment's buckets, fragment by fragment."""
        return [b for part in self.parts for b in part.buckets]

    @property
    def numel(self) -> int:
        """Elements averaged by a round of every fragment."""
        return sum(part.numel for part in self.parts)

    @property
    def nbytes(self) -> int:
        """Bytes a round of every fragment puts on the wire."""
        return sum(part.nbytes for part in self.parts)

    def fragment_nbytes(self, fragment: int) -> int:
        """Bytes a round of one fragment puts on the wire."""
        return self.parts[fragment].nbytes

    @property
    def workspace_bytes(self) -> int:
        """Bytes the fragments' averagers allocated for themselves."""
        return sum(part.workspace_bytes for part in self.parts)

    def _chosen(self, fragment: int | Sequence[int] | None) -> list[int]:
        return chosen(fragment, self.count)

    def adopt(self, previous: FragmentedAverager) -> bool:
        """Take over ``previous``'s anchors and fingerprints, fragment by fragment, when it cut
        the same tensors into the same fragments (see :meth:`BucketedAverager.adopt`)."""
        if previous.fragments != self.fragments:
            return False
        return all([part.adopt(old) for part, old in zip(self.parts, previous.parts)])

    # --- rounds ---------------------------------------------------------------------------

    def average(
        self,
        step: int = 0,
        kind: str = "round",
        check_diverged: bool = False,
        fragment: int | Sequence[int] | None = None,
    ) -> bool:
        """A blocking round of one fragment, or of every fragment (``None``), one after the
        other; whether every one was applied (``False``: some skipped for non-finite values)."""
        applied = [
            self.parts[k].average(step, kind, check_diverged) for k in self._chosen(fragment)
        ]
        return all(applied)

    def start(
        self,
        step: int = 0,
        kind: str = "round",
        check_diverged: bool = False,
        fragment: int | Sequence[int] | None = None,
    ) -> bool | None:
        """Start an overlapped round of one fragment, or of every fragment (``None``).

        Returns:
            ``None`` when some round is in flight; otherwise whether every one was applied at
            once (a first round in full precision) or ``False`` when one was skipped.
        """
        results = [self.parts[k].start(step, kind, check_diverged) for k in self._chosen(fragment)]
        if any(r is None for r in results):
            return None
        return all(bool(r) for r in results)

    @property
    def pending(self) -> bool:
        """Whether some fragment's round started with :meth:`start` has not been finished."""
        return any(part.pending for part in self.parts)

    def finish(self) -> bool:
        """Wait for every fragment's round in flight and apply it; whether one was applied."""
        self._finished = [k for k, part in enumerate(self.parts) if part.pending]
        for k in self._finished:
            self.parts[k].finish()
        return bool(self._finished)

    def snapshot_pieces(self) -> list[Piece]:
        """Right after :meth:`finish`: the pieces of the fragments that landed, with the mean of
        the ranks' snapshots, indexed in the full tensor list."""
        pieces = []
        for k in self._finished:
            for piece in self.parts[k].snapshot_pieces():
                piece.index = self.fragments[k][piece.index]
                pieces.append(piece)
        return pieces

    def set_contributors(self, count: int) -> None:
        """The next rounds' mean is over ``count`` ranks: the others join them without
        contributing, after :meth:`withhold` (see :meth:`BucketedAverager.withhold`)."""
        for part in self.parts:
            part.contributors = count

    def withhold(self) -> None:
        """Make this rank's tensors contribute nothing to the next round of every fragment."""
        for part in self.parts:
            part.withhold()

    # --- anchors --------------------------------------------------------------------------

    @property
    def anchored(self) -> bool:
        """Whether every fragment holds the last round's values for 16-bit deltas."""
        return all(part.anchored for part in self.parts)

    def set_anchor_from_tensors(self, fragment: int | Sequence[int] | None = None) -> None:
        """Take the tensors' current values as the reference for deltas (ranks must agree)."""
        for k in self._chosen(fragment):
            self.parts[k].set_anchor_from_tensors()

    def set_anchor_values(self, values: dict[int, Tensor]) -> None:
        """Take ``values[i]`` (full-list index ``i``) as the reference for tensor ``i``."""
        for part, indices in zip(self.parts, self.fragments):
            mine = {local: values[i] for local, i in enumerate(indices) if i in values}
            if mine:
                part.set_anchor_values(mine)

    @staticmethod
    def _anchor_slots(part: BucketedAverager) -> list[torch.dtype]:
        """The dtype of each full-precision copy ``part`` keeps when anchored: one per
        (device, dtype) group that sends deltas, in group order."""
        groups = sorted({b.group for b in part.buckets if b.delta})
        return [next(b.dtype for b in part.buckets if b.group == g) for g in groups]

    def _anchor_counts(self) -> list[int]:
        return [len(self._anchor_slots(part)) for part in self.parts]

    def anchor_tensors(self) -> list[Tensor]:
        """The full-precision copies for 16-bit deltas, fragment by fragment; a fragment not
        anchored yet holds empty tensors in its places (one fragment: its list as is)."""
        if self.count == 1:
            return self.parts[0].anchor_tensors()
        tensors: list[Tensor] = []
        for part in self.parts:
            held = part.anchor_tensors()
            empty = [torch.empty(0, dtype=dtype) for dtype in self._anchor_slots(part)]
            tensors += held if held else empty
        return tensors

    def load_anchor_tensors(self, anchors: Sequence[Tensor]) -> None:
        """Restore :meth:`anchor_tensors` (an empty list: no fragment anchored)."""
        if self.count == 1:
            self.parts[0].load_anchor_tensors(anchors)
            return
        if not anchors:
            for part in self.parts:
                part.load_anchor_tensors([])
            return
        counts = self._anchor_counts()
        if len(anchors) != sum(counts):
            raise ValueError(
                f"the checkpoint holds {len(anchors)} full-precision copies for comm_dtype, "
                f"this model's {self.count} fragments need {sum(counts)}; resume with the same "
                "model, comm_dtype and fragments"
            )
        start = 0
        for part, n in zip(self.parts, counts):
            mine = list(anchors[start : start + n])
            start += n
            part.load_anchor_tensors([] if all(t.numel() == 0 for t in mine) else mine)

    # --- a round in flight, for checkpoints -----------------------------------------------

    def pending_state(self) -> dict[str, Any] | None:
        """A round in flight as tensors (waited for first), with its fragment's index."""
        states = [(k, part.pending_state()) for k, part in enumerate(self.parts)]
        states = [(k, s) for k, s in states if s is not None]
        if not states:
            return None
        if len(states) > 1:  # pragma: no cover - rounds land before the next one starts
            raise RuntimeError("more than one fragment's round is in flight")
        k, state = states[0]
        assert state is not None
        return state if self.count == 1 else {**state, "fragment": k}

    def load_pending_state(self, state: dict[str, Any] | None) -> None:
        """Restore a round saved by :meth:`pending_state`; :meth:`finish` then applies it."""
        for part in self.parts:
            part.load_pending_state(None)
        if state is None:
            return
        state = dict(state)
        fragment = state.pop("fragment", 0)
        if not isinstance(fragment, int) or not 0 <= fragment < self.count:
            raise ValueError(
                f"the checkpoint's round in flight belongs to fragment {fragment!r}, but this "
                f"model has {self.count} fragment(s); resume with the checkpoint's fragments"
            )
        self.parts[fragment].load_pending_state(state)

    def release_buffers(self) -> None:
        """Let go of every fragment's buffers and async work, keeping the anchors (see
        :meth:`BucketedAverager.release_buffers`)."""
        for part in self.parts:
            part.release_buffers()
