"""``local_sgd_optim.checkpoint`` against what goes wrong or is planted: a re-save at a step
that already has a complete checkpoint failing or crashing at any point, a tensor subclass that
``weights_only`` loading would refuse, symbolic links, FIFOs and devices in a checkpoint
directory, and archives that are truncated or corrupted behind a marker that matches them.

Everything that could hang before the fixes runs on the shared worker processes with a timeout,
so a regression fails instead of stalling the suite.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _common import raised, rank
from torch import nn

from local_sgd_optim import checkpoint


def _state(value: float) -> dict[str, Any]:
    return {"model": {"w": torch.full((3,), value)}, "value": value}


def _step_dir(root: Path | str, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _quiet_latest(root: Path | str) -> tuple[int, Path] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return checkpoint.latest(root)


def _quiet_load(path: Path | str, **kwargs: Any) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return checkpoint.load(path, **kwargs)


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links not followed): a file's bytes, a link's target."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[name] = path.read_bytes()
    return found


# --- 6: re-saving a step that already has a complete checkpoint --------------------------


def _failing_resaves(directory: str) -> dict[str, Any]:
    """Save step 4 (the only checkpoint), then save step 4 again twice with rank 1 failing: an
    object ``weights_only`` refuses, then a full disk. Then once more, successfully."""
    checkpoint.save(directory, 4, _state(float(rank())), keep=1)
    dist.barrier()
    found: dict[str, Any] = {}
    state = _state(10.0 + rank())
    if rank() == 1:
        state["args"] = _Custom()
    found["refused"] = raised(checkpoint.save, directory, 4, state, keep=1)
    dist.barrier()
    found["after_refused"] = _found_and_value(directory)
    dist.barrier()

    real_save = torch.save

    def full_disk(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    if rank() == 1:
        torch.save = full_disk  # type: ignore[assignment]
    try:
        found["full_disk"] = raised(checkpoint.save, directory, 4, _state(20.0 + rank()), keep=1)
    finally:
        torch.save = real_save
    dist.barrier()
    found["after_full_disk"] = _found_and_value(directory)
    dist.barrier()
    checkpoint.save(directory, 4, _state(30.0 + rank()), keep=1)
    found["after_success"] = _found_and_value(directory)
    return found


def _found_and_value(directory: str) -> tuple[Any, float | None]:
    found = _quiet_latest(directory)
    if found is None:
        return None, None
    return (found[0], found[1].name), _quiet_load(found[1])["value"]


class _Custom:
    pass


def test_a_failed_resave_keeps_the_complete_checkpoint_of_that_step(
    ranks: Any, tmp_path: Path
) -> None:
    results = ranks.run(_failing_resaves, str(tmp_path), world_size=2, timeout=60)
    for r, found in enumerate(results):
        assert found["refused"][0] == ("TypeError" if r == 1 else "RuntimeError"), found
        assert found["full_disk"][0] == ("OSError" if r == 1 else "RuntimeError"), found
        assert "previous complete checkpoint is still there" in results[0]["full_disk"][1]
        # The checkpoint that was there is still complete, findable and loadable, unchanged.
        assert found["after_refused"] == ((4, "step-00000004"), float(r)), found
        assert found["after_full_disk"] == ((4, "step-00000004"), float(r)), found
        assert found["after_success"] == ((4, "step-00000004"), 30.0 + r), found
    # The successful save left nothing behind: no staging directory, no copy of the old one.
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000004"]
    assert sorted(p.name for p in _step_dir(tmp_path, 4).iterdir()) == [
        "COMPLETE",
        "rank0.pt",
        "rank1.pt",
    ]


class _Crash(BaseException):
    """Stands for the process dying: nothing in the code under test catches it."""


@pytest.fixture
def filesystem_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Callable[[str], None]]]:
    """Calls each hook in the returned list before and after every destructive file system call
    (unlink, rmdir, rename, replace; shutil.rmtree goes through them), with the call's name."""
    hooks: list[Callable[[str], None]] = []
    for name in ("unlink", "remove", "rmdir", "rename", "replace"):
        real = getattr(os, name)

        def wrapped(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            for hook in list(hooks):
                hook(f"before {_name}")
            result = _real(*args, **kwargs)
            for hook in list(hooks):
                hook(f"after {_name}")
            return result

        monkeypatch.setattr(os, name, wrapped)
    yield hooks


def test_a_crash_at_any_point_of_a_resave_leaves_a_complete_checkpoint(
    tmp_path: Path, filesystem_calls: list[Callable[[str], None]]
) -> None:
    """Step 7 is the only checkpoint. Its re-save is interrupted at each destructive file
    system call in turn; at every such instant, and after the crash, ``latest()`` finds a
    complete step 7 that loads (the old values or the new). The next save cleans up."""
    crashed_at = 0
    while True:
        root = tmp_path / f"crash-{crashed_at}"
        checkpoint.save(root, 7, _state(1.0), keep=1)
        seen: list[str] = []

        def check(
            event: str, root: Path = root, seen: list[str] = seen, at: int = crashed_at
        ) -> None:
            found = _quiet_latest(root)
            assert found is not None and found[0] == 7, f"no complete step 7 {event}: {seen}"
            assert _quiet_load(found[1])["value"] in (1.0, 2.0), event
            seen.append(event)
            if len([e for e in seen if e.startswith("before")]) == at + 1:
                raise _Crash(event)

        filesystem_calls.append(check)
        try:
            checkpoint.save(root, 7, _state(2.0), keep=1)
        except _Crash:
            pass
        else:
            break  # no call left to crash at: every instant was checked
        finally:
            filesystem_calls.clear()
        assert _quiet_load(root)["value"] in (1.0, 2.0)
        # Restarted, the run saves again: complete, and nothing left over.
        filesystem_calls.append(lambda event, root=root: _check_step_7(root, event))
        checkpoint.save(root, 7, _state(3.0), keep=1)
        filesystem_calls.clear()
        assert _quiet_load(root)["value"] == 3.0
        assert [p.name for p in root.iterdir()] == ["step-00000007"], crashed_at
        crashed_at += 1
    assert crashed_at >= 3  # the re-save makes at least that many destructive calls
    assert [p.name for p in root.iterdir()] == ["step-00000007"]
    assert checkpoint.load(root)["value"] == 2.0


def test_resaving_without_a_process_group_swaps_in_once_every_rank_saved(
    tmp_path: Path,
) -> None:
    for r in range(2):
        checkpoint.save(tmp_path, 3, _state(r), rank=r, world_size=2)
    checkpoint.save(tmp_path, 3, _state(10.0), rank=0, world_size=2)  # rank 1 never does
    assert checkpoint.latest(tmp_path) == (3, _step_dir(tmp_path, 3))
    assert [checkpoint.load(tmp_path, rank=r, world_size=2)["value"] for r in (0, 1)] == [0, 1]
    for r in range(2):
        checkpoint.save(tmp_path, 3, _state(20.0 + r), rank=r, world_size=2)
    assert [checkpoint.load(tmp_path, rank=r, world_size=2)["value"] for r in (0, 1)] == [20, 21]
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]


