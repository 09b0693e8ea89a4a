"""What a newcomer trips over: a forgotten ``close()``, what ``close()`` leaves behind, counters
read alone, where errors live."""

from __future__ import annotations

import gc
import io
import logging
import pickle
import subprocess
import sys
import types
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _common import ROOT, launcher_env
from torch import nn

import local_sgd_optim
from local_sgd_optim import LocalSGDOptimizer, RoundError


def _wrapper(period: int = 4) -> tuple[nn.Module, LocalSGDOptimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return model, LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, period)


def _train(model: nn.Module, opt: LocalSGDOptimizer, steps: int) -> None:
    data = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    for _ in range(steps):
        model(torch.randn(8, 4, generator=data)).sum().backward()
        opt.step()
        opt.zero_grad()


def _unclosed_warnings(steps: int, close: bool) -> dict[str, Any]:
    """In a rank: train ``steps``, maybe close, drop the wrapper; what was warned and logged."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("local_sgd_optim").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, opt = _wrapper(period=4)
            _train(model, opt, steps)
            if close:
                opt.close()
            del opt
            gc.collect()
    finally:
        logging.getLogger("local_sgd_optim").removeHandler(handler)
    return {
        "warned": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "logged": [r for r in records if "not closed" in r],
    }


def test_forgotten_close_warns_on_every_rank(ranks: Any) -> None:
    # 6 steps with period 4: steps 5 and 6 were never averaged.
    for rank, result in enumerate(ranks.run(_unclosed_warnings, 6, False)):
        assert len(result["warned"]) == 1, result
        message = result["warned"][0]
        assert f"rank {rank} was not closed" in message and "last 2 optimizer" in message
        assert "opt.close()" in message and "with opt:" in message
        assert result["logged"] == [message]


def test_no_warning_after_close_or_right_after_a_round(ranks: Any) -> None:
    closed = ranks.run(_unclosed_warnings, 6, True)
    at_round = ranks.run(_unclosed_warnings, 8, False)  # nothing left to average
    for result in closed + at_round:
        assert result == {"warned": [], "logged": []}


def test_forgotten_close_warns_at_interpreter_exit(tmp_path: Any) -> None:
    script = tmp_path / "forgot.py"
    # The watch alone, on an object alive at exit, as a wrapper of a 2-rank job would be.
    script.write_text(
        "import torch\n"
        "from torch import nn\n"
        "from local_sgd_optim.arguments import Ownership\n"
        "from local_sgd_optim.clock import Clock\n"
        "from local_sgd_optim.unclosed import watch_for_unclosed\n"
        "class Wrapper: pass\n"
        "keep = Wrapper()\n"
        "clock = Clock(period=4, accumulation_steps=1, overlap_steps=0, warmup_steps=0)\n"
        "clock.optimizer_steps = 3\n"
        "watch_for_unclosed(keep, clock, Ownership(), rank=1)\n"
        "print('end of script', flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "always", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "end of script" in proc.stdout
    assert "rank 1 was not closed: its last 3 optimizer step(s)" in proc.stderr, proc.stderr


_WATCHED = """
import gc
from local_sgd_optim.arguments import Ownership
from local_sgd_optim.clock import Clock
from local_sgd_optim.unclosed import watch_for_unclosed

class Wrapper:
    pass

def watched(rank):
    # The watch alone, on an object that stepped 3 times with period 4 and was never closed.
    wrapper = Wrapper()
    clock = Clock(period=4, accumulation_steps=1, overlap_steps=0, warmup_steps=0)
    clock.optimizer_steps = 3
    watch_for_unclosed(wrapper, clock, Ownership(), rank=rank)
    return wrapper
