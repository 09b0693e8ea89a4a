"""Checkpoints for Local SGD: one file per rank, written atomically, verified when read.

Between averaging rounds every rank holds its own parameters and optimizer state, so every rank
saves its own file. A checkpoint is a directory ``step-00000120/`` under a root of your choice::

    checkpoints/
        step-00000100/  rank0.pt  rank1.pt  COMPLETE
        step-00000120/  rank0.pt  rank1.pt  COMPLETE

Each ``rankN.pt`` is written to a temporary file in the same directory, flushed, synced and
renamed into place, so a crash never leaves a half-written ``rankN.pt``. Rank 0 writes
``COMPLETE`` (JSON: step, world size, each file's length and SHA-256) only once every rank's file
is on disk, and older complete checkpoints are deleted only after that. Saving again at a step
that has a complete checkpoint writes the new set beside it and swaps it in once complete, so
the old one stays until then. :func:`latest` skips checkpoints without the marker or with a file
of the wrong length; :func:`load` checks the SHA-256 and reads with
``torch.load(..., weights_only=True)``, so a checkpoint from elsewhere cannot run code.
:func:`save` refuses anything that such loading would refuse, before writing. Neither follows a
symbolic link or opens anything but a regular file inside the directory.

The layout of ``state`` this module expects (other keys are saved and loaded as they are)::

    {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),  # a LocalSGDOptimizer's, with its "local_sgd" entry
        "rng": checkpoint.rng_state(),  # optional: per-rank random states
        ...                             # anything else made of tensors and plain containers
    }

Resuming on a different number of ranks is possible when asked for (``load(..., reshard=True)``
or :func:`reshard_state_dicts`); the rule is documented there.

The directory must be on a file system that every rank sees (on several nodes, a shared one).
"""

# The parts, each importing only those below it:
#   saving       save(): validate, write this rank's file, complete the set, prune
#   loading      latest() and load(): find a usable checkpoint, read a file verified
#   reshard      reshard_state_dicts(): average per-rank states for another world size
#   rng          rng_state() and set_rng_state(): random states as tensors and plain containers
#   directories  where save() writes, swapping a re-saved step in, pruning; never via links
#   layout       directory and file names, the COMPLETE marker, which checkpoints are usable
#   files        one file written atomically, regular files opened safely, SHA-256
#   ranks        this call's rank and world size, and exchanging small objects between ranks

from __future__ import annotations

# torch stays an attribute of this package, as it was of the module: callers patch
# ``checkpoint.torch.save`` to simulate a crash while writing.
import torch as torch

# COMPLETE and PathLike were names of the module besides __all__: kept importable.
from local_sgd_optim.checkpoint.layout import COMPLETE as COMPLETE
from local_sgd_optim.checkpoint.layout import PathLike as PathLike
from local_sgd_optim.checkpoint.loading import latest, load
from local_sgd_optim.checkpoint.reshard import reshard_state_dicts
from local_sgd_optim.checkpoint.rng import rng_state, set_rng_state
from local_sgd_optim.checkpoint.saving import save

__all__ = [
    "latest",
    "load",
    "reshard_state_dicts",
    "rng_state",
    "save",
    "set_rng_state",
]
