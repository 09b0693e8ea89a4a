"""Rounds on torchft's fault-tolerance engine, with real signals on gloo.

Each test starts a ``torchft_lighthouse`` and replica groups (``tests/_ft_replica.py``, one
process each, or one ``torchrun`` of 2 ranks each), then kills, stops and restarts them and
reads what every replica logged at each committed round. The lighthouse drops a silent replica
after ``HEARTBEAT_MS``; a replica that falls behind receives a live peer's state in its next
quorum.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _common import ROOT, launcher_env, rank
from torch import nn

from local_sgd_optim import LocalSGDOptimizer
from local_sgd_optim.averaging import BucketedAverager

needs_torchft = pytest.mark.skipif(
    importlib.util.find_spec("torchft") is None, reason="needs torchft: pip install -e '.[ft]'"
)

HEARTBEAT_MS = 2000
PERIOD = 4
SCRIPT = ROOT / "tests" / "_ft_replica.py"


def _lighthouse_binary() -> str:
    found = shutil.which("torchft_lighthouse")
    return found or str(Path(sys.executable).parent / "torchft_lighthouse")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A lighthouse and replica groups in ``work``, each logging JSON lines per round."""

    def __init__(self, work: Path, min_replicas: int = 1, *replica_args: str) -> None:
        self.work = work
        self.replica_args = replica_args
        port = _free_port()
        self.lighthouse = subprocess.Popen(
            [
                _lighthouse_binary(),
                *("--min_replicas", str(min_replicas), "--quorum_tick_ms", "100"),
                *("--join_timeout_ms", "10000", "--heartbeat_timeout_ms", str(HEARTBEAT_MS)),
                *("--bind", f"[::]:{port}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.address = f"http://localhost:{port}"
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.starts: dict[int, int] = {}
        self.killed: set[int] = set()  # by the test: their exit is no failure

    def start(self, replica: int, *extra: str, ranks: int = 1) -> None:
        args = [str(SCRIPT), "--replica", str(replica), "--dir", str(self.work)]
        self.starts[replica] = self.starts.get(replica, -1) + 1
        args += ["--lighthouse", self.address, *self.replica_args, *extra]
        args += ["--incarnation", str(self.starts[replica])]
        if ranks == 1:
            command = [sys.executable, *args]
        else:
            launcher = ["--standalone", "--nproc_per_node", str(ranks)]
            command = [sys.executable, "-m", "torch.distributed.run", *launcher, *args]
        out = (self.work / f"out_{replica}.txt").open("ab")
        env = launcher_env(OMP_NUM_THREADS="1")
        self.procs[replica] = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def signal(self, replica: int, sig: int) -> None:
        os.killpg(self.procs[replica].pid, sig)
        for ready in self.work.glob(f"ready_{replica}_*"):  # torchrun's workers too
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(ready.read_text()), sig)
        if sig == signal.SIGKILL:
            self.procs[replica].wait()
            self.killed.add(id(self.procs[replica]))

    def log(self, replica: int, rank: int = 0) -> list[dict[str, Any]]:
        """What the replica's latest start logged."""
        path = self.work / f"log_{replica}_{rank}.jsonl"
        if not path.exists():
            return []
        entries = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [e for e in entries if e["incarnation"] == self.starts[replica]]

    def rounds(self, replica: int, rank: int = 0) -> list[dict[str, Any]]:
        return [r for r in self.log(replica, rank) if r["event"] == "round"]

    def wait(
        self, what: str, condition: Callable[[], bool], timeout: float = 60, exits: bool = False
    ) -> None:
        """Until ``condition()``; fails after ``timeout`` s, or when a replica the test did not
        kill exits with an error (unless ``exits``)."""
        deadline = time.monotonic() + timeout
        while not condition():
            dead = {
                r: p.returncode
                for r, p in self.procs.items()
                if p.poll() not in (None, 0) and id(p) not in self.killed
            }
            if time.monotonic() > deadline or (dead and not exits):
                raise AssertionError(f"timed out waiting for {what}; exited: {dead}\n{self}")
            time.sleep(0.05)

    def touch(self, name: str) -> None:
        (self.work / name).touch()

    def remove(self, name: str) -> None:
        (self.work / name).unlink()

    def finish_at(self, step: int) -> None:
        (self.work / "finish").write_text(str(step))

    def __str__(self) -> str:
        tails = []
        for replica in self.procs:
            out = self.work / f"out_{replica}.txt"
            text = out.read_text(errors="replace") if out.exists() else ""
            lines = [line for line in text.splitlines() if "INFO" not in line]
            tails.append(f"--- replica {replica}:\n" + "\n".join(lines[-25:]))
        return "\n".join(tails)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.lighthouse.kill()
        self.lighthouse.wait()


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(min_replicas: int = 1, *replica_args: str) -> Cluster:
        made.append(Cluster(tmp_path, min_replicas, *replica_args))
        return made[-1]

    yield make
    for cluster in made:
        cluster.close()


def _at(log: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """The entry of ``log`` (a replica's rounds) after its ``rounds``-th round."""
    [entry] = [r for r in log if r["rounds"] == rounds]
    return entry


@needs_torchft
def test_replicas_train_on_through_kills_stops_and_restarts(
    cluster_factory: Callable[..., Cluster],
) -> None:
    """3 replica groups of 1 process, DiLoCo (Nesterov outer step) with bfloat16 deltas:
    a SIGKILL between rounds, a restart that heals, a SIGSTOP and SIGCONT, and a SIGKILL
    during a round's collective, with the survivors training through all of it."""
    cluster = cluster_factory(1, "--outer", "--comm-dtype", "bfloat16", "--period", str(PERIOD))
    for replica in range(3):
        cluster.start(replica)
    cluster.wait("3 replicas up", lambda: len(list(cluster.work.glob("ready_*"))) == 3)
    cluster.touch("start")
    cluster.wait("2 rounds", lambda: all(len(cluster.rounds(r)) >= 2 for r in range(3)))

    # SIGKILL between rounds: the survivors stall at their next round until the lighthouse
    # gives up on the dead replica, then train on, two of them.
    cluster.touch("hold")
    time.sleep(0.3)  # every replica is between steps
    cluster.signal(2, signal.SIGKILL)
    killed_after = max(r["rounds"] for r in cluster.rounds(0))
    cluster.remove("hold")
    cluster.wait("2 rounds of 2", lambda: len(cluster.rounds(0)) >= killed_after + 2)
    stall = _at(cluster.rounds(0), killed_after + 1)
    print(f"stall after a SIGKILL between rounds: {stall['seconds']:.2f} s")
    assert stall["size"] == 2 and stall["seconds"] <= HEARTBEAT_MS / 1000 + 1.0, stall

    # A restart: it waits in its first quorum for the survivors' next round, receives the
    # state of one of them, joins that round without contributing, and ends it bitwise equal
    # to that peer.
    cluster.touch("hold")
    cluster.start(2, "--join")
    cluster.wait("the restart's Manager", lambda: (cluster.work / "ready_2_0").exists())
    time.sleep(0.5)  # the restart is in its first quorum
    cluster.remove("hold")
    cluster.wait("the restart built", lambda: len(cluster.log(2)) >= 1, timeout=30)
    built = cluster.log(2)[0]
    peers = [_at(cluster.rounds(r), built["rounds"]) for r in (0, 1)]
    assert built["size"] == 3 and built["step"] == peers[0]["step"] > 0, (built, peers)
    assert built["digest"] in [p["digest"] for p in peers], (built, peers)
    print(f"restart: built in {built['seconds']:.2f} s, joined at step {built['step']}")

    # SIGSTOP: the stopped replica falls out of the quorum; after SIGCONT it is behind, and
    # its next quorum gives it a live peer's state.
    cluster.touch("hold")
    time.sleep(0.3)
    cluster.signal(1, signal.SIGSTOP)
    stopped_after = max(r["rounds"] for r in cluster.rounds(0))
    cluster.remove("hold")
    cluster.wait("2 rounds without 1", lambda: len(cluster.rounds(0)) >= stopped_after + 2)
    assert _at(cluster.rounds(0), stopped_after + 2)["size"] == 2
    cluster.signal(1, signal.SIGCONT)
    cluster.wait("1 back", lambda: cluster.rounds(1)[-1]["rounds"] > stopped_after + 2)
    back = cluster.rounds(1)[-1]
    peers = [_at(cluster.rounds(r), back["rounds"]) for r in (0, 2)]
    assert back["size"] == 3 and back["step"] == peers[0]["step"], (back, peers)
    assert back["digest"] in [p["digest"] for p in peers], (back, peers)

    # SIGKILL during a round's collective: replica 2 stops at the start of its next round,
    # where the others wait for it in the round's header; killed there, their collective
    # fails, and they put back what the round changed and run it again without it.
    cluster.touch("pause_2")
    cluster.wait("2 paused in a round", lambda: (cluster.work / "paused_2").exists())
    time.sleep(0.3)  # the others are in the collective
    cluster.signal(2, signal.SIGKILL)
    before = max(r["rounds"] for r in cluster.rounds(0))
    cluster.wait("the redone round", lambda: cluster.rounds(0)[-1]["rounds"] > before)
    redone = [_at(cluster.rounds(r), before + 1) for r in (0, 1)]
    for entry in redone:
        attempts = entry["attempts"]
        # Every attempt started from the same state: the failed one changed nothing.
        assert len(attempts) >= 2 and len(set(attempts)) == 1, entry
        assert entry["size"] == 2 and entry["torchft_step"] == redone[0]["torchft_step"]
    print(f"kill during a collective: round redone in {redone[0]['seconds']:.2f} s")

    last = max(r["step"] for r in cluster.rounds(0))
    cluster.finish_at(last + 2 * PERIOD)
    cluster.wait("exit", lambda: all(cluster.procs[r].poll() is not None for r in (0, 1)))
    assert cluster.procs[0].returncode == 0 and cluster.procs[1].returncode == 0, cluster
    for replica in (0,):  # never stopped: a round at every period, none lost or repeated
        steps = [r["step"] for r in cluster.rounds(replica)]
        assert steps == list(range(PERIOD, last + 2 * PERIOD + 1, PERIOD)), steps
        assert [r["rounds"] for r in cluster.rounds(replica)] == list(range(1, len(steps) + 1))


@needs_torchft
def test_two_replica_groups_of_two_ranks(cluster_factory: Callable[..., Cluster]) -> None:
    """2 replica groups of 2 ranks (one torchrun each): group 1 is killed between rounds, each
    rank of group 0 trains on alone, and a restarted group 1 heals rank by rank from group 0's
    ranks, bitwise equal to them after the round it joins."""
    cluster = cluster_factory(1, "--period", str(PERIOD), "--comm-dtype", "bfloat16")
    for replica in range(2):
        cluster.start(replica, ranks=2)
    cluster.wait("2 groups up", lambda: len(list(cluster.work.glob("ready_*"))) == 4)
    cluster.touch("start")
    every = [(g, r) for g in range(2) for r in range(2)]
    cluster.wait("2 rounds", lambda: all(len(cluster.rounds(g, r)) >= 2 for g, r in every))
    cluster.touch("hold")
    time.sleep(0.3)
    cluster.signal(1, signal.SIGKILL)
    killed_after = [max(e["rounds"] for e in cluster.rounds(0, r)) for r in range(2)]
    for ready in list(cluster.work.glob("ready_1_*")):
        ready.unlink()
    cluster.remove("hold")
    for r in range(2):
        cluster.wait(f"rank {r} alone", lambda r=r: len(cluster.rounds(0, r)) > killed_after[r])
        stall = _at(cluster.rounds(0, r), killed_after[r] + 1)
        print(f"2x2: group 0 rank {r} stalled {stall['seconds']:.2f} s after group 1's kill")
        assert stall["size"] == 1 and stall["seconds"] <= HEARTBEAT_MS / 1000 + 1.0, stall

    cluster.touch("hold")
    cluster.start(1, "--join", ranks=2)
    cluster.wait("group 1's Managers", lambda: len(list(cluster.work.glob("ready_1_*"))) == 2)
    time.sleep(0.5)
    cluster.remove("hold")
    for r in range(2):
        cluster.wait(f"rank {r} of group 1 built", lambda r=r: len(cluster.log(1, r)) >= 1)
        built = cluster.log(1, r)[0]
        peer = _at(cluster.rounds(0, r), built["rounds"])
        assert built["size"] == 2 and built["digest"] == peer["digest"], (built, peer)
    last = max(e["step"] for r in range(2) for e in cluster.rounds(0, r))
    cluster.finish_at(last + PERIOD)
    cluster.wait("exit", lambda: all(p.poll() is not None for p in cluster.procs.values()))
    assert all(p.returncode == 0 for p in cluster.procs.values()), cluster


@needs_torchft
def test_below_min_replicas_every_survivor_raises(cluster_factory: Callable[..., Cluster]) -> None:
    """The lighthouse needs 3 replicas: after one is killed, no quorum forms, and each
    survivor raises a RoundError that says so within the Manager's quorum_timeout."""
    quorum_timeout = 5.0
    cluster = cluster_factory(3, "--quorum-timeout", str(quorum_timeout), "--period", "2")
    for replica in range(3):
        cluster.start(replica)
    cluster.wait("3 replicas up", lambda: len(list(cluster.work.glob("ready_*"))) == 3)
    cluster.touch("start")
    cluster.wait("a round", lambda: all(len(cluster.rounds(r)) >= 1 for r in range(3)))
    cluster.touch("hold")
    time.sleep(0.3)
    cluster.signal(2, signal.SIGKILL)
    killed = time.time()
    cluster.remove("hold")
    cluster.wait(
        "exit of the survivors",
        lambda: all(cluster.procs[r].poll() is not None for r in (0, 1)),
        timeout=quorum_timeout + 15,
        exits=True,
    )
    for replica in (0, 1):
        error = json.loads((cluster.work / f"error_{replica}_0.json").read_text())
        seconds = error["wall"] - killed
        print(f"below min_replicas: replica {replica} raised {seconds:.1f} s after the kill")
        assert seconds <= quorum_timeout + 1.0
        assert "no quorum formed for the round" in error["error"], error
        assert "--min_replicas" in error["error"] and cluster.procs[replica].returncode != 0


# --- a rank that joins a round without contributing (on the ranks of the test harness) ----


def _withheld_round(comm_dtype: str | None) -> dict[str, Any]:
    """Every rank moves the same tensors its own way; rank 1 then withholds (as a replica that
    just received a peer's state does) and the round's mean is over rank 0 alone."""
    g = torch.Generator().manual_seed(5)
    start = torch.randn(3000, generator=g)
    tensors = [start.clone(), start[:700].clone().reshape(7, 100).t()]
    dtype = torch.bfloat16 if comm_dtype == "bfloat16" else comm_dtype
    averager = BucketedAverager(tensors, None, bucket_cap_mb=4 / 1024, comm_dtype=dtype)
    if comm_dtype is not None:
        averager.set_anchor_from_tensors()  # every rank holds the same values
    mine = torch.Generator().manual_seed(100 + rank())
    with torch.no_grad():
        for t in tensors:
            t += torch.randn(t.shape, generator=mine) * 1e-2
    moved = [t.clone() for t in tensors]
    if rank() == 1:
        averager.withhold()
    averager.contributors = 1
    applied = averager.average(step=1)
    return {"applied": applied, "moved": moved, "result": [t.clone() for t in tensors]}


@pytest.mark.parametrize("comm_dtype", [None, "bfloat16", "int8"])
def test_a_rank_that_withholds_contributes_nothing(ranks: Any, comm_dtype: str | None) -> None:
    r0, r1 = ranks.run(_withheld_round, comm_dtype)
    assert r0["applied"] and r1["applied"]
    for a, b, own in zip(r0["result"], r1["result"], r0["moved"]):
        assert torch.equal(a, b)  # every rank ends with the same values
        if comm_dtype is None:
            assert torch.equal(a, own)  # the mean of rank 0 alone
        else:  # rank 0's values through a 16- or 8-bit delta (at most about 0.05) from the
            # anchor: bfloat16 keeps 8 bits of it, int8 codes 1/127 of its block's largest
            bound = 0.05 * (2**-8 if comm_dtype == "bfloat16" else 1 / 127)
            assert 0 < (a - own).abs().max() <= bound, (a - own).abs().max()


@needs_torchft
def test_construction_refuses_what_rounds_through_a_quorum_cannot_serve() -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo
    from torchft._torchft import LighthouseServer
    from torchft.manager import WorldSizeMode

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    managers: list[Any] = []

    def manager(**changed: Any) -> Any:
        options: dict[str, Any] = {
            "use_async_quorum": False,
            "timeout": timedelta(seconds=2),
            "quorum_timeout": timedelta(seconds=5),
            **changed,
        }
        managers.append(
            Manager(
                pg=ProcessGroupGloo(),
                load_state_dict=None,
                state_dict=None,
                min_replica_size=1,
                rank=0,
                world_size=1,
                store_addr="127.0.0.1",
                store_port=store.port,
                lighthouse_addr=lighthouse.address(),
                **options,
            )
        )
        return managers[-1]

    model = nn.Linear(2, 2)

    def build(**options: Any) -> LocalSGDOptimizer:
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        return LocalSGDOptimizer(base, model, 4, **options)

    try:
        with pytest.raises(TypeError, match=r"fault_tolerance must be a torchft\.Manager, got int"):
            build(fault_tolerance=1)
        with pytest.raises(ValueError, match="use_async_quorum=False"):
            build(fault_tolerance=manager(use_async_quorum=True))
        with pytest.raises(ValueError, match=r"quorum_timeout \(2 s\) must exceed its timeout"):
            build(fault_tolerance=manager(quorum_timeout=timedelta(seconds=2)))
        with pytest.raises(ValueError, match="FIXED_WITH_SPARES"):
            build(fault_tolerance=manager(world_size_mode=WorldSizeMode.FIXED_WITH_SPARES))
        usable = manager()
        unsupported = {"overlap_steps": 1, "fragments": 2, "local_period": 2, "warmup_steps": 2}
        for name, value in unsupported.items():
            with pytest.raises(ValueError, match=f"cannot be combined with {name}={value}"):
                build(fault_tolerance=usable, **{name: value})
    finally:
        for m in managers:
            m.shutdown(wait=False)
        lighthouse.shutdown()
