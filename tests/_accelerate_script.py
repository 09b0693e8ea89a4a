"""LocalSGDOptimizer under Hugging Face Accelerate in multi-CPU mode, for tests/test_accelerate.py.

Run on 2 gloo processes (``tests/test_accelerate.py`` does this)::

    CUDA_VISIBLE_DEVICES= python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/_accelerate_script.py --period 3 --accumulation 2 --checkpoint-dir /tmp/ckpt

Rank 0 prints one line, ``RESULT {json}``, with what every rank saw; the test asserts on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from _common import batch, bn_net
from accelerate import Accelerator, DistributedType
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from local_sgd_optim import LocalSGDOptimizer
from local_sgd_optim.accelerate import prepare_local_sgd


def flat(model: nn.Module) -> Tensor:
    """Parameters and floating-point buffers, one flat tensor."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def gathered(t: Tensor) -> list[Tensor]:
    """``t`` from every rank, in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def compare(model: nn.Module) -> dict[str, Any]:
    """How far apart the ranks' copies of ``model`` are."""
    copies = gathered(flat(model))
    return {
        "equal": all(torch.equal(copies[0], c) for c in copies[1:]),
        "max_diff": max(float((copies[0] - c).abs().max()) for c in copies[1:]),
    }


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train(
    accelerator: Accelerator,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    micro_batches: range,
    on_micro_batch: Any = None,
) -> None:
    """The loop of Accelerate's gradient-accumulation guide, on this rank's own batches."""
    for i in micro_batches:
        x, y = batch(dist.get_rank(), i)
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
        if on_micro_batch is not None:
            on_micro_batch(i)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--period", type=int, default=3)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--windows", type=int, default=2, help="averaging periods to train")
    parser.add_argument("--checkpoint-dir", required=True)
    args = parser.parse_args()
    period, accumulation = args.period, args.accumulation

    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
    torch.set_num_threads(1)
    rank = accelerator.process_index
    result: dict[str, Any] = {
        "distributed_type": str(accelerator.distributed_type),
        "multi_cpu": accelerator.distributed_type == DistributedType.MULTI_CPU,
        "world_size": accelerator.num_processes,
        "backend": dist.get_backend(),
    }

    # --- 1. prepare_local_sgd: model and LocalSGDOptimizer in one call, as for any optimizer ---
    model = bn_net(seed=rank + 1)  # ranks start apart: the initial broadcast aligns them
    local_sgd = LocalSGDOptimizer(sgd(model), model, period=period)
    ddp, opt = prepare_local_sgd(accelerator, model, local_sgd)
    result["prepared"] = {
        "ddp": isinstance(ddp, DDP),
        "ddp_wraps_model": isinstance(ddp, DDP) and ddp.module is model,
        "opt_wraps_ours": getattr(opt, "optimizer", None) is local_sgd,
        "broadcast_buffers": getattr(ddp, "broadcast_buffers", None),
        "comm_hooks": len(getattr(ddp, "_comm_hooks", [])),
    }

    # The same training without Accelerate: LocalSGDOptimizer accumulating by itself.
    reference = bn_net(seed=rank + 1)
    ref_opt = LocalSGDOptimizer(
        sgd(reference), reference, period=period, accumulation_steps=accumulation
    )

    # This rank's parameters and buffers right after each base step, before any round runs.
    before_round: list[Tensor] = []
    local_sgd.base_optimizer.register_step_post_hook(lambda *_: before_round.append(flat(model)))

    trace: list[dict[str, Any]] = []

    def record(i: int) -> None:
        x, y = batch(rank, i)
        nn.functional.cross_entropy(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        entry: dict[str, Any] = {
            "micro_batch": i + 1,
            "sync_gradients": accelerator.sync_gradients,
            "step_calls": local_sgd.micro_steps,
            "optimizer_steps": local_sgd.optimizer_steps,
            "averaging_rounds": local_sgd.averaging_rounds,
            "vs_reference": float((flat(model) - flat(reference)).abs().max()),
            **compare(model),
        }
        rounds_before = trace[-1]["averaging_rounds"] if trace else 0
        if before_round and entry["averaging_rounds"] > rounds_before:
            # A round just ran: it must have produced the mean of the ranks' local copies.
            local = torch.stack(gathered(before_round[-1])).mean(0)
            entry["round_vs_mean"] = float((flat(model) - local).abs().max())
            bn = model[1]
            n = bn.running_mean.numel()
            offset = sum(p.numel() for p in model.parameters())
            locals_mean = torch.stack(gathered(before_round[-1][offset : offset + n]))
            entry["bn_local_spread"] = float((locals_mean[0] - locals_mean[1]).abs().max())
            entry["bn_vs_mean"] = float((bn.running_mean - locals_mean.mean(0)).abs().max())
        trace.append(entry)

    micro_per_window = period * accumulation
    first = range(args.windows * micro_per_window)
    train(accelerator, ddp, opt, first, record)
    result["trace"] = trace

    # --- 2. accelerator.save_state / load_state round-trip the counters ---------------------
    saved = {
        "counters": [local_sgd.micro_steps, local_sgd.optimizer_steps, local_sgd.averaging_rounds],
        "accelerator_step": accelerator.step,
    }
    saved_state = flat(model)
    accelerator.save_state(args.checkpoint_dir)
    more = range(len(first), len(first) + micro_per_window + accumulation)
    train(accelerator, ddp, opt, more)
    after_more = [local_sgd.micro_steps, local_sgd.optimizer_steps, local_sgd.averaging_rounds]
    accelerator.load_state(args.checkpoint_dir)
    loaded = [local_sgd.micro_steps, local_sgd.optimizer_steps, local_sgd.averaging_rounds]
    accelerator_step_loaded = accelerator.step
    restored_params = bool(torch.equal(flat(model), saved_state))
    # Training goes on from the checkpoint: the next round comes one period after the last.
    resumed: list[list[int]] = []
    train(
        accelerator,
        ddp,
        opt,
        range(len(first), len(first) + micro_per_window),
        lambda _: resumed.append([local_sgd.optimizer_steps, local_sgd.averaging_rounds]),
    )
    result["checkpoint"] = {
        "saved": saved,
        "after_more": after_more,
        "loaded": [t.tolist() for t in gathered(torch.tensor(loaded))],
        "accelerator_step_loaded": accelerator_step_loaded,
        "params_restored": [bool(t) for t in gathered(torch.tensor(restored_params))],
        "resumed": resumed,
        "resumed_ranks": compare(model),
    }

    # --- 3. The order that needs no adapter: prepare the model, build on DDP, prepare opt ---
    model_b = bn_net(seed=rank + 7)
    ddp_b = accelerator.prepare(model_b)
    local_b = LocalSGDOptimizer(sgd(ddp_b), ddp_b, period=period)
    opt_b = accelerator.prepare(local_b)
    train(accelerator, ddp_b, opt_b, range(accumulation))
    result["model_first"] = {
        "optimizer_steps": local_b.optimizer_steps,
        "averaging_rounds": local_b.averaging_rounds,
        "comm_hooks": len(ddp_b._comm_hooks),
        **compare(ddp_b),
    }

    # --- 4. Plain accelerator.prepare: the wrapper finds the DDP at its first forward --------
    model_c = bn_net(seed=rank + 11)
    local_c = LocalSGDOptimizer(sgd(model_c), model_c, period=period)
    ddp_c, opt_c = accelerator.prepare(model_c, local_c)
    train(accelerator, ddp_c, opt_c, range(accumulation))
    params_c = torch.cat([p.detach().reshape(-1) for p in model_c.parameters()])
    copies = gathered(params_c)
    result["plain_prepare"] = {
        "optimizer_steps": local_c.optimizer_steps,
        "averaging_rounds": local_c.averaging_rounds,
        "params_equal": all(torch.equal(copies[0], c) for c in copies[1:]),
        "broadcast_buffers": ddp_c.broadcast_buffers,
    }

    # --- 5. Accumulating on both sides is refused before anything is prepared ----------------
    model_d = bn_net(seed=0)
    local_d = LocalSGDOptimizer(sgd(model_d), model_d, period=period, accumulation_steps=2)
    try:
        prepare_local_sgd(accelerator, model_d, local_d)
    except ValueError as exc:
        result["double_accumulation"] = str(exc)
    else:
        result["double_accumulation"] = None

    dist.barrier()  # torch 2.14 gloo can abort a rank torn down mid-collective (pytorch#179291)
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Finished: leave without interpreter finalisation, where torch 2.14's gloo can still abort
    # a process whose work is done (pytorch/pytorch#179291, about 1 run in 8 here under load).
    sys.stdout.flush()
    os._exit(0)
