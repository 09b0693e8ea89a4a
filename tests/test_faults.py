"""Faults, for real: a rank killed and restarted by torchrun, a rank that dies or hangs while the
others average, and two "hosts" (network namespaces joined by a veth pair) training together.

Each test launches ``tests/_fault_script.py`` in fresh processes (a few seconds each on a 2-core
machine) and reads the ``RESULT {json}`` line every rank prints at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _common import ROOT, TEARDOWN_ABORT, Launched, launcher_env, torchrun, torchrun_command

SCRIPT = ROOT / "tests" / "_fault_script.py"
# 28 steps, a round every 4 started in the background and applied 1 step later, 16-bit deltas,
# a checkpoint every 5 steps: the checkpoint at step 20 holds a round in flight and the
# full-precision copy, so an exact resume needs all of the optimizer's state.
TRAINING = ["--steps", "28", "--period", "4", "--overlap-steps", "1", "--comm-dtype", "bfloat16"]
TRAINING += ["--checkpoint-every", "5"]


def _env(**extra: str) -> dict[str, str]:
    # torchrun shares its rendezvous store with the workers, and a restarted attempt can read
    # the gloo addresses the previous attempt left there ("Connection refused" in
    # connectFullMesh; pytorch/pytorch#135712, seen here with torch 2.14 and --standalone).
    return launcher_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **extra)


def _results(stdout: str) -> dict[int, dict[str, Any]]:
    """Each rank's ``RESULT`` line (the ranks share stdout: a line may hold two ranks' output)."""
    found = {}
    for match in re.finditer(r"RESULT (\{[^{}]*\})", stdout):
        result = json.loads(match.group(1))
        found[result["rank"]] = result
    return found


def _params(results_dir: Path, rank: int) -> list[float]:
    params: list[float] = json.loads((results_dir / f"rank{rank}.json").read_text())["params"]
    return params


def _run(directory: Path, *args: str, restarts: int = 0) -> Launched:
    """The training run under torchrun on 2 processes, checkpointing to ``directory``; once more
    (from nothing) if torch 2.14's gloo aborted a process at exit after both ranks finished."""
    return torchrun(
        SCRIPT,
        *("--checkpoint-dir", str(directory), "--results-dir", f"{directory}/results"),
        *TRAINING,
        *args,
        launcher_args=("--standalone", "--max-restarts", str(restarts)),
        env=_env(),
        finished=lambda stdout: len(_results(stdout)) == 2,
        before_retry=lambda: shutil.rmtree(directory, ignore_errors=True),
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The uninterrupted run on 2 local processes."""
    directory = tmp_path_factory.mktemp("reference") / "run-ckpt"
    proc = _run(directory)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"uninterrupted run: {proc.seconds:.1f} s")
    results = _results(proc.stdout)
    assert results[0]["sha256"] == results[1]["sha256"]  # the final round makes them equal
    assert results[0]["optimizer_steps"] == 28 and results[0]["start"] == 0
    for rank in (0, 1):
        results[rank]["params"] = _params(directory / "results", rank)
    return results


def test_a_killed_rank_restarts_from_its_checkpoint_bitwise(
    reference: dict[int, dict[str, Any]], tmp_path: Path
) -> None:
    directory = tmp_path / "run-ckpt"
    die = ["--die-at-step", "22", "--die-rank", "1", "--die-how", "kill"]
    proc = _run(directory, *die, restarts=1)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    print(f"run with one SIGKILL and a restart: {proc.seconds:.1f} s")
    assert re.search(r"DYING rank=1 step=22 ", proc.stdout), output
    for rank in (0, 1):  # the restarted attempt resumed from the last complete checkpoint
        assert f"RESUMED rank={rank} step=20 from={directory}/step-00000020" in proc.stdout
    results = _results(proc.stdout)
    for rank in (0, 1):
        assert results[rank]["start"] == 20
        assert results[rank]["sha256"] == reference[rank]["sha256"]
        assert _params(directory / "results", rank) == reference[rank]["params"]  # bit for bit
    complete = sorted(p.parent.name for p in directory.glob("step-*/COMPLETE"))
    assert complete == ["step-00000020", "step-00000025"]


def _wait_all(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    return outputs


def _time_of(pattern: str, text: str) -> float:
    match = re.search(pattern + r" t=(\d+\.\d+)", text)
    assert match, text
    return float(match.group(1))


@pytest.mark.parametrize(
    ("how", "pg_timeout"),
    [("kill", 20.0), ("stop", 8.0)],
    ids=["peer-killed", "peer-hung"],
)
def test_survivor_fails_within_the_timeout_when_a_peer_dies_or_hangs(
    how: str, pg_timeout: float, tmp_path: Path
) -> None:
    """Two plain processes, no launcher to tear the group down: rank 1 is SIGKILLed (or
    SIGSTOPped) at step 6, between checkpoints, while rank 0 goes on into the round at step 8."""
    args = [sys.executable, str(SCRIPT), "--checkpoint-dir", str(tmp_path / "ckpt")]
    args += ["--init-file", str(tmp_path / "store"), "--pg-timeout", str(pg_timeout)]
    args += ["--die-at-step", "6", "--die-rank", "1", "--die-how", how]
    procs = [
        subprocess.Popen(
            args,
            env=_env(RANK=str(rank), WORLD_SIZE="2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for rank in (0, 1)
    ]
    try:
        (out0, err0), *_ = _wait_all(procs[:1], timeout=pg_timeout + 120)
    finally:
        procs[1].send_signal(signal.SIGKILL)  # a stopped process still needs killing
        out1, _ = procs[1].communicate(timeout=30)
    died = _time_of(r"DYING rank=1 step=6 pid=\d+", out1)
    failed = _time_of("ERROR", err0)
    waited = failed - died
    print(f"peer {'SIGSTOPped' if how == 'stop' else 'SIGKILLed'}: survivor raised {waited:.2f} s")
    assert procs[0].returncode != 0 and "RESULT" not in out0, out0 + err0
    assert waited < pg_timeout + 15, err0  # the timeout, plus slack for a loaded machine
    error = err0[err0.index("ERROR t=") :].splitlines()[0]
    if how == "stop":
        assert waited > pg_timeout * 0.8, err0  # it did wait for the hung peer
        assert re.search(r"[Tt]imed out|[Tt]imeout", error), err0
    else:
        assert waited < pg_timeout, err0  # a closed connection is noticed at once
        assert re.search(r"round at step 8|Connection|closed|reset", error), err0


def test_torchrun_ends_the_job_when_a_rank_exits(tmp_path: Path) -> None:
    """With ``--max-restarts 0`` the agent sees rank 1 exit and tears the group down."""
    args = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--pg-timeout", "20"]
    args += ["--die-at-step", "6", "--die-rank", "1", "--die-how", "exit"]
    launcher = ("--standalone", "--max-restarts", "0")
    proc = torchrun(SCRIPT, *args, launcher_args=launcher, env=_env(), retries_on_teardown_abort=0)
    ended = time.time()
    took = ended - _time_of(r"DYING rank=1 step=6 pid=\d+", proc.stdout)
    print(f"rank exited under torchrun: job over {took:.2f} s later")
    assert proc.returncode != 0 and "RESULT" not in proc.stdout, proc.stdout + proc.stderr
    assert took < 20, proc.stderr
    assert "ChildFailedError" in proc.stderr and "exitcode  : 1" in proc.stderr, proc.stderr


# --- two hosts ----------------------------------------------------------------------------


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def test_two_hosts_over_a_veth_pair(reference: dict[int, dict[str, Any]], tmp_path: Path) -> None:
    """``torchrun --nnodes 2``, one node per network namespace, as in DEVELOPERS.md."""
    if shutil.which("ip") is None:
        pytest.skip("needs the `ip` command (iproute2) to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_NET_ADMIN) to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    hosts = [(f"lsgdA{tag}", f"vA{tag}", "10.77.0.1"), (f"lsgdB{tag}", f"vB{tag}", "10.77.0.2")]
    created: list[str] = []
    procs: list[subprocess.Popen[str]] = []
    try:
        for namespace, _, _ in hosts:
            made = _ip("netns", "add", namespace)
            if made.returncode != 0:
                pytest.skip(f"`ip netns add` failed: {made.stderr.strip()}")
            created.append(namespace)
        (a, va, _), (b, vb, _) = hosts
        setup = [("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)]
        for namespace, device, address in hosts:
            setup += [
                ("-n", namespace, "addr", "add", f"{address}/24", "dev", device),
                ("-n", namespace, "link", "set", "lo", "up"),
                ("-n", namespace, "link", "set", device, "up"),
            ]
        for command in setup:
            done = _ip(*command)
            if done.returncode != 0 and command[0] == "link":
                pytest.skip(f"cannot create a veth pair: {done.stderr.strip()}")
            assert done.returncode == 0, f"ip {' '.join(command)}: {done.stderr}"

        directory = tmp_path / "run-ckpt"  # one file system, as a shared one would be
        for node, (namespace, device, _) in enumerate(hosts):
            launcher = ["--nnodes", "2", "--node_rank", str(node)]
            launcher += ["--master_addr", "10.77.0.1", "--master_port", "29533"]
            args = ["--checkpoint-dir", str(directory), "--results-dir", f"{directory}/results"]
            cmd = ["ip", "netns", "exec", namespace]
            cmd += torchrun_command(SCRIPT, *args, *TRAINING, nproc=1, launcher_args=launcher)
            env = _env(GLOO_SOCKET_IFNAME=device)
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        outputs = _wait_all(procs, timeout=240)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for namespace in created:
            _ip("netns", "del", namespace)  # takes the veth pair with it

    results = {}
    for (namespace, _, _), proc, (out, err) in zip(hosts, procs, outputs):
        if proc.returncode != 0 and TEARDOWN_ABORT in err and "RESULT" in out:
            pass  # finished, then aborted at exit (pytorch/pytorch#179291)
        else:
            assert proc.returncode == 0, f"{namespace}:\n{out}\n{err}"
        results.update(_results(out))
    assert sorted(results) == [0, 1]
    assert results[0]["sha256"] == results[1]["sha256"]  # the two hosts agree
    for rank in (0, 1):
        assert results[rank]["optimizer_steps"] == 28
        params = _params(directory / "results", rank)
        assert len(params) == len(reference[rank]["params"])
        assert max(abs(x - y) for x, y in zip(params, reference[rank]["params"])) <= 1e-6
    marker = json.loads((directory / "step-00000025" / "COMPLETE").read_text())
    assert marker["world_size"] == 2 and sorted(marker["files"]) == ["rank0.pt", "rank1.pt"]
