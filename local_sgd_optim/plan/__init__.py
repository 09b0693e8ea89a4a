"""A cost model for Local SGD against DDP: predicted steps/s, and a period to pick.

The model is deliberately small, a few lines of arithmetic that a user can check by hand:

- One all-reduce of ``S`` bytes over ``N`` ranks is a ring (Patarasuk and Yuan, "Bandwidth
  optimal all-reduce algorithms for clusters of workstations", JPDC 2009): every rank sends and
  receives ``2 (N - 1) / N * S`` bytes, in ``2 (N - 1)`` hops. Its time is
  ``latency_s + 2 (N - 1) * hop_latency_s + 2 (N - 1) / N * S / bandwidth``, where ``latency_s``
  is the fixed cost of launching a collective (about 2 ms for gloo on the 2-core machine of
  ``BENCHMARKS.md``, tens of microseconds for NCCL) and ``bandwidth`` is the link's rate times
  ``bandwidth_efficiency``.
- A round of ``S`` bytes split into buckets of at most ``bucket_cap_mb`` runs one collective per
  bucket: the bandwidth term is paid once, the latency terms once per bucket.
- DDP all-reduces the fp32 gradients every step. Its buckets start during the backward pass, so
  communication hides behind the backward share ``b`` of the compute time ``c``:
  ``step = max(c, (1 - b) * c + T_allreduce)``.
- Local SGD without overlap pays one round every ``period`` steps: ``step = c + T_round / period``.
  16-bit rounds (``comm_bits=16``) send half the bytes.
- Local SGD with ``overlap_steps = k``: a round launched at a period boundary runs while the next
  ``k`` steps compute, and only what is left is waited for:
  ``period * c + max(0, T_round - k * c)`` per period.

Numbers in, numbers out: nothing here imports torch. Run it from the command line to compare
DDP with Local SGD for your own cluster, e.g. a 1B-parameter model on 64 ranks over 10 Gbit/s::

    python -m local_sgd_optim.plan --params 1e9 --ranks 64 --gbps 10 --step-seconds 0.5

``BENCHMARKS.md`` checks the model against measured runs.
"""

# The parts, each importing only those below it:
#   cli     main(): the command line (``__main__`` runs it)
#   table   Prediction and predict(): DDP and the Local SGD variants per period
#   cost    the formulas: all-reduce time, steps/s of DDP and Local SGD, suggest_period()
#   checks  argument checks shared by the above

from __future__ import annotations

from local_sgd_optim.plan.cli import main
from local_sgd_optim.plan.cost import DEFAULT_BACKWARD_SHARE as DEFAULT_BACKWARD_SHARE
from local_sgd_optim.plan.cost import DEFAULT_LATENCY_S as DEFAULT_LATENCY_S
from local_sgd_optim.plan.cost import (
    allreduce_seconds,
    effective_gbps,
    predict_ddp_steps_per_second,
    predict_steps_per_second,
    suggest_period,
)
from local_sgd_optim.plan.table import Prediction, predict

__all__ = [
    "Prediction",
    "allreduce_seconds",
    "effective_gbps",
    "main",
    "predict",
    "predict_ddp_steps_per_second",
    "predict_steps_per_second",
    "suggest_period",
]
