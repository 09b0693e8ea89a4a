"""Benchmark 1b: where an averaging round's time goes, pass by pass, against the floor.

For parameters placed in bucket storage (``parameters_as_bucket_view=True``), a
full-precision round is: the header (one read of the parameters for NaN and the fingerprint,
then one small all-reduce), one in-place all-reduce per bucket, one division. A round with
bf16 deltas adds: the delta (parameters minus anchor), the cast to bf16, the cast back, the
anchor update and the copy into the parameters. This script times each of those passes on its
own (every rank runs the same, between barriers) next to the floor, a single all-reduce of a
flat fp32 buffer of the same size, and the whole round, so that the table shows which pass is
left above the floor and what it costs. Run on 2 ranks::

    torchrun --standalone --nproc_per_node 2 benchmarks/round_profile.py
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import _common  # noqa: E402

from local_sgd_optim.comm.averager import BucketedAverager  # noqa: E402
from local_sgd_optim.comm.resident import Residence  # noqa: E402
from local_sgd_optim.comm.tensors import finite_and_fingerprint  # noqa: E402


def passes(name: str) -> dict[str, Callable[[], object]]:
    """Every pass of a round, each runnable on its own, plus the rounds and the floor."""
    torch.manual_seed(0)
    model = _common.MODELS[name]()
    params = [p for p in model.parameters() if p.requires_grad]
    Residence(params, list(model.parameters()))
    full = BucketedAverager(params, None)
    spans = [b.span for b in full.buckets if b.span is not None]
    assert len(spans) == len(full.buckets), "parameters were not placed in bucket storage"
    world = dist.get_world_size()
    header = torch.zeros(6 * world, dtype=torch.int64)

    torch.manual_seed(0)
    twin = _common.MODELS[name]()
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    Residence(twin_params, list(twin.parameters()))
    delta = BucketedAverager(twin_params, None, comm_dtype=torch.bfloat16)
    delta.set_anchor_from_tensors()
    b = delta.buckets[0]
    assert b.span is not None and b.scratch is not None and b.anchor is not None
    span, scratch, anchor, wire = b.span, b.scratch, b.anchor, b.wire
    numel = sum(s.numel() for s in spans)
    flat = torch.zeros(numel)
    bf16 = torch.zeros(numel, dtype=torch.bfloat16)

    def all_reduce_spans() -> None:
        works = [dist.all_reduce(s, async_op=True) for s in spans]
        for work in works:
            assert work is not None
            work.wait()

    return {
        "floor: all-reduce of a flat fp32 buffer": lambda: dist.all_reduce(flat),
        "fp32 round, in place (whole)": full.average,
        "  header: read for NaN and fingerprint": lambda: finite_and_fingerprint(spans),
        "  header: its small all-reduce": lambda: dist.all_reduce(header),
        "  payload: in-place all-reduce per bucket": all_reduce_spans,
        "  division": lambda: [s.div_(world) for s in spans],
        "bf16 round, in place (whole)": delta.average,
        "  payload: all-reduce of the bf16 deltas": lambda: dist.all_reduce(bf16),
        "  delta: parameters minus anchor (one bucket)": lambda: torch.sub(
            span, anchor, out=scratch
        ),
        "  cast to bf16 (one bucket)": lambda: wire.copy_(scratch),
        "  cast back (one bucket)": lambda: scratch.copy_(wire),
        "  anchor += mean delta (one bucket)": lambda: anchor.add_(scratch, alpha=0.5),
        "  copy into parameters (one bucket)": lambda: span.copy_(anchor),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,mlp")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--link", default="loopback, uncapped", help="for the table's title")
    args = parser.parse_args()
    rank, world = _common.init_distributed()
    rows: list[list[object]] = []
    for name in args.models.split(","):
        methods = passes(name)
        for fn in methods.values():
            fn()
        times: dict[str, list[float]] = {n: [] for n in methods}
        for _ in range(args.repeats):
            for n, fn in methods.items():
                times[n].append(_common.timed(fn, args.rounds))
        floor = _common.median(times[next(iter(methods))])
        for n in methods:
            ms = _common.median(times[n])
            rows.append([name, n, ms * 1e3, ms / floor])
    if rank == 0:
        print(
            f"Round profile, {world} ranks, gloo, {args.link}; median of {args.repeats} "
            f"repeats of {args.rounds}; x the floor\n"
        )
        print(_common.markdown_table(["model", "pass", "ms", "x floor"], rows))
        print(f"machine: {_common.machine()}")
    _common.shutdown()


if __name__ == "__main__":
    main()
