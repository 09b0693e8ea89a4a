"""The LocalSGD Lightning callback on 2 gloo ranks, for tests/test_lightning.py.

Two modes, each one launch (``tests/test_lightning.py`` runs both)::

    # under torchrun: Local SGD with accumulation, a scheduler and per-epoch checkpoints, then
    # the same training under Lightning's plain DDP
    CUDA_VISIBLE_DEVICES= python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/_lightning_script.py --mode train --dir /tmp/work
    # Lightning's own launcher (plain python, devices=2): resume from the first run's checkpoint
    CUDA_VISIBLE_DEVICES= python tests/_lightning_script.py --mode resume --dir /tmp/work

Rank 0 prints one line, ``RESULT {json}``, with what every rank saw; the test asserts on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from local_sgd_optim.lightning import LocalSGD

PERIOD, ACCUMULATE, BATCH, EPOCHS, RESUME_EPOCH = 4, 2, 24, 3, 1
TRAIN = 1440


def digits() -> tuple[TensorDataset, tuple[Tensor, Tensor]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return TensorDataset(x[:TRAIN], y[:TRAIN]), (x[TRAIN:], y[TRAIN:])


class Net(pl.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
        )

        self.val_spreads: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # Every rank validates the same (global) model, though it trains its own.
        self.val_spreads.append(spread(flat(self)))
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> Any:  # unchanged by Local SGD
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def flat(module: nn.Module) -> Tensor:
    tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def gathered(t: Tensor) -> list[Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def spread(t: Tensor) -> float:
    """The largest difference between rank 0's ``t`` and another rank's (0.0: bitwise equal)."""
    copies = gathered(t)
    equal = all(torch.equal(copies[0], c) for c in copies[1:])
    return 0.0 if equal else max(float((copies[0] - c).abs().max()) for c in copies[1:])


def momentum(opt: torch.optim.Optimizer) -> Tensor:
    params = [p for g in opt.param_groups for p in g["params"]]
    bufs = [opt.state[p].get("momentum_buffer", torch.zeros_like(p)) for p in params]
    return torch.cat([b.reshape(-1) for b in bufs])


def snapshot(module: nn.Module, opt: Any) -> dict[str, Any]:
    """This rank's state, the same on save and right after a resume if the resume is exact."""
    return {
        "counters": [opt.micro_steps, opt.optimizer_steps, opt.averaging_rounds],
        "lr": opt.param_groups[0]["lr"],
        "params": flat(module),
        "momentum": momentum(opt),
    }


class Recorder(pl.Callback):
    """Records, per batch, what the test asserts on. Put after LocalSGD in the callbacks."""

    def __init__(self, local_sgd: Any = None) -> None:
        self.local_sgd = local_sgd
        self.trace: list[dict[str, Any]] = []
        self.grad_spreads: list[float] = []
        self.saved: dict[int, dict[str, Any]] = {}
        self.at_start: dict[str, Any] | None = None
        self.ddp_bytes = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.local_sgd is None:  # the DDP baseline: count the bytes DDP all-reduces
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting(state: Any, bucket: Any) -> Any:
                self.ddp_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
                return allreduce_hook(state, bucket)

            # DDP checks the annotations themselves, which `from __future__` made strings.
            counting.__annotations__ = {
                "state": object,
                "bucket": dist.GradBucket,
                "return": torch.futures.Future[Tensor],
            }

            trainer.strategy.model.register_comm_hook(None, counting)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.local_sgd is not None:
            opt = self.local_sgd.optimizers[0]
            self.at_start = snapshot(pl_module, opt)
            self.at_start["is_wrapper"] = trainer.optimizers[0] is opt
            self.at_start["comm_hooks"] = len(trainer.strategy.model._comm_hooks)
            self.at_start["broadcast_buffers"] = trainer.strategy.model.broadcast_buffers

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grads = torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()])
        self.grad_spreads.append(spread(grads))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self.local_sgd is None:
            return
        opt = self.local_sgd.optimizers[0]
        self.trace.append(
            {
                "batch_idx": args[-1],
                "global_step": trainer.global_step,
                "optimizer_steps": opt.optimizer_steps,
                "averaging_rounds": opt.averaging_rounds,
                "spread": spread(flat(pl_module)),
                "param_spread": spread(
                    torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
                ),
                "lr": opt.param_groups[0]["lr"],
            }
        )

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # Runs before ModelCheckpoint's (Lightning puts checkpoint callbacks last): the state
        # that the checkpoint of this epoch holds.
        if self.local_sgd is not None:
            self.saved[trainer.current_epoch] = snapshot(pl_module, self.local_sgd.optimizers[0])


