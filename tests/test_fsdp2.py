"""Local SGD and DiLoCo across FSDP2 replica groups, on 4 gloo ranks: 2 replicas x 2 shards.

The mesh is ``(replicate=2, shard=2)``: ranks 0 and 1 are replica 0, ranks 2 and 3 replica 1;
the model is sharded with ``fully_shard(module, mesh=mesh["shard"])`` and the wrapper averages
over ``mesh["replicate"].get_group()`` (ranks {0, 2} and {1, 3}). Every sharded run is compared
with the same training done unsharded: each replica one process that trains on its replica's
combined batch, either computed here by hand (no communication) or by the wrapper itself on an
unsharded model over the replicate group (for ``comm_dtype`` and ``overlap_steps``, whose
numbers only the wrapper defines).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _common import ROOT, batch, raised, rank, roundtrip, torchrun
from torch import Tensor, nn

from local_sgd_optim import LocalSGDOptimizer, state_entry
from local_sgd_optim.tracked import averaged_tensors, outer_sources, sharded, tracked

WORLD = 4
LR, MOMENTUM = 0.1, 0.9

# --- functions run on every rank (module level, so worker processes can import them) ------


def _net(seed: int) -> nn.Module:
    # Uneven sizes on purpose: 5 and 3 rows over 2 shards exercise FSDP2's padding.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5), nn.Tanh(), nn.Linear(5, 3))


def _mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


def _replica() -> int:
    return rank() // 2


def _sharded_net(mesh: Any, seed: int, **fsdp: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _net(seed)
    fully_shard(model[2], mesh=mesh, **fsdp)
    # The root holds the first and last layers: after a forward without backward FSDP2 leaves
    # them unsharded, which rounds must handle.
    fully_shard(model, mesh=mesh, **fsdp)
    return model


def _replica_batch(replica: int, step: int) -> tuple[Tensor, Tensor]:
    """What the replica's two ranks see together at ``step``."""
    (xa, ya), (xb, yb) = batch(2 * replica, step), batch(2 * replica + 1, step)
    return torch.cat([xa, xb]), torch.cat([ya, yb])


def _shards(model: nn.Module) -> Tensor:
    """This rank's local shards, flat (no communication)."""
    with torch.no_grad():
        return torch.cat([p.to_local().reshape(-1).clone() for p in model.parameters()])


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _shard_of(params: list[Tensor], shard: int) -> Tensor:
    """What :func:`_shards` holds on shard ``shard`` when the full parameters are ``params``:
    FSDP2 gives shard i the i-th ``torch.chunk`` of dim 0."""
    return torch.cat([p.chunk(2, dim=0)[shard].reshape(-1) for p in params])


def _diloco(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def _scheduled(steps: int, period: int, warmup: int) -> set[int]:
    """The 1-based optimizer steps that end with a scheduled round (close() not included)."""
    return set(range(warmup + period, steps + 1, period))


def _manual(steps: int, period: int, warmup: int, diloco: bool) -> list[list[list[Tensor]]]:
    """Each replica as one unsharded process on its combined batch, averaged by hand; the
    parameters of replica 0 and 1 after every step, and after close()."""
    models = [_net(0), _net(0)]
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM) for m in models]
    kept = [p.detach().clone() for p in models[0].parameters()]
    outer = _diloco(kept) if diloco else None
    scheduled = _scheduled(steps, period, warmup)
    history: list[list[list[Tensor]]] = [[], []]
    for i in range(steps):
        for q, model in enumerate(models):
            x, y = _replica_batch(q, i)
            nn.functional.cross_entropy(model(x), y).backward()
        if i < warmup:  # synchronous: the gradients averaged across replicas
            for a, b in zip(models[0].parameters(), models[1].parameters()):
                mean = (a.grad + b.grad) / 2
                a.grad.copy_(mean)
                b.grad.copy_(mean)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        if i + 1 in scheduled:
            _average(models, kept, outer)
        for q, model in enumerate(models):
            history[q].append(_params(model))
    if steps not in scheduled:  # close()'s final round
        _average(models, kept, outer)
    for q, model in enumerate(models):
        history[q].append(_params(model))
    return history


