"""Random states as tensors and plain containers: :func:`rng_state` and :func:`set_rng_state`.

``torch.load(weights_only=True)`` refuses NumPy's state and Python's ``random.getstate()`` as
they are; these store and restore torch's, CUDA's, Python's and NumPy's generators in a form a
checkpoint can hold.
"""

from __future__ import annotations

import random
import sys
import warnings
from typing import Any

import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """This process's random states as tensors and plain containers.

    ``torch.load(weights_only=True)`` refuses NumPy's state (it holds an array), and Python's
    ``random.getstate()`` is 625 integers; this stores each as tensors, ints and floats:
    torch's CPU generator, the CUDA generators (when CUDA has been initialised), Python's
    ``random`` and NumPy's global generator (when NumPy has been imported).

    Example::

        >>> state = {"model": model.state_dict(), "rng": checkpoint.rng_state()}
        >>> checkpoint.set_rng_state(state["rng"])
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:  # not imported: nothing in this process has used its generator
        kind, keys, pos, has_gauss, cached_gaussian = numpy.random.get_state(legacy=True)
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(numpy.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random states saved by :func:`rng_state`.

    Args:
        state (dict): what :func:`rng_state` returned (possibly after a save and load).

    Raises:
        ValueError: ``state`` is not such a dict.

    Example::

        >>> saved = checkpoint.rng_state()
        >>> a = torch.rand(3)
        >>> checkpoint.set_rng_state(saved)
        >>> torch.equal(a, torch.rand(3))
        True
    """
    if not isinstance(state, dict) or "torch" not in state or "python" not in state:
        raise ValueError(
            "set_rng_state expects what checkpoint.rng_state() returned, a dict with 'torch' "
            f"and 'python' entries, got {type(state).__name__}"
        )
    torch.set_rng_state(state["torch"])
    python = state["python"]
    internal = tuple(int(x) for x in python["internal"].tolist())
    random.setstate((python["version"], internal, python["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"the saved random states are for {len(cuda)} CUDA device(s), this process sees "
                f"{torch.cuda.device_count()}; CUDA random states not restored",
                stacklevel=2,
            )
    saved_numpy = state.get("numpy")
    if saved_numpy is not None:
        import numpy

        numpy.random.set_state(
            (
                saved_numpy["kind"],
                saved_numpy["keys"].numpy().astype(numpy.uint32),
                saved_numpy["pos"],
                saved_numpy["has_gauss"],
                saved_numpy["cached_gaussian"],
            )
        )
