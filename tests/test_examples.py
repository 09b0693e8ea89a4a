"""The README's torchrun command, run for real on 2 CPU processes."""

from __future__ import annotations

import re

from _common import ROOT, torchrun


def test_minimal_example_under_torchrun() -> None:
    proc = torchrun(
        ROOT / "examples" / "train_minimal.py",
        *("--steps", "120", "--period", "4", "--accumulation-steps", "2", "--log-every", "40"),
        timeout=180,
        finished="done: ",
        retries_on_teardown_abort=2,  # a gloo abort at exit: seen in up to 1 of 8 runs here
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, proc.stdout
    summary = re.search(
        r"done: 2 rank\(s\), 120 steps, (\d+) averaging rounds, .*"
        r"test accuracy (\d\.\d+), ranks identical: (\w+)",
        proc.stdout,
    )
    assert summary, proc.stdout
    assert int(summary.group(1)) == 30  # 120 steps / period 4; the final round is not needed
    assert float(summary.group(2)) > 0.5  # chance is 0.1
    assert summary.group(3) == "yes"
