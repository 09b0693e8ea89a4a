"""The sdist and the wheel install and work in a fresh virtualenv, however pytest was started.

Both are built on a copy of the checkout by calling setuptools' PEP 517 hooks directly (the
installed setuptools builds them, so no network and no ``build`` package are needed). Each goes
into its own new virtualenv, which sees the packages of the environment running the tests (system
Python, a virtualenv or a conda env: a ``.pth`` file lists that environment's site-packages; a
``--system-site-packages`` virtualenv would see the *base* interpreter's instead, without torch
when pytest runs in a virtualenv), and is installed there with ``--no-deps``. A smoke script, run
from a scratch directory so that the checkout cannot shadow the install, imports the package
from the new virtualenv and averages a model on 2 gloo processes (forked, to import torch once).
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SMOKE = r"""
import importlib.metadata as md
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import local_sgd_optim
from local_sgd_optim import LocalSGDOptimizer


def train(rank, init_file, queue):
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    torch.manual_seed(rank)  # different starts: the initial broadcast aligns them
    model = torch.nn.Linear(4, 2)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, period=2)
    def flat():
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    local = []  # this rank's parameters after its own step, before the round
    opt.base_optimizer.register_step_post_hook(lambda *_: local.append(flat()))
    for step in range(2):
        x = torch.full((3, 4), float(rank + step + 1))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = flat()
    # Plain lists: a tensor sent through the queue would need this process alive to be read.
    queue.put((rank, local[-1].tolist(), after.tolist(), opt.averaging_rounds))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    # fork: the children reuse this process's imports (spawning would import torch twice more).
    # No torch op has run yet here, so there is no thread pool to break.
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(), "store")
    procs = [ctx.Process(target=train, args=(r, init_file, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted((queue.get(timeout=120) for _ in procs), key=lambda item: item[0])
    got = [(r, torch.tensor(local), torch.tensor(after), n) for r, local, after, n in got]
    for p in procs:
        p.join(timeout=60)
    package = os.path.dirname(local_sgd_optim.__file__)
    mean = (got[0][1] + got[1][1]) / 2
    print("SMOKE " + json.dumps({
        "file": local_sgd_optim.__file__,
        "prefix": sys.prefix,
        "version": local_sgd_optim.__version__,
        "metadata_version": md.version("local_sgd_optim"),
        "py_typed": os.path.isfile(os.path.join(package, "py.typed")),
        "accelerate_module": os.path.isfile(os.path.join(package, "accelerate.py")),
        # Imported by nothing but an opt-in: `import local_sgd_optim` must not need pytest.
        "pytest_imported": sorted(
            m for m in sys.modules if m == "pytest" or m.startswith("local_sgd_optim.testing")
        ),
        "exit_codes": [p.exitcode for p in procs],
        "rounds": [g[3] for g in got],
        "ranks_differed": float((got[0][1] - got[1][1]).abs().max()),
        "ranks_equal": bool(torch.equal(got[0][2], got[1][2])),
        "vs_mean": float((got[0][2] - mean).abs().max()),
    }))
"""


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _version_in_setup_cfg() -> str:
    """The version setup.cfg points at: the ``__version__`` line of the package's __init__."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["version"] == "attr: local_sgd_optim.__version__"
    lines = (ROOT / "local_sgd_optim" / "__init__.py").read_text().splitlines()
    found = [
        line.split("=", 1)[1].strip().strip("\"'") for line in lines if "__version__ =" in line
    ]
    assert len(found) == 1, "__version__ must be set in exactly one line"
    return found[0]


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "local_sgd_optim"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            ".venv",
            "runs",
            "data",
        ),
    )
    out = tmp_path_factory.mktemp("dist")
    for hook in ("build_sdist", "build_wheel"):  # each in a fresh process, as `build` does
        _run([sys.executable, "-c", _BUILD.format(hook=hook), str(out)], cwd=source)
    return out


# What ``python -m build --no-isolation`` does, without needing ``build``: the backend's hooks.
_BUILD = "import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"


def _running_site_packages() -> list[str]:
    """The site-packages directories of the environment running this test, in import order."""
    known = {*site.getsitepackages(), sysconfig.get_paths()["purelib"]}
    known.add(sysconfig.get_paths()["platlib"])
    if site.ENABLE_USER_SITE:
        known.add(site.getusersitepackages())
    found = []
    for entry in sys.path:
        wanted = entry in known or Path(entry).name in ("site-packages", "dist-packages")
        if entry and wanted and Path(entry).is_dir() and entry not in found:
            found.append(entry)
    return found


def _install_and_smoke(artefact: Path, tmp_path: Path) -> dict[str, Any]:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    # The new environment sees this one's packages (torch, pip, setuptools) after its own, as
    # plain directories: their .pth files, and so the checkout's editable install, stay out.
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = _run([str(venv / "bin" / "python"), "-c", where], tmp_path).stdout.strip()
    (Path(purelib) / "_running_env.pth").write_text("\n".join(_running_site_packages()) + "\n")
    python = venv / "bin" / "python"
    # pip from the running environment, run by the virtualenv's interpreter, installs into it;
    # --ignore-installed keeps it from touching the checkout's own (editable) install.
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
    if artefact.suffix != ".whl":
        install.append("--no-build-isolation")
    _run([*install, str(artefact)], cwd=tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "smoke.py").write_text(_SMOKE)
    proc = _run([str(python), "smoke.py"], cwd=scratch, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SMOKE ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads(lines[0][len("SMOKE ") :])
    result["venv"] = str(venv)
    return result


def test_sdist_contents(dist_dir: Path) -> None:
    (sdist,) = dist_dir.glob("*.tar.gz")
    version = _version_in_setup_cfg()
    assert sdist.name == f"local_sgd_optim-{version}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    expected = {
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "setup.cfg",
        "pyproject.toml",
        "local_sgd_optim/__init__.py",
        "local_sgd_optim/accelerate.py",
        "local_sgd_optim/py.typed",
        "local_sgd_optim/testing/__init__.py",
        "tests/conftest.py",
        "tests/_harness.py",
        "tests/_common.py",
        "tests/test_packaging.py",
        "examples/train_minimal.py",
    }
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_contents(dist_dir: Path) -> None:
    (wheel,) = dist_dir.glob("*.whl")
    version = _version_in_setup_cfg()
    assert wheel.name == f"local_sgd_optim-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"local_sgd_optim-{version}.dist-info/METADATA").decode()
    assert "local_sgd_optim/py.typed" in names
    assert "local_sgd_optim/accelerate.py" in names
    # The pytest plugin ships, and is opt-in: no pytest11 entry point would load it (and torch)
    # into every pytest run of the environment.
    assert {"local_sgd_optim/testing/__init__.py", "local_sgd_optim/testing/__main__.py"} <= names
    with zipfile.ZipFile(wheel) as zf:
        entry_points = [zf.read(n).decode() for n in names if n.endswith("entry_points.txt")]
    assert not [text for text in entry_points if "pytest11" in text]
    assert not [n for n in names if n.startswith(("tests/", "examples/"))]
    assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names)
    assert f"Version: {version}" in metadata.splitlines()
    assert "Provides-Extra: accelerate" in metadata
    # accelerate is an extra, never a hard dependency; torch is the only one.
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in requires if "extra ==" not in r] == ["Requires-Dist: torch>=2.1"]


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installs_into_a_fresh_virtualenv(dist_dir: Path, tmp_path: Path, kind: str) -> None:
    (artefact,) = dist_dir.glob("*.whl" if kind == "wheel" else "*.tar.gz")
    result = _install_and_smoke(artefact, tmp_path)
    # Imported from the virtualenv, not from the checkout or its editable install.
    installed = Path(result["file"]).resolve()
    assert installed.is_relative_to(Path(result["venv"]).resolve()), result
    assert result["version"] == result["metadata_version"] == _version_in_setup_cfg()
    assert result["py_typed"] and result["accelerate_module"]
    assert result["pytest_imported"] == [], result
    assert result["exit_codes"] == [0, 0]
    assert result["rounds"] == [1, 1]
    assert result["ranks_differed"] > 1e-3  # different batches: local steps diverged
    assert result["ranks_equal"]  # the round made them identical
    assert result["vs_mean"] <= 1e-7  # at the mean of the local copies