def _check_step_7(root: Path, event: str) -> None:
    found = _quiet_latest(root)
    assert found is not None and found[0] == 7, f"no complete step 7 {event}"


# --- 7: what save writes, load reads ------------------------------------------------------


class _ScaledTensor(torch.Tensor):
    """A tensor subclass, as quantisation and FP8 libraries put in a model's buffers."""


def test_a_tensor_subclass_is_refused_before_anything_is_written_or_pruned(
    tmp_path: Path,
) -> None:
    model = nn.Linear(2, 2)
    checkpoint.save(tmp_path, 1, {"model": model.state_dict()}, keep=1)
    model.register_buffer("scale", torch.ones(2).as_subclass(_ScaledTensor))
    with pytest.raises(TypeError) as refused:
        checkpoint.save(tmp_path, 2, {"model": model.state_dict()}, keep=1)
    message = str(refused.value)
    assert "state['model']['scale'] is a tensor of subclass" in message
    assert "_ScaledTensor" in message and "plain tensor" in message
    assert "add_safe_globals" in message
    # Nothing was written, nothing pruned: step 1 is still the newest and loads.
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    assert checkpoint.latest(tmp_path) == (1, _step_dir(tmp_path, 1))
    assert set(checkpoint.load(tmp_path)["model"]) == {"weight", "bias"}

    # A tensor carrying an attribute weights_only loading refuses is refused too.
    tagged = torch.ones(2)
    tagged.origin = _Custom()  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"state\['t'\]\.origin is a .*_Custom"):
        checkpoint.save(tmp_path, 2, {"t": tagged}, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]

    # What loads is saved: a Parameter, a tensor with a plain attribute, and a subclass
    # allowed for weights_only loading (then it must be allowed when loading too).
    plain = torch.ones(2)
    plain.note = 3  # type: ignore[attr-defined]
    state = {"p": nn.Parameter(torch.ones(2)), "t": plain, "q": torch.zeros(2).to(torch.int8)}
    checkpoint.save(tmp_path, 2, state, keep=1)
    loaded = checkpoint.load(tmp_path)
    assert type(loaded["p"]) is nn.Parameter and loaded["t"].note == 3
    with torch.serialization.safe_globals([_ScaledTensor]):
        checkpoint.save(tmp_path, 3, {"model": model.state_dict()}, keep=1)
        assert type(checkpoint.load(tmp_path)["model"]["scale"]) is _ScaledTensor
    with pytest.raises(ValueError, match="other than tensors and plain containers"):
        checkpoint.load(tmp_path)


