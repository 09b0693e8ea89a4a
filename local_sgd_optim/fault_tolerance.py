"""Rounds on torchft's fault-tolerance engine: when a replica dies, the others train on.

``LocalSGDOptimizer(..., fault_tolerance=manager)`` with a torchft ``Manager``
(https://github.com/pytorch/torchft) runs every averaging round through the manager's quorum
instead of a fixed process group. Each replica group is its own job (one ``torchrun`` each); a
lighthouse computes a quorum from heartbeats, and for each round :class:`ReplicaQuorum`:

1. asks the manager for a quorum (``start_quorum``; a replica behind the others receives the
   whole state of a live peer there, over torchft's checkpoint transport);
2. rebuilds the averagers when the quorum's rank or size changed, on a :class:`QuorumGroup`
   that hands our collectives to the manager's reconfigurable process group;
3. runs our bucketed round (header, 16-bit or quantized deltas, outer step) on it, a replica
   that just received its state joining without contributing;
4. keeps the round only when ``should_commit()`` says so; otherwise it puts back every value
   the round changed and runs the same round again with the next quorum, so the local steps
   since the last round are kept (torchft's own ``LocalSGD`` and ``DiLoCo`` drop them).

torchft is imported only when a manager is given: the package imports without it (the
``ft`` extra installs it: ``pip install -e ".[ft]"`` in a clone). Launch recipe, timeouts and
what each failure costs: ``docs/fault-tolerance.md``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from local_sgd_optim.comm.groups import StandaloneGroup, collective_device
from local_sgd_optim.comm.tensors import clone_tree
from local_sgd_optim.errors import RoundError

if TYPE_CHECKING:
    from local_sgd_optim.rounds import Rounds
    from local_sgd_optim.settings import Settings

__all__ = ["STATE_KEY", "QuorumGroup", "ReplicaQuorum", "check_manager", "check_settings"]

_LOG = logging.getLogger("local_sgd_optim")

# The key of the wrapper's state among the manager's registered state dicts.
STATE_KEY = "local_sgd_optim"
# Settings that rounds through a quorum do not support yet, with the value they must have.
_UNSUPPORTED = {"overlap_steps": 0, "fragments": 1, "local_period": None, "warmup_steps": 0}
# Between two quorums that cannot commit (too few replicas for the manager): the
# lighthouse's default tick, so that a retry does not spin.
_RETRY_PAUSE_S = 0.1


def _private(manager: object, name: str) -> Any:
    """A Manager attribute torchft 0.2.0 keeps private and offers no accessor for."""
    try:
        return getattr(manager, name)
    except AttributeError:
        raise TypeError(
            f"fault_tolerance: this torchft Manager has no {name} (the attribute torchft 0.2.0 "
            "has); install the torchft version local_sgd_optim was tested with: pip install "
            "'torchft==0.2.0'"
        ) from None


def check_manager(manager: object) -> object:
    """Validate ``fault_tolerance``: ``None``, or a torchft ``Manager`` that rounds can use.

    Raises:
        TypeError: ``manager`` is not a torchft ``Manager``.
        ValueError: it quorums asynchronously, its quorum timeout does not exceed its
            operation timeout, it keeps spare replicas, or it already carries a
            ``LocalSGDOptimizer``'s state.
    """
    if manager is None:
        return None
    try:
        from torchft import Manager
        from torchft.manager import WorldSizeMode
    except ImportError:
        raise TypeError(
            "fault_tolerance must be a torchft.Manager, and torchft is not installed: "
            "pip install 'torchft>=0.2.0' (or this package's ft extra)"
        ) from None
    if not isinstance(manager, Manager):
        raise TypeError(f"fault_tolerance must be a torchft.Manager, got {type(manager).__name__}")
    if _private(manager, "_use_async_quorum"):
        raise ValueError(
            "fault_tolerance needs a Manager built with use_async_quorum=False: a replica that "
            "falls behind must receive its state before the round it joins, not after it"
        )
    quorum = _private(manager, "_quorum_timeout").total_seconds()
    timeout = _private(manager, "_timeout").total_seconds()
    if quorum <= timeout:
        raise ValueError(
            f"the Manager's quorum_timeout ({quorum:g} s) must exceed its timeout ({timeout:g} "
            "s): a replica whose collective failed reaches the next quorum up to `timeout` "
            "late, and a restarted one waits in its first quorum for the next round of the "
            "live replicas. Build the Manager with a larger quorum_timeout (or set "
            "TORCHFT_QUORUM_TIMEOUT_SEC), above the time between two rounds"
        )
    if _private(manager, "_replica_world_size_mode") != WorldSizeMode.DYNAMIC:
        raise ValueError(
            "fault_tolerance needs a Manager with world_size_mode=WorldSizeMode.DYNAMIC (the "
            "default): with FIXED_WITH_SPARES a spare replica has no rank in the quorum"
        )
    if STATE_KEY in _private(manager, "_user_state_dicts"):
        raise ValueError(
            "this Manager already carries a LocalSGDOptimizer's state (torchft cannot "
            "unregister it): build one Manager per LocalSGDOptimizer"
        )
    return manager


def check_settings(settings: Settings) -> None:
    """Raise if ``settings`` combine ``fault_tolerance`` with what its rounds do not support.

    Raises:
        ValueError: ``overlap_steps``, ``fragments``, ``local_period`` or ``warmup_steps``
            is off its default.
    """
    if settings.fault_tolerance is None:
        return
    for name, default in _UNSUPPORTED.items():
        value = getattr(settings, name)
        if value != default:
            raise ValueError(
                f"fault_tolerance cannot be combined with {name}={value!r} yet: a round "
                "through the quorum is blocking, of the whole model, over replicas only; use "
                f"{name}={default!r}"
            )


def describe_manager(manager: object) -> str:
    """``fault_tolerance`` in the settings' descriptions (a Manager's repr holds an address)."""
    return "None" if manager is None else f"{type(manager).__module__}.{type(manager).__name__}"


class QuorumGroup(StandaloneGroup):
    """The quorum's process group as our collectives see it: torchft's reconfigurable group,
    with this replica's rank and the quorum's size.

    torchft's group reports rank 0 on every replica, has no ``all_gather_into_tensor``, and is
    not registered with ``torch.distributed`` (so ``dist.get_rank`` cannot ask about it): this
    one answers rank and size itself and forwards each collective, which then runs with the
    timeouts and error handling of torchft's group. torchft swaps the group underneath at each
    new quorum; one of the same rank and size needs no new averagers.

    Args:
        pg (ProcessGroup): the torchft process group the Manager reconfigures.
        rank (int): this replica's rank in the quorum.
        size (int): the replicas in the quorum.

    Example::

        >>> rank, size = manager.participating_rank(), manager.num_participants()
        >>> group = QuorumGroup(manager._pg, rank, size)
        >>> dist.all_reduce(torch.ones(4), group=group)  # the sum over the quorum
    """

    def __init__(self, pg: dist.ProcessGroup, rank: int, size: int) -> None:
        super().__init__(rank, size, pg.name())
        self._pg = pg

    def allreduce(self, tensors: list[Tensor], opts: Any) -> dist.Work:  # type: ignore[override]
        return self._pg.allreduce(tensors, opts)

    def allgather(  # type: ignore[override]
        self, output_tensors: list[list[Tensor]], input_tensors: list[Tensor], opts: Any
    ) -> dist.Work:
        return self._pg.allgather(output_tensors, input_tensors, opts)

    def all_gather_single(self, output: Tensor, input: Tensor, opts: Any = None) -> dist.Work:
        """``dist.all_gather_single`` (and ``all_gather_into_tensor``): through the list form,
        which torchft's group has, into views of ``output``."""
        return self._pg.allgather([list(output.chunk(self.size()))], [input], opts)

    def _allgather_base(self, output: Tensor, input: Tensor, opts: Any = None) -> dist.Work:
        """What older torch calls for ``all_gather_into_tensor``."""
        return self.all_gather_single(output, input, opts)

    def alltoall_base(  # type: ignore[override]
        self,
        output: Tensor,
        input: Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: Any,
    ) -> dist.Work:
        return self._pg.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)

    def broadcast(self, tensors: list[Tensor], opts: Any) -> dist.Work:  # type: ignore[override]
        return self._pg.broadcast(tensors, opts)