def trainer(callbacks: list[Any], root: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=EPOCHS,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=callbacks,
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def held_out_loss(module: Net, test: tuple[Tensor, Tensor]) -> tuple[float, float]:
    module.eval()
    with torch.no_grad():
        logits = module.net(test[0])
    loss = float(nn.functional.cross_entropy(logits, test[1]))
    accuracy = float((logits.argmax(1) == test[1]).float().mean())
    return loss, accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["train", "resume"], required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    root = Path(args.dir)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    train_set, test = digits()
    loader = DataLoader(train_set, batch_size=BATCH, shuffle=True)
    result: dict[str, Any] = {"launcher": args.mode}

    if args.mode == "train":
        # Validation every 5 batches (on the global model) must not change training: the
        # same run without validation ends with the same parameters, bitwise.
        quiet, quiet_local_sgd = Net(), LocalSGD(period=PERIOD)
        trainer([quiet_local_sgd], root / "quiet").fit(quiet, loader)
        local_sgd = LocalSGD(period=PERIOD)
        recorder = Recorder(local_sgd)
        ckpt = pl.callbacks.ModelCheckpoint(
            dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
        )
        model = Net()
        val_loader = DataLoader(TensorDataset(*test), batch_size=BATCH)
        fit = trainer([local_sgd, recorder, ckpt], root / "local", val_check_interval=5)
        fit.fit(model, loader, val_loader)
        result.update(
            validations=len(model.val_spreads),
            val_spread=max(model.val_spreads),
            validation_neutral=bool(torch.equal(flat(model), flat(quiet))),
        )
        opt = local_sgd.optimizers[0]
        rank = dist.get_rank()
        result.update(
            rank=rank,
            world_size=dist.get_world_size(),
            backend=dist.get_backend(),
            at_start={
                k: recorder.at_start[k] for k in ("is_wrapper", "comm_hooks", "broadcast_buffers")
            },
            trace=recorder.trace,
            grad_spreads=recorder.grad_spreads,
            final_spread=spread(flat(model)),
            final_counters=[opt.optimizer_steps, opt.averaging_rounds],
            # Training's bytes: the run without validation (validating costs an all-reduce).
            local_bytes=quiet_local_sgd.optimizers[0].stats.bytes_communicated,
            local_loss=held_out_loss(model, test),
            ckpts=sorted(p.name for p in (root / "ckpt").iterdir()),
        )
        # This rank's state at each save and at the end, for the resumed run to compare with.
        torch.save(
            {"saved": recorder.saved, "final": flat(model)}, root / f"expected_rank{rank}.pt"
        )

        # The same data, model and optimizer under Lightning's plain DDP.
        baseline = Net()
        ddp_recorder = Recorder()
        trainer([ddp_recorder], root / "ddp").fit(baseline, loader)
        result.update(
            ddp_loss=held_out_loss(baseline, test),
            ddp_bytes=ddp_recorder.ddp_bytes,
            ddp_grad_spreads=ddp_recorder.grad_spreads,
            ddp_steps=len(ddp_recorder.grad_spreads),
        )
    else:
        local_sgd = LocalSGD(period=PERIOD)
        recorder = Recorder(local_sgd)
        model = Net(seed=123)  # other weights: everything must come from the checkpoint
        fit = trainer([local_sgd, recorder], root / "resumed")
        ckpt_path = sorted((root / "ckpt").iterdir())[RESUME_EPOCH - 1]
        fit.fit(model, loader, ckpt_path=str(ckpt_path))
        rank = dist.get_rank()
        expected = torch.load(root / f"expected_rank{rank}.pt", weights_only=True)
        saved = expected["saved"][RESUME_EPOCH - 1]
        start = recorder.at_start
        assert start is not None
        checks = {
            "counters": start["counters"] == saved["counters"],
            "lr": start["lr"] == saved["lr"],
            "params": bool(torch.equal(start["params"], saved["params"])),
            "momentum": bool(torch.equal(start["momentum"], saved["momentum"])),
            "final": bool(torch.equal(flat(model), expected["final"])),
        }
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, checks)
        result.update(
            rank=rank,
            world_size=dist.get_world_size(),
            ckpt=ckpt_path.name,
            resumed_counters=start["counters"],
            saved_counters=saved["counters"],
            ranks_differed_at_save=spread(saved["params"]) > 0,
            checks=everyone,
            trace=recorder.trace,
            grad_spreads=recorder.grad_spreads,
            final_spread=spread(flat(model)),
        )

    dist.barrier()  # torch 2.14 gloo can abort a rank torn down mid-collective (pytorch#179291)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