# --- 8: symbolic links, FIFOs and devices in a checkpoint directory -----------------------


def _write_marker(path: Path, world_size: int, files: dict[str, bytes]) -> None:
    marker = {
        "format": 1,
        "step": int(path.name.split("-")[1]),
        "world_size": world_size,
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        },
    }
    (path / "COMPLETE").write_text(json.dumps(marker))


def _craft(root: Path, outside: Path) -> None:
    """Step 1 a real checkpoint of 2 ranks; steps 2 to 6 planted, each newer than it."""
    for r in range(2):
        checkpoint.save(root, 1, _state(1.0 + r), rank=r, world_size=2)
        checkpoint.save(outside, 9, _state(9.0 + r), rank=r, world_size=2)
    elsewhere = _step_dir(outside, 9)
    empty = {"rank0.pt": b"", "rank1.pt": b""}
    # 2: rank files a link to /dev/zero and a FIFO, the marker recording 0 bytes for each.
    two = _step_dir(root, 2)
    two.mkdir()
    os.symlink("/dev/zero", two / "rank0.pt")
    os.mkfifo(two / "rank1.pt")
    _write_marker(two, 2, empty)
    # 3: the marker a FIFO.
    three = _step_dir(root, 3)
    three.mkdir()
    os.mkfifo(three / "COMPLETE")
    # 4: rank files that are links to a real checkpoint elsewhere, with a matching marker.
    four = _step_dir(root, 4)
    four.mkdir()
    for r in range(2):
        os.symlink(elsewhere / f"rank{r}.pt", four / f"rank{r}.pt")
    shutil.copy(elsewhere / "COMPLETE", four / "COMPLETE")
    # 5: real rank files, the marker a link to a matching one elsewhere.
    five = _step_dir(root, 5)
    five.mkdir()
    for r in range(2):
        shutil.copy(elsewhere / f"rank{r}.pt", five / f"rank{r}.pt")
    os.symlink(elsewhere / "COMPLETE", five / "COMPLETE")
    # 6: the step directory itself a link to the checkpoint elsewhere.
    os.symlink(elsewhere, _step_dir(root, 6))


def _load_crafted(root: str) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = checkpoint.latest(root)
        value = checkpoint.load(root)["value"]
    result: dict[str, Any] = {
        "latest": None if found is None else (found[0], found[1].name),
        "value": value,
        "warnings": [str(w.message) for w in caught],
    }
    for step in (2, 3, 4, 5):
        result[step] = raised(checkpoint.load, _step_dir(root, step))
    return result


def test_a_crafted_checkpoint_directory_cannot_hang_load_or_lead_it_outside(
    ranks: Any, tmp_path: Path
) -> None:
    root, outside = tmp_path / "ckpt", tmp_path / "outside"
    _craft(root, outside)
    before = _tree(outside)
    # Each rank reads its own file: rank 0 the link to /dev/zero, rank 1 the FIFO.
    results = ranks.run(_load_crafted, str(root), world_size=2, timeout=30)
    for r, result in enumerate(results):
        assert result["latest"] == (1, "step-00000001") and result["value"] == 1.0 + r
        skipped = "\n".join(result["warnings"])
        for step in (2, 3, 4, 5, 6):
            assert str(_step_dir(root, step)) in skipped, (step, skipped)
        assert "symbolic link" in skipped and "FIFO" in skipped
        previous = f"The previous checkpoint {_step_dir(root, 1)} is still there"
        file = _step_dir(root, 2) / f"rank{r}.pt"
        assert result[2][0] == "ValueError", result[2]
        assert f"checkpoint file {file} is " in result[2][1] and previous in result[2][1]
        assert ("symbolic link" if r == 0 else "FIFO") in result[2][1]
        assert result[3][0] == "ValueError" and "FIFO" in result[3][1], result[3]
        assert result[4][0] == "ValueError" and "symbolic link" in result[4][1], result[4]
        assert result[5][0] == "ValueError" and "symbolic link" in result[5][1], result[5]
    assert _tree(outside) == before