class ReplicaQuorum:
    """Runs a :class:`~local_sgd_optim.LocalSGDOptimizer`'s rounds through a torchft Manager.

    It registers the wrapper's whole state with the manager (the model's ``state_dict``, the
    wrapper's, which holds the base optimizer's state, the counters, the 16-bit anchors and
    the outer optimizer's kept copy and state), so that a replica behind the others receives
    exactly what a live peer holds. :meth:`join` meets the live replicas at construction;
    :meth:`run` runs one round until a quorum commits it.

    Args:
        manager (Manager): the torchft Manager of this replica group.
        rounds (Rounds): the wrapper's rounds, which this runs on each quorum's group.
        model (nn.Module): the wrapper's model.
        optimizer (Optimizer): the wrapper, whose ``state_dict`` travels to healing peers.

    Example::

        >>> quorum = ReplicaQuorum(manager, rounds, model, opt)
        >>> quorum.run("round", lambda: rounds.run(8, True, 1, "round", False))
    """

    def __init__(
        self, manager: Any, rounds: Rounds, model: nn.Module, optimizer: Optimizer
    ) -> None:
        self._manager = manager
        self._rounds = rounds
        self._model = model
        self._optimizer = optimizer
        self._pg: dist.ProcessGroup = _private(manager, "_pg")
        self._quorum_timeout: float = _private(manager, "_quorum_timeout").total_seconds()
        self._min_replicas: int = _private(manager, "_min_replica_size")
        self._shape: tuple[int, int] | None = None  # (rank, size) the averagers were built for
        self._received: dict[str, Any] | None = None  # a live peer's state, not yet loaded
        self._contributes = True  # False from receiving a peer's state until a commit
        self._in = ""  # the call this replica's quorum is part of, for a healing peer
        self._held = False  # a quorum taken by join() for the round of the live replicas
        self._last_commit: float | None = None
        self._warned_interval = False
        self.size = 1  # the replicas of the last quorum
        manager.register_state_dict_fn(STATE_KEY, self._receive, self._send)

    # --- the state a healing peer receives ------------------------------------------------

    def _send(self) -> dict[str, Any]:
        """Called by torchft, on a live replica, when a peer heals from it: copies, taken in
        its quorum, while this replica waits for that quorum."""
        state = {"model": self._model.state_dict(), "optimizer": self._optimizer.state_dict()}
        # Copies: on CPU torchft's transport serves the tensors it is given, and this
        # replica's round changes them while a peer may still be reading.
        return {"state": clone_tree(state), "in": self._in}

    def _receive(self, received: dict[str, Any]) -> None:
        """Called by torchft in ``start_quorum`` on a replica behind the others: loaded once
        the averagers for this quorum exist (they take the anchors)."""
        self._received = received

    def _load_received(self) -> str:
        """Load a live peer's state received in this quorum; the call that peer is in."""
        received, self._received = self._received, None
        if received is None:
            return ""
        state = received["state"]
        self._model.load_state_dict(state["model"])
        self._optimizer.load_state_dict(state["optimizer"])
        self._contributes = False
        steps = getattr(self._optimizer, "optimizer_steps", "?")
        _LOG.info(
            "fault tolerance: this replica received the state of a live peer at optimizer "
            "step %s (torchft step %d); it joins the next round without contributing",
            steps,
            self._manager.current_step(),
        )
        return str(received["in"])

    # --- quorums --------------------------------------------------------------------------

    def _start_quorum(self, kind: str, timeout: float) -> None:
        """A quorum for a round of ``kind`` (``""``: joining at construction), within
        ``timeout`` seconds, or a RoundError that says why."""
        self._in = kind
        try:
            self._manager.start_quorum(timeout=timedelta(seconds=max(timeout, 0.001)))
        except Exception as failure:
            raise RoundError(
                f"fault tolerance: no quorum formed for the {kind or 'first quorum'} within "
                f"{timeout:.1f} s "
                f"(torchft: {str(failure).strip()}). Either fewer replicas are alive than the "
                "lighthouse's --min_replicas, or the live replicas' rounds are further apart "
                f"than the Manager's quorum_timeout ({self._quorum_timeout:g} s): start more "
                "replicas, lower --min_replicas, or raise quorum_timeout (or "
                "TORCHFT_QUORUM_TIMEOUT_SEC). Nothing was changed on this replica since its "
                "last committed round; torchft's Manager cannot start another quorum after "
                "this error, so restart the replica"
            ) from failure
        finally:
            self._in = ""

    def _group(self) -> None:
        """Point the rounds at this quorum's group; new averagers if its rank or size changed."""
        rank = self._manager.participating_rank()
        size = self._manager.num_participants()
        if rank is None:  # pragma: no cover - refused at construction (spares)
            raise RoundError("fault tolerance: this replica has no rank in the quorum")
        if (rank, size) != self._shape:
            _LOG.info("fault tolerance: quorum of %d replica(s), this one rank %d", size, rank)
            self._rounds.use_group(QuorumGroup(self._pg, rank, size))
            self._shape = (rank, size)
        self.size = size

    def _exchange(self) -> int:
        """How many replicas contribute to this round; every replica drops its 16-bit anchor
        unless all hold one, so that all take the same (full-precision) path."""
        group = self._rounds.group
        anchored = self._rounds.anchored
        device = collective_device(group, self._rounds.device)
        flags = [int(self._contributes), int(anchored), 1]
        mine = torch.tensor(flags, dtype=torch.int64, device=device)
        try:
            dist.all_reduce(mine, group=group)
        except Exception as failure:
            raise RoundError(
                f"fault tolerance: the quorum's first collective failed ({failure})"
            ) from failure
        contributors, holding, size = (int(v) for v in mine.tolist())
        if 0 < holding < size:
            self._rounds.forget_anchors()
        if contributors == 0:
            # Every replica here received its state from a peer that has since gone (the
            # round they joined failed): their states are the last there are, so all count.
            self._contributes = True
            return size
        return contributors

    # --- rounds ---------------------------------------------------------------------------

    def join(self, resume: Callable[[str], None]) -> None:
        """At construction: meet the live replicas at their next round (or the others at
        theirs, on a fresh start), take a live peer's state if behind, and join the round
        the live replicas are in with ``resume(kind)``.

        Raises:
            RoundError: no quorum formed within the Manager's ``quorum_timeout``.
        """
        began = time.monotonic()
        while True:
            self._start_quorum("", self._quorum_timeout - (time.monotonic() - began))
            problem = self._join_once(resume)
            if problem is None:
                return
            self._retry_or_raise("first quorum", problem, began)

    def _join_once(self, resume: Callable[[str], None]) -> str | None:
        """One try of :meth:`join` on the quorum just formed; what went wrong, if anything."""
        manager = self._manager
        if (error := manager.errored()) is not None:
            return f"the quorum failed ({str(error).splitlines()[0]})"
        self._group()
        kind = self._load_received()
        if kind:  # the live replicas are in a round: join it on this quorum
            self._held = True
            resume(kind)  # runs the round through run(), which takes the held quorum
            if not self._held:
                return None
            self._held = False  # pragma: no cover - the round was not due after all
            manager.report_error(RuntimeError(f"no {kind} to join"))
        else:
            # Every replica of a fresh start is here: one collective, so that none commits
            # (which stops torchft serving its state) before its healing peers have it.
            try:
                self._exchange()
            except RoundError as failure:
                manager.report_error(failure)
        if manager.should_commit():
            self._contributes = True
            return None
        return str(manager.errored() or "the Manager did not commit it")

    def run(self, kind: str, attempt: Callable[[], None]) -> None:
        """Run ``attempt`` (one round of ``kind``) on a quorum until one commits it.

        A quorum that does not commit leaves nothing changed: every value the round changed
        is put back and the round runs again with the next quorum, until the Manager's
        ``quorum_timeout`` has passed since this round began.

        Raises:
            RoundError: no quorum formed or committed in time, or the round's own verdict
                (ranks out of step, NaN), which is the same on every replica.
        """
        began = time.monotonic()
        while True:
            if self._held:
                self._held = False
            else:
                self._start_quorum(kind, self._quorum_timeout - (time.monotonic() - began))
            problem = self._attempt(attempt)
            if self._manager.should_commit():
                self._rounds.committed()
                self._committed(kind)
                return
            if problem is None:
                problem = "the Manager did not commit it"
            self._retry_or_raise(kind, problem, began)

    def _attempt(self, attempt: Callable[[], None]) -> str | None:
        """One try of a round on the quorum just formed; what went wrong, if anything, after
        putting back what it changed."""
        manager = self._manager
        if (error := manager.errored()) is not None:
            return f"the quorum failed ({str(error).splitlines()[0]})"
        self._group()
        self._load_received()
        if manager.num_participants() < self._min_replicas:
            time.sleep(_RETRY_PAUSE_S)
            return (
                f"the quorum has {manager.num_participants()} replica(s), fewer than the "
                f"Manager's min_replica_size={self._min_replicas}"
            )
        saved = self._rounds.save()
        try:
            contributors = self._exchange()
            if not self._contributes:
                self._rounds.withhold()
            self._rounds.set_contributors(contributors)
            attempt()
            return None
        except RoundError as failure:
            manager.report_error(failure)
            self._rounds.restore(saved)
            if failure.__cause__ is None:  # a verdict every replica reached alike
                manager.should_commit()
                raise
            return str(failure)
        except BaseException as failure:
            manager.report_error(failure)
            self._rounds.restore(saved)
            raise

    def _committed(self, kind: str) -> None:
        self._contributes = True
        now = time.monotonic()
        if self._last_commit is not None and not self._warned_interval:
            interval = now - self._last_commit
            if interval > self._quorum_timeout:
                self._warned_interval = True
                message = (
                    f"fault tolerance: {interval:.1f} s passed between two rounds, more than "
                    f"the Manager's quorum_timeout ({self._quorum_timeout:g} s): a restarted "
                    "replica waits for the next round in its first quorum and will time out. "
                    "Raise quorum_timeout (or TORCHFT_QUORUM_TIMEOUT_SEC) or lower period"
                )
                _LOG.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=5)
        self._last_commit = now
        _LOG.debug("fault tolerance: %s committed by a quorum of %d", kind, self.size)

    def _retry_or_raise(self, kind: str, problem: str, began: float) -> None:
        waited = time.monotonic() - began
        if waited >= self._quorum_timeout:
            raise RoundError(
                f"fault tolerance: the {kind} did not commit within the Manager's "
                f"quorum_timeout ({self._quorum_timeout:g} s); last: {problem}. Nothing was "
                "changed on this replica since its last committed round. Start more replicas "
                "(or lower the Manager's min_replica_size and the lighthouse's --min_replicas)"
            )
        _LOG.warning(
            "fault tolerance: the %s was not committed (%s); nothing changed, running it again "
            "with the next quorum (%.1f s of quorum_timeout=%g s spent)",
            kind,
            problem,
            waited,
            self._quorum_timeout,
        )
