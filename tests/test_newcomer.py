"""What a newcomer trips over: a forgotten ``close()``, counters read alone, where errors live."""

from __future__ import annotations

import gc
import logging
import pickle
import subprocess
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
from _common import ROOT
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
