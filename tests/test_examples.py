"""The README's torchrun command, run for real on 2 CPU processes."""

from __future__ import annotations

import re
import subprocess
import sys

from _common import ROOT, TEARDOWN_ABORT, launcher_env


def test_minimal_example_under_torchrun() -> None:
    env = launcher_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "examples" / "train_minimal.py"),
        "--steps",
        "120",
        "--period",
        "4",
        "--accumulation-steps",
        "2",
        "--log-every",
        "40",
    ]
    for _ in range(3):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
        # torch 2.14's gloo can abort a finished process at interpreter exit, after the script
        # has completed (pytorch/pytorch#179291); seen in up to 1 of 8 runs here under load. Run
        # again then: the assertions below still need a clean exit from one run.
        if proc.returncode == 0 or not (TEARDOWN_ABORT in proc.stderr and "done: " in proc.stdout):
            break
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
