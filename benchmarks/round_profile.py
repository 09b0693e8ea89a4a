"""Benchmark 1b: where an averaging round's time goes, pass by pass, against the floor.

For parameters placed in bucket storage (``parameters_as_bucket_view=True``), a
full-precision round is: the header (one read of the parameters for NaN and the fingerprint,
then one small all-reduce), one in-place all-reduce per bucket, one division. A round with
bf16 deltas adds: the delta (parameters minus anchor), the cast to bf16, the cast back, the
anchor update and the copy into the parameters. A round with int8 or int4 deltas
(``comm_dtype="int8"``/``"int4"``) forms the delta in float32 blocks, quantizes it, moves the
codes and scales (an all-gather, or the reduce-scatter's ``all_to_all`` and ``all_gather``) and
dequantizes and adds what arrived, then updates the anchor and the parameters as bf16 does. This
script times each of those passes on its own (every rank runs the same, between barriers) next
to the floor, a single all-reduce of a flat fp32 buffer of the same size, and the whole round,
so that the table shows which pass is left above the floor and what it costs, with the bytes
each rank sent (from ``/proc/self/io``). Run on 2 ranks (or 4)::

    torchrun --standalone --nproc_per_node 2 benchmarks/round_profile.py
    torchrun --standalone --nproc_per_node 4 benchmarks/round_profile.py --models resnet18
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
from local_sgd_optim.comm.quantize import FORMATS, gathered_mean  # noqa: E402
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

    passes: dict[str, Callable[[], object]] = {
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
    for name_of_format in FORMATS:
        passes.update(quantized_passes(name, name_of_format, numel))
    return passes


def quantized_passes(name: str, comm_dtype: str, numel: int) -> dict[str, Callable[[], object]]:
    """The passes of a round with quantized deltas, each reduction's whole round first."""
    world = dist.get_world_size()
    rounds: dict[str, BucketedAverager] = {}
    for reduction in ("all_gather", "reduce_scatter"):
        torch.manual_seed(0)
        model = _common.MODELS[name]()
        params = [p for p in model.parameters() if p.requires_grad]
        Residence(params, list(model.parameters()))
        rounds[reduction] = BucketedAverager(
            params, None, comm_dtype=comm_dtype, quantized_reduction=reduction
        )
        rounds[reduction].set_anchor_from_tensors()
    b = rounds["all_gather"].buckets[0]
    fmt = FORMATS[comm_dtype]
    assert b.span is not None and b.anchor is not None and b.work is not None
    assert b.received is not None
    span, anchor, work, wire, received = b.span, b.anchor, b.work, b.wire, b.received
    codes, casts = b.codes, b.casts
    payload = torch.zeros(fmt.payload_bytes(numel, world), dtype=torch.uint8)
    gathered = torch.zeros(world * payload.numel(), dtype=torch.uint8)
    exchanged = torch.zeros_like(payload)
    share = payload[: payload.numel() // world]
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def reduce_scatter() -> None:
        dist.all_to_all_single(exchanged, payload)
        gather(payload, share)

    return {
        f"{comm_dtype} round, all-gather, in place (whole)": rounds["all_gather"].average,
        f"{comm_dtype} round, reduce-scatter, in place (whole)": rounds["reduce_scatter"].average,
        f"  payload: all-gather of the {comm_dtype} codes and scales": lambda: gather(
            gathered, payload
        ),
        f"  payload: all_to_all and all_gather of the {comm_dtype} shares": reduce_scatter,
        f"  {comm_dtype} delta: parameters minus anchor into float32 blocks (one bucket)": lambda: (
            torch.sub(span, anchor, out=work[: b.numel])
        ),
        f"  quantize to {comm_dtype} (one bucket)": lambda: fmt.quantize_(work, wire, codes),
        f"  dequantize and add {world} {comm_dtype} payloads (one bucket)": lambda: gathered_mean(
            fmt, received, world, work, codes, casts
        ),
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
        sent = dict.fromkeys(methods, 0)
        for _ in range(args.repeats):
            for n, fn in methods.items():
                before = _common.bytes_sent()
                times[n].append(_common.timed(fn, args.rounds))
                after = _common.bytes_sent()
                if before is not None and after is not None:
                    sent[n] += after - before
        floor = _common.median(times[next(iter(methods))])
        for n in methods:
            ms = _common.median(times[n])
            mb = sent[n] / (args.repeats * args.rounds) / 1e6
            rows.append([name, n, ms * 1e3, ms / floor, mb])
    if rank == 0:
        print(
            f"Round profile, {world} ranks, gloo, {args.link}; median of {args.repeats} "
            f"repeats of {args.rounds}; x the floor\n"
        )
        headers = ["model", "pass", "ms", "x floor", "MB sent by rank 0"]
        print(_common.markdown_table(headers, rows))
        print(f"machine: {_common.machine()}")
    _common.shutdown()


if __name__ == "__main__":
    main()