"""


def _not_closed(rank: int) -> str:
    return (
        f"LocalSGDOptimizer on rank {rank} was not closed: its last 3 optimizer step(s) (of 3) "
        "were never averaged, so this rank's model differs from the other ranks'. Call "
        "opt.close() on every rank when training ends, or train inside `with opt:`"
    )


def test_forgotten_close_under_python_warnings_as_errors(tmp_path: Any) -> None:
    script = tmp_path / "forgot.py"
    script.write_text(
        _WATCHED
        + "dropped = watched(0)\n"
        + "del dropped\n"
        + "gc.collect()\n"
        + "print('after the collection', flush=True)\n"
        + "kept = watched(1)\n"
        + "print('end of script', flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=launcher_env(),
    )
    # The warning cannot stop the script from a finalizer: it goes on, and exits with 0.
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["after the collection", "end of script"], proc.stdout
    lines = proc.stderr.splitlines()
    for rank in (0, 1):
        # On a line of its own (the log line), and as the error Python reports it.
        assert _not_closed(rank) in lines, proc.stderr
        assert f"RuntimeWarning: {_not_closed(rank)}" in lines, proc.stderr
    assert "Exception ignored in: <finalize object" in proc.stderr


@pytest.mark.parametrize("config", ["-W error", "filterwarnings = error"])
def test_forgotten_close_under_pytest_warnings_as_errors(tmp_path: Any, config: str) -> None:
    (tmp_path / "test_user.py").write_text(
        _WATCHED
        + "KEPT = []\n"
        + "def test_dropped():\n"
        + "    wrapper = watched(0)\n"
        + "    del wrapper\n"
        + "    gc.collect()\n"
        + "def test_kept_until_exit():\n"
        + "    KEPT.append(watched(1))\n"
    )
    ini = "[pytest]\n" + ("filterwarnings =\n    error\n" if config.startswith("filter") else "")
    (tmp_path / "pytest.ini").write_text(ini)
    flags = config.split() if config.startswith("-W") else []
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *flags, "test_user.py"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=launcher_env(),
    )
    out = proc.stdout + proc.stderr
    # The test during which the wrapper was collected fails, naming the message; the one that
    # leaves it to the exit passes, and the exit still warns (pytest's filters apply to tests).
    assert proc.returncode == 1, out
    assert "1 failed, 1 passed" in out, out
    assert "FAILED test_user.py::test_dropped - pytest.PytestUnraisableExceptionWarning" in out
    assert f"RuntimeWarning: {_not_closed(0)}" in out, out
    assert _not_closed(1) in proc.stderr.splitlines(), out


def test_alone_no_round_communicates() -> None:
    model, opt = _wrapper(period=2)
    with opt:
        _train(model, opt, 8)
    assert opt.averaging_rounds == 4  # the schedule's rounds: free with one rank
    assert opt.stats.rounds == 0 and opt.stats.bytes_communicated == 0


def test_minimal_example_alone_reports_no_rounds() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_minimal.py"), "--steps", "16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "done: 1 rank(s), 16 steps, 0 averaging rounds, 0.00 MiB sent per rank" in proc.stdout


def test_round_error_is_named_where_it_is_imported_from() -> None:
    assert RoundError.__module__ == "local_sgd_optim"
    assert f"{RoundError.__module__}.{RoundError.__qualname__}" == "local_sgd_optim.RoundError"
    assert local_sgd_optim.RoundError is RoundError
    copy = pickle.loads(pickle.dumps(RoundError("ranks out of step")))
    assert type(copy) is RoundError and str(copy) == "ranks out of step"


# --- what close() leaves behind ----------------------------------------------------------------


def _outer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def _release_settings(name: str) -> dict[str, Any]:
    settings: dict[str, dict[str, Any]] = {
        "full precision": {},
        "bucket view": {"parameters_as_bucket_view": True},
        "bfloat16 deltas, outer": {"comm_dtype": torch.bfloat16, "outer_optimizer": _outer},
        "in flight at close, float16": {"overlap_steps": 2, "comm_dtype": torch.float16},
        "warm-up": {"warmup_steps": 3},
        "int8 deltas": {"comm_dtype": "int8"},
        "in flight at close, int4": {"overlap_steps": 2, "comm_dtype": "int4"},
        "fragments, bfloat16": {"fragments": 2, "comm_dtype": torch.bfloat16},
    }
    if name == "two-level, bfloat16":  # a subgroup of both ranks: a second averager
        local, _ = dist.new_subgroups(group_size=2)
        return {"local_period": 2, "local_group": local, "comm_dtype": torch.bfloat16}
    return settings[name]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.bn(self.fc(x))))


def _steps(model: nn.Module, opt: LocalSGDOptimizer, first: int, last: int) -> None:
    for step in range(first, last):  # the same batches whichever wrapper takes step `step`
        data = torch.Generator().manual_seed(1000 * dist.get_rank() + step)
        model(torch.randn(8, 6, generator=data)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _built(name: str, **extra: Any) -> tuple[nn.Module, LocalSGDOptimizer]:
    model = _Net()
    base = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, LocalSGDOptimizer(base, model, 4, **_release_settings(name), **extra)


def _reachable(*roots: object) -> tuple[dict[int, int], int]:
    """The storages (data pointer: bytes) of every tensor reachable from ``roots`` through
    containers, instances, closures and bound methods (not modules, classes or globals), and
    how many gloo work handles are among them."""
    storages: dict[int, int] = {}
    works = 0
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, str, bytes)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dist.Work):
            works += 1
        if isinstance(obj, types.FunctionType):
            stack.extend(cell.cell_contents for cell in obj.__closure__ or ())
        elif not isinstance(obj, types.BuiltinFunctionType):
            stack.extend(gc.get_referents(obj))
    return storages, works


def _held(opt: LocalSGDOptimizer) -> tuple[int, int]:
    """Bytes of the tensors the wrapper holds beyond the model's, the base optimizer's, the
    anchors for 16-bit deltas and the outer optimizer's (what state_dict() reads); and the
    gloo work handles it holds."""
    storages, works = _reachable(opt)
    rounds = opt._rounds
    anchors = [
        a
        for averager in (rounds.averager, rounds.local_averager)
        if averager is not None
        for a in averager.anchor_tensors()
    ]
    kept, _ = _reachable(opt.model, opt.base_optimizer, rounds.outer, anchors)
    return sum(n for ptr, n in storages.items() if ptr not in kept), works


def _workspace_beyond_anchors(opt: LocalSGDOptimizer) -> int:
    total = 0
    for averager in (opt._rounds.averager, opt._rounds.local_averager):
        if averager is not None:
            anchors = sum(a.untyped_storage().nbytes() for a in averager.anchor_tensors())
            total += averager.workspace_bytes - anchors
    return total


def _state(model: nn.Module, opt: LocalSGDOptimizer) -> torch.Tensor:
    values = [v.detach().reshape(-1).double() for v in model.state_dict().values()]
    moments = [s["exp_avg"].reshape(-1).double() for s in opt.base_optimizer.state.values()]
    return torch.cat(values + moments)


def _close_releases(name: str) -> dict[str, Any]:
    """Train 9 steps (period 4: a round in flight at close with overlap_steps=2), close; what
    is held before and after; then continue 7 steps from state_dict() after close(), in a new
    wrapper and in the closed one reopened by load_state_dict, against a run that calls
    average() where the others close."""
    model, opt = _built(name)
    _steps(model, opt, 0, 9)
    held_before, works_before = _held(opt)
    in_flight_before = opt._rounds.in_flight
    before_close = (io.BytesIO(), {k: v.clone() for k, v in model.state_dict().items()})
    torch.save(opt.state_dict(), before_close[0])  # with overlap: a round in flight
    opt.close()
    held_after, works_after = _held(opt)
    workspace = _workspace_beyond_anchors(opt)
    pending = [a.pending for a in (opt._rounds.averager, opt._rounds.local_averager) if a]
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)  # after close(): still everything a resume needs
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    with opt.global_model() as inside:
        global_model = inside is model and all(
            torch.equal(v, model_state[k]) for k, v in inside.state_dict().items()
        )

    def loaded() -> dict[str, Any]:
        return torch.load(io.BytesIO(saved.getvalue()), weights_only=True)  # type: ignore[no-any-return]

    resumed_model, resumed = _built(name, broadcast_initial=False)
    resumed_model.load_state_dict(model_state)
    resumed.load_state_dict(loaded())
    _steps(resumed_model, resumed, 9, 16)
    resumed.close()

    # The checkpoint taken before close(), a round in flight in it with overlap, loaded into
    # the closed wrapper: it continues as if close() had never run.
    model.load_state_dict(before_close[1])
    opt.load_state_dict(torch.load(io.BytesIO(before_close[0].getvalue()), weights_only=True))
    _steps(model, opt, 9, 16)
    opt.close()
    back_before_close = _state(model, opt)

    model.load_state_dict(model_state)
    opt.load_state_dict(loaded())  # reopens the closed wrapper: it re-plans at its next round
    _steps(model, opt, 9, 16)
    opt.close()

    reference_model, reference = _built(name)
    _steps(reference_model, reference, 0, 16)
    reference.close()
    uninterrupted = _state(reference_model, reference)
    reference_model, reference = _built(name)
    _steps(reference_model, reference, 0, 9)
    reference.average()
    _steps(reference_model, reference, 9, 16)
    reference.close()
    expected = _state(reference_model, reference)
    return {
        "held before": held_before,
        "works before": works_before,
        "in flight before": in_flight_before,
        "held after": held_after,
        "works after": works_after,
        "workspace after": workspace,
        "pending after": pending,
        "global model": global_model,
        "resumed exactly": torch.equal(_state(resumed_model, resumed), expected),
        "reopened exactly": torch.equal(_state(model, opt), expected),
        "reopened before close exactly": torch.equal(back_before_close, uninterrupted),
        "reopened rounds": opt.stats.rounds == reference.stats.rounds,
    }


@pytest.mark.parametrize(
    "name",
    [
        "full precision",
        "bucket view",
        "bfloat16 deltas, outer",
        "in flight at close, float16",
        "warm-up",
        "two-level, bfloat16",
        "int8 deltas",
        "in flight at close, int4",
        "fragments, bfloat16",
    ],
)
def test_close_releases_buffers_and_work(ranks: Any, name: str) -> None:
    for result in ranks.run(_close_releases, name):
        # Before close() the wrapper holds buffers of its own (the test sees them); in bucket
        # view it holds none, and what it must let go at close() is the bucket storage the
        # parameters leave then (908 bytes here, counted as held if the averager keeps it).
        assert (result["held before"] == 0) == (name == "bucket view"), result
        if name.startswith("in flight"):
            assert result["in flight before"] and result["works before"] > 0, result
        # ... and afterwards nothing but what state_dict() reads: no buffer, no work handle.
        assert result["held after"] == 0 and result["works after"] == 0, result
        assert result["workspace after"] == 0 and not any(result["pending after"]), result
        assert result["global model"], result
        # state_dict() after close() resumes exactly, in a new wrapper or the reopened one.
        assert result["resumed exactly"] and result["reopened exactly"], result
        assert result["reopened before close exactly"], result
        assert result["reopened rounds"], result