def test_save_refuses_to_write_or_delete_through_planted_links(tmp_path: Path) -> None:
    root, victim = tmp_path / "ckpt", tmp_path / "victim"
    for step in (1, 2):
        checkpoint.save(victim, step, _state(float(step)), keep=None)
    (_step_dir(victim, 2) / ".rank0.pt.tmp123").write_bytes(b"not ours")
    before = _tree(victim)

    root.mkdir()
    os.symlink(_step_dir(victim, 2), _step_dir(root, 2))
    with pytest.raises(ValueError) as refused:
        checkpoint.save(root, 2, _state(5.0))
    assert f"{_step_dir(root, 2)} is a symbolic link" in str(refused.value)
    assert _tree(victim) == before

    # Planted links are neither pruned nor read; the real checkpoints are.
    os.symlink(_step_dir(victim, 1), _step_dir(root, 1))
    for step in (3, 4):
        checkpoint.save(root, step, _state(float(step)), keep=1)
    assert sorted(p.name for p in root.iterdir()) == [
        "step-00000001",
        "step-00000002",
        "step-00000004",
    ]
    assert _tree(victim) == before
    os.symlink(_step_dir(victim, 2), _step_dir(root, 9))
    with pytest.warns(UserWarning, match=f"{_step_dir(root, 9)} is a symbolic link"):
        assert checkpoint.latest(root) == (4, _step_dir(root, 4))

    # Re-saving step 4 writes beside it first: a link planted there is refused too.
    os.symlink(_step_dir(victim, 1), root / ".step-00000004.saving")
    with pytest.raises(ValueError, match=r"\.step-00000004\.saving is a symbolic link"):
        checkpoint.save(root, 4, _state(6.0), keep=1)
    assert _tree(victim) == before
    assert _quiet_load(root)["value"] == 4.0


# --- 10: truncated and corrupted archives behind a matching marker ------------------------


def test_a_truncated_or_corrupted_archive_is_a_value_error_naming_the_file(
    tmp_path: Path,
) -> None:
    """The marker matches the file (rewritten by a tool, or the bytes went bad before they
    were hashed): ``torch.load`` itself fails, with a RuntimeError, EOFError or other."""
    checkpoint.save(tmp_path, 1, _state(1.0))
    checkpoint.save(tmp_path, 2, _state(2.0))
    two = _step_dir(tmp_path, 2)
    file = two / "rank0.pt"
    data = file.read_bytes()
    previous = f"The previous checkpoint {_step_dir(tmp_path, 1)} is still there"
    for length in (0, 3, 10, 100, len(data) // 2, len(data) - 10):
        file.write_bytes(data[:length])
        _write_marker(two, 1, {"rank0.pt": data[:length]})
        for where in (tmp_path, two):
            with pytest.raises(ValueError) as broken:
                checkpoint.load(where)
            message = str(broken.value)
            assert f"checkpoint file {file} is truncated or corrupted" in message, length
            assert previous in message, length
    garbage = b"PK\x03\x04" + bytes(range(256)) * 4
    file.write_bytes(garbage)
    _write_marker(two, 1, {"rank0.pt": garbage})
    with pytest.raises(ValueError, match=f"checkpoint file {file} is truncated or corrupted"):
        checkpoint.load(two)

    # A failure that is not the file's (here, map_location's) is not reported as corruption.
    file.write_bytes(data)
    _write_marker(two, 1, {"rank0.pt": data})

    def refuse(storage: Any, location: str) -> Any:
        raise ZeroDivisionError("not the file's fault")

    with pytest.raises(ZeroDivisionError):
        checkpoint.load(two, map_location=refuse)
    assert checkpoint.load(two)["value"] == 2.0