@torch.no_grad()
def _average(models: list[nn.Module], kept: list[Tensor], outer: Any) -> None:
    """Both replicas to their mean, or, with a DiLoCo ``outer`` optimizer over ``kept``, to
    its step with the pseudo-gradient (kept minus the mean)."""
    pairs = list(zip(models[0].parameters(), models[1].parameters()))
    for k, (a, b) in zip(kept, pairs):
        mean = (a + b) / 2
        if outer is not None:
            k.grad = k - mean
        else:
            k.copy_(mean)
    if outer is not None:
        outer.step()
    for k, (a, b) in zip(kept, pairs):
        a.copy_(k)
        b.copy_(k)


class _Trace:
    """Every collective's phase and group while active: ``dist`` functions wrapped."""

    NAMES = (
        "all_reduce",
        "broadcast",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_single",
        "reduce_scatter_tensor",
        "reduce_scatter_single",
        "all_gather_object",
    )

    def __init__(self) -> None:
        self.phase: str | None = None
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        originals = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for name, fn in originals.items():
            setattr(dist, name, self._wrap(name, fn))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def traced(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            ranks = tuple(
                range(dist.get_world_size())
                if group is None
                else dist.get_process_group_ranks(group)
            )
            if self.phase is not None:
                self.calls.append((self.phase, name, ranks))
            return fn(*args, **kwargs)

        return traced


def _sharded_run(
    mesh: Any, steps: int, period: int, trace: _Trace | None = None, **kwargs: Any
) -> dict[str, Any]:
    """The model sharded inside each replica (replicas seeded differently: the initial
    broadcast from the replicate group's first rank aligns them), averaged across replicas."""
    model = _sharded_net(mesh["shard"], seed=_replica())
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    group = mesh["replicate"].get_group()
    opt = LocalSGDOptimizer(base, model, period, process_group=group, **kwargs)
    tracer = trace if trace is not None else _Trace()
    history, sent = [], []
    with tracer.active():
        for i in range(steps):
            tracer.phase = f"forward-backward {i}"
            nn.functional.cross_entropy(model(batch(rank(), i)[0]), batch(rank(), i)[1]).backward()
            tracer.phase = f"step {i}"
            opt.step()
            opt.zero_grad()
            tracer.phase = None
            history.append(_shards(model))
            sent.append(opt.stats.bytes_communicated)
        with torch.no_grad():  # evaluation: FSDP2 leaves the root unsharded until resharded
            model(batch(rank(), 99)[0])
        tracer.phase = "close"
        opt.close()
        tracer.phase = None
    history.append(_shards(model))
    return {"history": history, "sent": sent, "opt": opt, "model": model}


def _unsharded_run(mesh: Any, steps: int, period: int, **kwargs: Any) -> list[list[Tensor]]:
    """The wrapper on an unsharded model over the same replicate group: this rank plays its
    replica, training on the replica's combined batch."""
    model = _net(_replica())
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    group = mesh["replicate"].get_group()
    opt = LocalSGDOptimizer(base, model, period, process_group=group, **kwargs)
    history = []
    for i in range(steps):
        x, y = _replica_batch(_replica(), i)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        history.append(_params(model))
    opt.close()
    history.append(_params(model))
    return history


def _resume(mesh: Any) -> dict[str, Any]:
    """state_dict() in the middle of a period with a round in flight (DiLoCo, 16-bit deltas,
    overlap), continued; then the model's shards restored, a new wrapper loaded, continued."""
    model = _sharded_net(mesh["shard"], seed=_replica())
    group = mesh["replicate"].get_group()
    settings: dict[str, Any] = {
        "process_group": group,
        "outer_optimizer": _diloco,
        "comm_dtype": torch.bfloat16,
        "overlap_steps": 1,
    }

    def train(opt: LocalSGDOptimizer, steps: range) -> None:
        for i in steps:
            x, y = batch(rank(), i)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    first = LocalSGDOptimizer(base, model, 3, **settings)
    train(first, range(3))  # the round at step 3 is in flight
    state = roundtrip(first.state_dict())
    shards = [t.clone() for t in averaged_tensors(list(tracked(model, [], True)))]
    train(first, range(3, 8))
    continued = _shards(model)
    with torch.no_grad():
        for t, saved in zip(averaged_tensors(list(tracked(model, [], True))), shards):
            t.copy_(saved)
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    second = LocalSGDOptimizer(base, model, 3, broadcast_initial=False, **settings)
    second.load_state_dict(state)
    train(second, range(3, 8))
    entry = state[state_entry.ENTRY_KEY]
    saved = [entry.get(k) is not None for k in (state_entry.PENDING, state_entry.OUTER)]
    saved.append(bool(entry.get(state_entry.ANCHOR)))
    return {"continued": continued, "resumed": _shards(model), "saved": saved}


def _parity() -> dict[str, Any]:
    mesh = _mesh()
    out: dict[str, Any] = {}
    steps, period, warmup = 8, 3, 1
    trace = _Trace()
    # Buckets of 256 bytes: a round goes through several.
    plain = _sharded_run(mesh, steps, period, trace, warmup_steps=warmup, bucket_cap_mb=2**-12)
    out["plain"] = plain["history"]
    out["plain_sent"] = plain["sent"]
    out["trace"] = trace.calls
    out["replicate_ranks"] = tuple(dist.get_process_group_ranks(mesh["replicate"].get_group()))
    out["shard_ranks"] = tuple(dist.get_process_group_ranks(mesh["shard"].get_group()))
    entries = list(tracked(plain["model"], [], True))
    out["is_sharded"] = sharded(entries)
    out["locals_plain"] = all(type(t) is Tensor for t in averaged_tensors(entries))
    out["locals_plain"] &= all(type(t) is Tensor for t in outer_sources(entries))
    out["manual_plain"] = _manual(steps, period, warmup, diloco=False)
    out["diloco"] = _sharded_run(mesh, 7, 3, outer_optimizer=_diloco)["history"]
    out["manual_diloco"] = _manual(7, 3, 0, diloco=True)
    for name, kwargs in {
        "bf16": {"comm_dtype": torch.bfloat16, "outer_optimizer": _diloco},
        "overlap": {"overlap_steps": 1},
    }.items():
        out[name] = _sharded_run(mesh, 7, 3, **kwargs)["history"]
        out[f"{name}_reference"] = _unsharded_run(mesh, 7, 3, **kwargs)
    out["manual_bf16"] = out["manual_diloco"]  # the same run in full precision
    # Streaming DiLoCo on shards: each rank cuts its own local shards, as its replicas do.
    fragmented = _sharded_run(mesh, 7, 4, fragments=2, outer_optimizer=_diloco)
    out["fragments"] = fragmented["history"]
    out["fragments_sent"] = fragmented["sent"]
    out.update(_resume(mesh))
    return out


@pytest.fixture(scope="module")
def parity(ranks: Any) -> list[dict[str, Any]]:
    return ranks.run(_parity, world_size=WORLD, timeout=150)  # type: ignore[no-any-return]


# --- tests -----------------------------------------------------------------------------


def _assert_history(
    got: list[Tensor], want: list[list[Tensor]], shard: int, atol: float, what: str
) -> None:
    """This rank's shards after each step against the reference's full parameters."""
    assert len(got) == len(want), what
    for i, (mine, full) in enumerate(zip(got, want)):
        expected = _shard_of(full, shard)
        torch.testing.assert_close(mine, expected, atol=atol, rtol=0, msg=f"{what}: entry {i}")


def test_sharded_local_sgd_and_diloco_equal_the_unsharded_replicas(
    parity: list[dict[str, Any]],
) -> None:
    """(a) After every step, and after close(), each rank's shards are those of its replica
    in the hand-written reference, within 1e-5: a warm-up step, local steps (the replicas
    differ), rounds (the replicas meet), Local SGD and DiLoCo."""
    for r, out in enumerate(parity):
        q, s = divmod(r, 2)
        _assert_history(out["plain"], out["manual_plain"][q], s, 1e-5, f"Local SGD, rank {r}")
        _assert_history(out["diloco"], out["manual_diloco"][q], s, 1e-5, f"DiLoCo, rank {r}")
        assert out["is_sharded"] and out["locals_plain"]
    # The comparison has teeth: between rounds the replicas really differ.
    assert not torch.allclose(parity[0]["plain"][4], parity[2]["plain"][4], atol=1e-3)
    assert torch.equal(parity[0]["plain"][-1], parity[2]["plain"][-1])


def test_no_traffic_crosses_replicas_between_rounds(parity: list[dict[str, Any]]) -> None:
    """(b) Collectives on the replicate group only in the warm-up step and at the steps of
    rounds; FSDP's own stay inside the shard group."""
    steps, period, warmup = 8, 3, 1
    rounds = _scheduled(steps, period, warmup)
    for out in parity:
        replicate, shard = out["replicate_ranks"], out["shard_ranks"]
        across = {phase for phase, _, ranks in out["trace"] if ranks == replicate}
        expected = {f"step {i}" for i in range(warmup)} | {f"step {s - 1}" for s in rounds}
        assert across == expected | {"close"}, sorted(across)
        other = {(p, n, g) for p, n, g in out["trace"] if g not in (replicate, shard)}
        assert not other, other
        fsdp = {p for p, n, g in out["trace"] if g == shard}
        assert fsdp == {f"forward-backward {i}" for i in range(steps)}
        sent = [0, *out["plain_sent"]]
        grew = {i for i in range(steps) if sent[i + 1] > sent[i]}
        assert grew == {i for i in range(warmup)} | {s - 1 for s in rounds}


def test_sixteen_bit_deltas_and_overlap_on_shards_match_the_unsharded_wrapper(
    parity: list[dict[str, Any]],
) -> None:
    """(d) bfloat16 deltas (with DiLoCo) within 1e-4 of the unsharded wrapper with the same
    settings (FSDP's reduce-scatter may move a value by one float32 ulp, which can flip a
    bfloat16 rounding of a delta) and within 2e-2 of full precision; overlap_steps=1 within
    1e-5."""
    for r, out in enumerate(parity):
        q, s = divmod(r, 2)
        _assert_history(out["bf16"], out["bf16_reference"], s, 1e-4, f"bf16, rank {r}")
        _assert_history(out["overlap"], out["overlap_reference"], s, 1e-5, f"overlap, rank {r}")
        full = out["manual_bf16"][q]
        _assert_history(out["bf16"], full, s, 2e-2, f"bf16 vs full precision, rank {r}")


def test_fragments_on_shards_average_each_half_at_its_step(
    parity: list[dict[str, Any]],
) -> None:
    """Two fragments at period 4: rounds at steps 2 and 4 of each period (bytes at those steps
    only), replicas apart between them, and identical after close()."""
    for out in parity:
        sent = [0, *out["fragments_sent"]]
        grew = {i + 1 for i in range(len(sent) - 1) if sent[i + 1] > sent[i]}
        assert grew == {2, 4, 6}, (grew, sent)
    assert not torch.equal(parity[0]["fragments"][-2], parity[2]["fragments"][-2])
    for r in (0, 1):  # ranks r and r + 2 hold the same shards, in two replicas
        assert torch.equal(parity[r]["fragments"][-1], parity[r + 2]["fragments"][-1])


def test_state_dict_roundtrip_resumes_exactly(parity: list[dict[str, Any]]) -> None:
    """(e) Saved with a round in flight, DiLoCo and 16-bit anchors: bit for bit."""
    for out in parity:
        assert out["saved"] == [True, True, True]  # a round in flight, outer state, anchors
        assert torch.equal(out["continued"], out["resumed"])


def _refusals() -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = _mesh()
    replicate, shard = mesh["replicate"].get_group(), mesh["shard"].get_group()

    def build(model: nn.Module, group: Any) -> tuple[str, str]:
        base = torch.optim.SGD(model.parameters(), lr=LR)
        return raised(LocalSGDOptimizer, base, model, 2, process_group=group)

    out: dict[str, Any] = {}
    out["hsdp"] = build(_sharded_net(mesh, 0), replicate)
    out["hsdp_no_group"] = build(_sharded_net(mesh, 0), None)
    out["fsdp1"] = build(FullyShardedDataParallel(_net(0), device_id=torch.device("cpu")), None)
    out["no_group"] = build(_sharded_net(mesh["shard"], 0), None)
    out["shard_group"] = build(_sharded_net(mesh["shard"], 0), shard)
    partial = nn.Linear(4, 4)
    local = partial.weight.detach().clone()
    partial.weight = nn.Parameter(DTensor.from_local(local, mesh["shard"], [Partial()]))
    out["partial"] = build(partial, replicate)
    half = _net(0)
    from torch.distributed.fsdp import fully_shard

    fully_shard(half[0], mesh=mesh["shard"])
    out["plain_beside"] = build(half, replicate)
    # The replicas lay the same shapes out differently: caught by the agreement.
    odd = nn.Sequential(nn.Linear(6, 10))
    placement = Shard(1) if _replica() == 1 else Shard(0)
    fully_shard(
        odd, mesh=mesh["shard"], shard_placement_fn=lambda p: placement if p.ndim == 2 else None
    )
    out["mismatch"] = build(odd, replicate)
    # Tensor parallel (Shard(1), and a replicated bias) over the shard dimension is sound:
    # the group is disjoint from the mesh. A round averages the local pieces.
    tp = nn.Linear(6, 4)
    tp.weight = nn.Parameter(distribute_tensor(tp.weight.detach(), mesh["shard"], [Shard(1)]))
    tp.bias = nn.Parameter(distribute_tensor(tp.bias.detach(), mesh["shard"], [Replicate()]))
    opt = LocalSGDOptimizer(torch.optim.SGD(tp.parameters(), lr=LR), tp, 2, process_group=replicate)
    with torch.no_grad():
        for p in tp.parameters():
            p.to_local().add_(rank())
    expected = []
    for p in tp.parameters():
        mean = p.to_local().clone()
        dist.all_reduce(mean, group=replicate)
        expected.append(mean / 2)
    opt.average()
    out["tp"] = [p.to_local().clone() for p in tp.parameters()]
    out["tp_expected"] = expected
    out["tp_shapes"] = [tuple(p.to_local().shape) for p in tp.parameters()]
    return out


def test_refusals_are_raised_on_every_rank_with_the_fix(ranks: Any) -> None:
    """(c) HSDP, FSDP1, no group, the shard group, Partial, a plain parameter beside
    DTensors, replicas laid out differently: refused on every rank, the message naming the
    fix; tensor parallel Shard(1) accepted and averaged piece by piece."""
    results = ranks.run(_refusals, world_size=WORLD, timeout=120)
    fix = "process_group=mesh['replicate'].get_group()"
    for out in results:
        kind, message = out["hsdp"]
        assert kind == "ValueError" and "HSDP" in message and "mesh=mesh['shard']" in message
        assert fix in message
        kind, message = out["hsdp_no_group"]
        assert kind == "ValueError" and "HSDP" in message, message
        kind, message = out["fsdp1"]
        assert kind == "TypeError" and "FSDP1" in message and "fully_shard" in message, message
        kind, message = out["no_group"]
        assert kind == "ValueError" and "process_group=None" in message and fix in message
        kind, message = out["shard_group"]
        assert kind == "ValueError" and "shares ranks" in message and fix in message, message
        kind, message = out["partial"]
        assert kind == "ValueError" and "Partial" in message, message
        kind, message = out["plain_beside"]
        assert kind == "ValueError" and "fully_shard to the root" in message, message
        kind, message = out["mismatch"]
        assert kind == "RuntimeError" and "differ across ranks" in message, message
        assert "Shard(dim=1)" in message, message
    for r, out in enumerate(results):
        assert out["tp_shapes"] == [(4, 3), (4,)]
        for got, want in zip(out["tp"], out["tp_expected"]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        partner = results[(r + 2) % 4]
        for a, b in zip(out["tp"], partner["tp"]):
            assert torch.equal(a, b)


def test_example_under_torchrun() -> None:
    """examples/fsdp2.py as its docstring runs it, on 4 CPU processes, a few DiLoCo steps."""
    args = ["--replicas", "2", "--diloco", "--steps", "12", "--period", "4"]
    args += ["--width", "32", "--blocks", "1", "--log-every", "4"]
    proc = torchrun(ROOT / "examples" / "fsdp2.py", *args, nproc=4, timeout=240, finished="done: ")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(re.findall(r"loss \d+\.\d+", proc.stdout)) == 4, proc.stdout
    done = re.search(
        r"done: 2 replica\(s\) x 2 shard\(s\), DiLoCo, 12 steps, 3 rounds, .*"
        r"bytes across replicas ([\d,]+) \(HSDP: ([\d,]+), ([\d.]+)x more\), .*"
        r"other replicas': yes",
        proc.stdout,
    )
    assert done, proc.stdout
    # A round sends each rank's shards once (plus a small header): 1/period of HSDP's bytes.
    assert 3.9 <= float(done.group(3)) <= 4.0, proc.stdout
