"""What a round does once the clock says one is due.

:class:`Rounds` owns the averagers (the group's and, for two-level averaging, the subgroup's),
re-plans them when the averaged tensors change, applies a round in flight, and runs the outer
optimizer after a round; it keeps the state a checkpoint needs of all that. It does not decide
when: :class:`~local_sgd_optim.LocalSGDOptimizer` and its clock do.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from local_sgd_optim import state_entry
from local_sgd_optim.agreement import agree_across_ranks
from local_sgd_optim.comm.averager import BucketedAverager
from local_sgd_optim.comm.collectives import broadcast_tensors
from local_sgd_optim.comm.header import HeaderView, RoundHeader
from local_sgd_optim.comm.resident import Residence
from local_sgd_optim.comm.stats import CommStats
from local_sgd_optim.comm.tensors import copy_all
from local_sgd_optim.fragments import FragmentedAverager, FragmentPlan, plan_fragments
from local_sgd_optim.outer import OuterOptimizer
from local_sgd_optim.settings import Settings
from local_sgd_optim.sharded import local_tensor
from local_sgd_optim.tracked import (
    Share,
    Tracked,
    averaged_tensors,
    broadcast_buffers,
    describe,
    outer_sources,
    plan_key,
    sharded,
    signature,
)
from local_sgd_optim.tracked import tracked as tracked_state
from local_sgd_optim.two_level import build_local_group

if TYPE_CHECKING:
    from local_sgd_optim.fault_tolerance import ReplicaQuorum

__all__ = ["Rounds", "Saved"]

_LOG = logging.getLogger("local_sgd_optim")


def _memory(tensor: Tensor) -> tuple[object, ...]:
    """What identifies a tensor's memory (a DTensor's local shard is a new object each time)."""
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)


@dataclasses.dataclass
class Saved:
    """What a round may change before its quorum commits, copied before it
    (:meth:`Rounds.save`), to put back when a fault-tolerance quorum does not commit it. The
    outer step waits for the commit (:meth:`Rounds.committed`): its state needs no copy.

    Args:
        tensors (list of Tensor): the averaged tensors and the buffers copied from the first
            rank.
        anchors (list of Tensor): the full-precision copies for 16-bit deltas.
        identical_at (int, optional): the step after which the last round left ranks identical.
    """

    tensors: list[Tensor]
    anchors: list[Tensor]
    identical_at: int | None


def _same_layout(kept: list[Tensor], tensors: list[Tensor]) -> bool:
    return len(kept) == len(tensors) and all(
        k.shape == t.shape and k.dtype == t.dtype and k.device == t.device
        for k, t in zip(kept, tensors)
    )


class Rounds:
    """The averaging rounds of one wrapper: plan, average, land, outer step, state.

    Args:
        base_optimizer (Optimizer): the optimizer that steps the parameters.
        model (nn.Module): whose parameters and buffers are averaged.
        extra_params (list of Tensor): parameters added with ``add_param_group`` (shared, so
            later additions are seen).
        settings (Settings): the wrapper's settings.
        process_group (ProcessGroup, optional): the ranks to average over.
        stats (CommStats): where the cost of rounds adds up.
        device (torch.device, optional): the model's device, for bookkeeping collectives.
        communicates (bool): whether rounds communicate at all (several ranks, enabled).

    Example::

        >>> rounds = Rounds(base, model, [], settings, None, stats, None, communicates=True)
        >>> rounds.agree(); rounds.build(); rounds.run(step=8, blocking=True)
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        model: nn.Module,
        extra_params: list[Tensor],
        settings: Settings,
        process_group: dist.ProcessGroup | None,
        stats: CommStats,
        device: torch.device | None,
        communicates: bool,
    ) -> None:
        self._base_optimizer = base_optimizer
        self._model = model
        self._extra_params = extra_params
        self._settings = settings
        self._process_group = process_group
        self._stats = stats
        self._device = device
        self.communicates = communicates
        self.averager: FragmentedAverager | None = None
        self.local_averager: BucketedAverager | None = None
        self._local_group: dist.ProcessGroup | None = None
        self._plan_key: tuple[object, ...] | None = None
        self._plan: tuple[tuple[object, ...], FragmentPlan] | None = None
        self._residence: Residence | None = None
        self._share = Share(model, base_optimizer, extra_params)
        # The optimizer step after which a blocking round left every rank identical.
        self.identical_at: int | None = None
        # With fault tolerance: what runs each round through a quorum (see commit()), the
        # copies a round is put back from (reused), and its outer step, run at the commit.
        self.quorum: ReplicaQuorum | None = None
        self._saved: Saved | None = None
        self._outer_step: Callable[[], None] | None = None
        self.outer: OuterOptimizer | None = None
        if settings.outer_optimizer is not None:
            ready = settings.broadcast_initial or not communicates
            self.outer = OuterOptimizer(settings.outer_optimizer, ready, settings.cpu_offload)

    def tracked(self) -> list[Tracked]:
        """Every parameter and buffer, and whether rounds average it, as they are now."""
        settings = self._settings
        return list(
            tracked_state(self._model, self._extra_params, settings.average_buffers, self._share)
        )

    def agree(self) -> None:
        """Check with every rank that settings and tensors match (raises on every rank)."""
        lines = self._settings.describe() + describe(self.tracked())
        agree_across_ranks(lines, self._process_group, self._device)

    def build(self, world_size: int) -> None:
        """Build the subgroup (two-level averaging) and the averagers; call on every rank."""
        if self._settings.local_period is not None:
            group = self._settings.local_group
            self._local_group = build_local_group(group, self._process_group, world_size)
        self._build_averagers(self.tracked())

    def build_outer(self) -> None:
        """Take the outer optimizer's kept copy from the parameters as they are now."""
        if self.outer is not None:
            self.outer.build(self._fragment_plan(self.tracked()).outer_tensors)

    def _build_averagers(self, entries: list[Tracked]) -> None:
        tensors = averaged_tensors(entries)
        settings = self._settings
        # A sharded model's local shards live in FSDP's own storage: never re-pointed.
        if (
            settings.parameters_as_bucket_view
            and not settings.overlap_steps
            and not sharded(entries)
        ):
            held = [e.tensor for e in entries] + [
                p for group in self._base_optimizer.param_groups for p in group["params"]
            ]
            if self._residence is None:
                self._residence = Residence(tensors, held)
            else:  # what is placed stays; only new tensors are placed
                self._residence.update(tensors, held)
            self._residence.protect_state_dict(self._model)
        previous = self.averager
        common: dict[str, Any] = {
            "bucket_cap_mb": settings.bucket_cap_mb,
            "comm_dtype": settings.comm_dtype,
            "stats": self._stats,
            "on_nonfinite": settings.on_nonfinite,
            "cpu_offload": settings.cpu_offload,
        }
        # The buffers copied from the first rank join the plan every rank's header compares.
        also = repr([(tuple(b.shape), str(b.dtype)) for b in broadcast_buffers(entries)])
        overlap = settings.overlap_steps > 0

        def build(part: list[Tensor], _: int) -> BucketedAverager:
            return BucketedAverager(part, self._process_group, overlap=overlap, also=also, **common)

        plan = self._fragment_plan(entries)
        self.averager = FragmentedAverager(plan.tensors, plan.fragments, build)
        if previous is not None:
            # The same layout in other memory (a buffer replaced at each forward): the last
            # round's values still hold, and the next round need not be full precision.
            self.averager.adopt(previous)
        if self._local_group is not None:
            local_previous = self.local_averager
            self.local_averager = BucketedAverager(tensors, self._local_group, **common)
            if local_previous is not None:
                self.local_averager.adopt(local_previous)
        self._plan_key = plan_key(entries)  # after placing: the memory the tensors have now

    def _fragment_plan(self, entries: list[Tracked]) -> FragmentPlan:
        """The averaged tensors cut into fragments in the order of ``model.named_modules()``,
        each tensor with its module (one fragment of all of them: nothing cut); kept until
        the tensors change, so that its pieces stay the same objects round after round."""
        key = plan_key(entries)
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        tensors = averaged_tensors(entries)
        parameters = outer_sources(entries)
        count = self._settings.fragments
        positions = [0] * len(tensors)
        if count > 1:
            modules = {name: i for i, (name, _) in enumerate(self._model.named_modules())}
            where: dict[tuple[object, ...], int] = {}
            for e in entries:
                owner = modules.get(e.name.rpartition(".")[0], len(modules))
                where.setdefault(_memory(local_tensor(e.tensor)), owner)
            positions = [where.get(_memory(t), len(modules)) for t in tensors]
        plan = plan_fragments(parameters, tensors[len(parameters) :], positions, count)
        self._plan = (key, plan)
        return plan

    # --- rounds through a fault-tolerance quorum ------------------------------------------

    def commit(self, kind: str, attempt: Callable[[], None]) -> None:
        """Run ``attempt`` (one round of ``kind``): once, or, with fault tolerance, on quorums
        until one commits it (:meth:`ReplicaQuorum.run`)."""
        if self.quorum is None:
            attempt()
        else:
            self.quorum.run(kind, attempt)

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The group rounds average over."""
        return self._process_group

    @property
    def device(self) -> torch.device | None:
        """The model's device, for bookkeeping collectives."""
        return self._device

    @property
    def anchored(self) -> bool:
        """Whether every averager holds the full-precision reference for 16-bit deltas."""
        return self.averager is not None and self.averager.anchored

    def use_group(self, group: dist.ProcessGroup) -> None:
        """Average over ``group`` from now on (a fault-tolerance quorum's, whose rank or size
        changed): new averagers, which keep the 16-bit anchors."""
        anchors = [] if self.averager is None else self.averager.anchor_tensors()
        self._process_group = group
        self.communicates = True
        self._build_averagers(self.tracked())
        assert self.averager is not None
        if anchors and not self.averager.anchored:  # a layout adopt() does not carry over
            self.averager.load_anchor_tensors(anchors)

    def set_contributors(self, count: int) -> None:
        """The next round's mean is over ``count`` ranks of the group (see :meth:`withhold`)."""
        assert self.averager is not None
        self.averager.set_contributors(count)

    def withhold(self) -> None:
        """This rank joins the next round without contributing (it just received a live
        peer's state, which the round's mean gives it back)."""
        assert self.averager is not None
        self.averager.withhold()

    @torch.no_grad()
    def save(self) -> Saved:
        """Copies of what a round changes before its commit, for :meth:`restore`: the averaged
        tensors and copied buffers, and the 16-bit anchors, in buffers kept from one round to
        the next (one copy of each)."""
        tensors = self._changed_by_rounds(self.tracked())
        anchors = [] if self.averager is None else self.averager.anchor_tensors()
        saved = self._saved
        if (
            saved is None
            or not _same_layout(saved.tensors, tensors)
            or not _same_layout(saved.anchors, anchors)
        ):
            empty = [torch.empty_like(t) for t in tensors]
            saved = Saved(empty, [torch.empty_like(a) for a in anchors], None)
            self._saved = saved
        copy_all(saved.tensors, tensors)
        copy_all(saved.anchors, anchors)
        saved.identical_at = self.identical_at
        return saved

    def restore(self, saved: Saved) -> None:
        """Put back what :meth:`save` copied and drop the outer step waiting for the commit:
        the round that followed never happened."""
        with torch.no_grad():
            copy_all(self._changed_by_rounds(self.tracked()), saved.tensors)
        if self.averager is not None:
            self.averager.load_anchor_tensors(saved.anchors)
        self.identical_at = saved.identical_at
        self._outer_step = None

    def committed(self) -> None:
        """The quorum committed the round: take its outer step (held back until now)."""
        outer_step, self._outer_step = self._outer_step, None
        if outer_step is not None:
            outer_step()

    @staticmethod
    def _changed_by_rounds(entries: list[Tracked]) -> list[Tensor]:
        return averaged_tensors(entries) + broadcast_buffers(entries)

    def release(self) -> None:
        """Give the tensors placed in bucket storage memory of their own again, and leave the
        model to any other wrapper on it."""
        if self._residence is not None:
            self._residence.release()
            self._residence = None
        self._share.release()

    def _broadcast_buffers(self, entries: list[Tracked]) -> None:
        """Copy the group's first rank's values of the buffers that are not averaged
        (``average_buffers=True``: all but running statistics) to every rank."""
        buffers = broadcast_buffers(entries)
        if buffers:
            cap = self._settings.bucket_cap_mb
            broadcast_tensors(buffers, self._process_group, cap, self._stats)

    def set_anchors_from_tensors(self) -> None:
        """Every rank holds the same values now: the reference for 16-bit deltas."""
        for averager in (self.averager, self.local_averager):
            if averager is not None:
                averager.set_anchor_from_tensors()

    def signature(self) -> list[tuple[int, int]]:
        """The averaged parameters' versions and memory: changes when weights are loaded."""
        # Parameters only: a forward in training mode updates buffers (BatchNorm statistics)
        # before the first step() sees them.
        return signature(self.tracked())

    def follow_loaded(
        self,
        built: list[tuple[int, int]],
        exchange: Callable[[str, int, int], HeaderView],
        header: RoundHeader,
    ) -> None:
        """At the first ``step()``: if weights were loaded into the model since construction
        (fine-tuning from pretrained weights) and no optimizer state was loaded, broadcast and
        take the copies again as construction would have, so that both orders train alike.
        ``exchange`` runs the header collective, ``header`` judges it."""
        if built == self.signature():
            return
        if self.communicates and self.quorum is None:  # a quorum's group exists in rounds only
            # Ranks that changed the model do this together; one that did it alone meets
            # another rank's round in the header instead, and every rank raises.
            hint = (
                "Weights were loaded into the model after the LocalSGDOptimizer was built on "
                "some ranks only: load them on every rank"
            )
            header.check(exchange("first step()", 0, 0), 0, hint)
            if self._settings.broadcast_initial:
                params = outer_sources(self.tracked())
                broadcast_tensors(params, self._process_group, self._settings.bucket_cap_mb)
            # Buffers may differ after a forward: the next round sets the anchors afresh.
            self.forget_anchors()
        self.build_outer()

    def forget_anchors(self) -> None:
        """Drop the references for 16-bit deltas: the next round is in full precision."""
        for averager in (self.averager, self.local_averager):
            if averager is not None:
                averager.load_anchor_tensors([])

    def _refresh_plan(self, entries: list[Tracked]) -> None:
        if plan_key(entries) != self._plan_key:
            # Parameters were unfrozen, added, replaced or moved since the last round. Every
            # rank rebuilds for itself; the round's header then checks that they agree.
            self._check_optimizer_holds(entries)
            self._build_averagers(entries)

    def _check_optimizer_holds(self, entries: list[Tracked]) -> None:
        """Raise if the base optimizer steps tensors that are no longer the model's."""
        live = {id(e.tensor) for e in entries if e.kind == "parameter"}
        stale = sum(
            1
            for group in self._base_optimizer.param_groups
            for p in group["params"]
            if id(p) not in live
        )
        if stale:
            raise RuntimeError(
                f"{stale} parameter(s) of the model were replaced after the optimizer was built "
                "(model.load_state_dict(..., assign=True), or new nn.Parameter objects "
                "assigned): the base optimizer still steps the old ones, which the model no "
                "longer uses. Build the base optimizer and LocalSGDOptimizer after replacing "
                "them, or load without assign=True"
            )

    @property
    def in_flight(self) -> bool:
        """Whether a round started with ``overlap_steps`` has not landed."""
        return self.averager is not None and self.averager.pending

    def land(self, entries: list[Tracked] | None = None) -> None:
        """Apply the round in flight, with the outer step if there is one (``entries``: the
        live tensors, when the caller has them already)."""
        averager = self.averager
        if averager is None or not averager.pending or not averager.finish():
            return
        entries = self.tracked() if entries is None else entries
        if self.outer is not None:
            sources = self._fragment_plan(entries).outer_tensors
            kept = self.outer.step_from_snapshot(sources, averager.snapshot_pieces())
            averager.set_anchor_values(kept)  # deltas are taken from the outer result on
        self._broadcast_buffers(entries)

    def run(
        self,
        step: int,
        blocking: bool,
        round_number: int,
        kind: str,
        check_diverged: bool,
        fragment: int | list[int] | None = None,
    ) -> None:
        """One round at optimizer ``step``: blocking, or started to land later. ``kind`` says
        what it is (``"round"``, ``"average()"``, ``"close()"``), checked to be the same on
        every rank; ``check_diverged`` raises if the ranks stayed identical through local
        steps. ``fragment``: one fragment's round; a list: the round of the whole model that
        averages those fragments (the others were averaged at this step); ``None``: all."""
        # Whether the round's values are in place now (not started in the background), and
        # whether it was applied at all (a round skipped for NaN must not feed the outer step).
        landed = applied = True
        if self._residence is not None:
            self._residence.check_writes()
        entries = self.tracked()  # the live tensors, looked at once per round
        if self.communicates:
            self.land(entries)  # a round in flight lands first
            self._refresh_plan(entries)
            assert self.averager is not None
            before = dataclasses.replace(self._stats)
            whole = not isinstance(fragment, int) or self.averager.count == 1
            if blocking:
                applied = self.averager.average(step, kind, check_diverged, fragment)
                if applied and (whole or fragment == self.averager.count - 1):
                    # Copied buffers travel once a period, with its last fragment.
                    self._broadcast_buffers(entries)
                if applied and whole:
                    self.identical_at = step
            else:
                result = self.averager.start(step, kind, check_diverged, fragment)
                landed, applied = result is not None, bool(result)
            self._log(before, step, blocking, round_number)
        if self.outer is not None and landed and applied:  # a started one steps when it lands
            plan = self._fragment_plan(entries)  # the outer optimizer steps its pieces
            outer, averager = self.outer, self.averager

            def outer_step() -> None:
                outer.step_from_mean(plan.outer_tensors, plan.indices(fragment))
                if averager is not None:
                    averager.set_anchor_from_tensors(fragment)  # deltas from the outer result

            if self.quorum is None:
                outer_step()
            else:  # at the commit: a round the quorum does not commit leaves it untouched
                self._outer_step = outer_step
        if self.local_averager is not None:
            self.local_averager.set_anchor_from_tensors()

    def run_local(self, step: int) -> None:
        """One round inside the subgroup (two-level averaging)."""
        if self.communicates:
            self._refresh_plan(self.tracked())
            if self.local_averager is not None:
                self.local_averager.average(step, "local round")

    def _log(self, before: CommStats, step: int, blocking: bool, round_number: int) -> None:
        if _LOG.isEnabledFor(logging.DEBUG):
            _LOG.debug(
                "round %d at step %d (%s): %d bytes sent, %.1f ms in the round, %.1f ms "
                "blocked on communication",
                round_number,
                step,
                "blocking" if blocking else "started, lands later",
                self._stats.bytes_communicated - before.bytes_communicated,
                1e3 * (self._stats.round_seconds - before.round_seconds),
                1e3 * (self._stats.comm_seconds - before.comm_seconds),
            )

    def describe_plan(self) -> str:
        """What a round sends, for the settings log line."""
        averager = self.averager
        if averager is None:
            return "nothing is communicated"
        described = (
            f"{averager.numel:,} values ({averager.nbytes / 2**20:.1f} MiB on the wire) "
            f"in {len(averager.buckets)} bucket(s)"
        )
        if averager.count > 1:
            largest = max(averager.fragment_nbytes(k) for k in range(averager.count))
            described += f", {averager.count} fragments of at most {largest / 2**20:.1f} MiB"
        return described

    def state_tensors(self) -> dict[str, Any]:
        """The anchors, a round in flight and the outer state, as copies for a checkpoint."""
        tensors: dict[str, Any] = {}
        if self.averager is not None:
            tensors[state_entry.ANCHOR] = [a.clone() for a in self.averager.anchor_tensors()]
            tensors[state_entry.PENDING] = self.averager.pending_state()
        if self.local_averager is not None:
            anchors = self.local_averager.anchor_tensors()
            tensors[state_entry.LOCAL_ANCHOR] = [a.clone() for a in anchors]
        if self.outer is not None:
            tensors[state_entry.OUTER] = self.outer.state_dict()
        return tensors

    def rebuild_released(self) -> None:
        """After :meth:`release_buffers`: build the averagers again at once (their anchors
        taken over), for a closed wrapper reopened by a load that brings a round in flight."""
        if self.communicates and self._plan_key is None and self.averager is not None:
            self._build_averagers(self.tracked())

    def release_buffers(self) -> None:
        """Let go of the averagers' buffers and async work, keeping what :meth:`state_tensors`
        reads (the anchors, the outer optimizer's copy and state). A wrapper reopened by
        ``load_state_dict`` re-plans at its next round: new buffers, the anchors taken over."""
        for averager in (self.averager, self.local_averager):
            if averager is not None:
                averager.release_buffers()
        self._plan_key = None
