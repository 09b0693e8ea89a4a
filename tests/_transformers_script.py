"""LocalSGDTrainer under torchrun on 2 gloo CPU ranks; run by tests/test_transformers.py.

``--phase first``: a LocalSGDTrainer run (tiny GPT-2 from a config, byte-level tokens of a
stdlib source file) that records, at every optimizer step on every rank, the counters, whether
the gradients and parameters differ across ranks, and what it saved at each checkpoint.
``--phase resume``: a fresh process resumes from a checkpoint of the first phase and records
what every rank loaded, trains to the end, then a plain Trainer (DDP) run on the same data.
``--phase neutral``: runs with and without evaluation every 5 steps and saves every 10, with
and without an outer optimizer, and a GPT-2 with its default dropout evaluated every 5 steps.
Rank 0 prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sysconfig
import warnings
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from local_sgd_optim.transformers import LocalSGDTrainer

SEQ, BATCH, ACCUMULATION, PERIOD, SAVE_STEPS, MAX_STEPS = 32, 4, 2, 3, 8, 24


class Bytes(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, data: torch.Tensor) -> None:
        self.blocks = data[: len(data) // SEQ * SEQ].view(-1, SEQ)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def datasets() -> tuple[Bytes, Bytes]:
    path = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")
    with open(path, "rb") as f:
        raw = torch.tensor(list(f.read()), dtype=torch.long)
    cut = len(raw) * 4 // 5
    return Bytes(raw[:cut]), Bytes(raw[cut:][: 64 * SEQ])


def model(dropout: bool = False) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=SEQ, n_layer=2, n_head=2, n_embd=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    if not dropout:  # else GPT2Config's defaults, 0.1 each
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def arguments(out: str, **extra: Any) -> TrainingArguments:
    options: dict[str, Any] = dict(
        use_cpu=True, report_to=[], disable_tqdm=True, seed=0, max_steps=MAX_STEPS,
        per_device_train_batch_size=BATCH, per_device_eval_batch_size=16,
        gradient_accumulation_steps=ACCUMULATION, learning_rate=3e-3, optim="adamw_torch",
        lr_scheduler_type="linear", warmup_steps=2, logging_steps=100, save_strategy="steps",
        save_steps=SAVE_STEPS, eval_strategy="no", dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )  # fmt: skip
    return TrainingArguments(out, **{**options, **extra})


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def spread(t: torch.Tensor) -> float:
    """max |rank r's - rank 0's| over every element, the same on every rank."""
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def digest(obj: Any) -> str:
    """A hash of every tensor and number in a (nested) state dict."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(x.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def param_hash(module: torch.nn.Module) -> str:
    return hashlib.sha256(flat(module).numpy().tobytes()).hexdigest()


def gather_strings(s: str) -> list[str]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, s)
    return out


class Recorder(TrainerCallback):
    """Records on every rank; collectives here run on every rank at the same points."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.trace: list[dict[str, Any]] = []
        self.saves: list[dict[str, Any]] = []
        self.loaded: dict[str, Any] = {}
        self.grad_spread: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ours = self.trainer.local_sgd  # after Trainer loaded the optimizer state on resume
        self.loaded = {
            "counters": gather_strings(json.dumps([ours.optimizer_steps, ours.averaging_rounds])),
            "state": gather_strings(digest(ours.state_dict())),
            "global_step": state.global_step,
            "params_spread": spread(flat(self.trainer.model)),
        }

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        grads = torch.cat([p.grad.reshape(-1) for p in self.trainer.model.parameters()])
        self.grad_spread.append(spread(grads))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ours = self.trainer.local_sgd
        self.trace.append(
            {
                "global_step": state.global_step,
                "optimizer_steps": ours.optimizer_steps,
                "rounds": ours.averaging_rounds,
                "spread": spread(flat(self.trainer.model)),
                "hash": param_hash(self.trainer.model),
            }
        )

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ours = self.trainer.local_sgd
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        saved = load_file(os.path.join(folder, "model.safetensors"))
        params = dict(self.trainer.model.named_parameters())
        written = torch.cat([saved[k].reshape(-1) for k in params if k in saved])
        mine = torch.cat([p.detach().reshape(-1) for k, p in params.items() if k in saved])
        mean = mine.clone()
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
        self.saves.append(
            {
                "step": state.global_step,
                "counters": gather_strings(
                    json.dumps([ours.optimizer_steps, ours.averaging_rounds])
                ),
                "state": gather_strings(digest(ours.state_dict())),
                "spread": spread(flat(self.trainer.model)),
                "written_minus_mean": float((written - mean).abs().max()),
                "files": sorted(
                    f for f in os.listdir(folder) if f.startswith(("optimizer", "model-rank"))
                ),
            }
        )


def local_sgd_run(out: str, resume: str | None) -> dict[str, Any]:
    train, held_out = datasets()
    recorder = Recorder()
    trainer = LocalSGDTrainer(
        model=model(), args=arguments(out), train_dataset=train, eval_dataset=held_out,
        callbacks=[recorder], period=PERIOD,
    )  # fmt: skip
    recorder.trainer = trainer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    ours = trainer.local_sgd
    assert ours is not None
    metrics = trainer.evaluate()
    return {
        "trace": recorder.trace,
        "grad_spread": recorder.grad_spread,
        "saves": recorder.saves,
        "loaded": recorder.loaded,
        "final_spread": spread(flat(trainer.model)),
        "final_hash": param_hash(trainer.model),
        "final_counters": [ours.optimizer_steps, ours.averaging_rounds],
        "eval_loss": metrics["eval_loss"],
        "bytes": ours.stats.bytes_communicated,
        "optimizer_class": type(ours.base_optimizer).__name__,
        "accelerated": type(trainer.optimizer).__name__,
        "ddp": type(trainer.model_wrapped).__name__,
        "warnings": [str(w.message) for w in caught if "rank 0's" in str(w.message)],
    }


def ddp_run(out: str) -> dict[str, Any]:
    train, held_out = datasets()
    m = model()
    trainer = Trainer(model=m, args=arguments(out, save_strategy="no"), train_dataset=train)
    trainer.train()
    metrics = trainer.evaluate(held_out)
    trainable = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
    return {
        "eval_loss": metrics["eval_loss"],
        # DDP all-reduces every gradient once per optimizer step (no_sync inside a window)
        "bytes": trainable * MAX_STEPS,
        "param_bytes": trainable,
        "spread": spread(flat(m)),
    }


def neutral_run(out: str, looks: bool, outer: bool, dropout: bool = False) -> dict[str, Any]:
    """A LocalSGDTrainer run; ``looks``: evaluate every 5 steps and save every 10;
    ``dropout``: GPT-2's default dropout at a fine-tuning learning rate, without accumulation
    (with the old float-norm fingerprint and an averaging round at each evaluation, its
    ranks were taken for identical at the round of step 16)."""
    train, held_out = datasets()
    extra: dict[str, Any] = {"save_strategy": "no", "eval_strategy": "no"}
    if dropout:
        extra.update(learning_rate=1e-5, gradient_accumulation_steps=1)
    if looks:
        extra.update(save_strategy="steps", save_steps=10, eval_strategy="steps", eval_steps=5)
    options: dict[str, Any] = {}
    if outer:
        options["outer_optimizer"] = lambda ps: torch.optim.SGD(
            ps, lr=0.7, momentum=0.9, nesterov=True
        )
    trainer = LocalSGDTrainer(
        model=model(dropout), args=arguments(out, **extra), train_dataset=train,
        eval_dataset=held_out, period=4, local_sgd_kwargs=options,
    )  # fmt: skip
    trainer.train()
    ours = trainer.local_sgd
    assert ours is not None
    return {
        "hash": param_hash(trainer.model),
        "spread": spread(flat(trainer.model)),
        "rounds": ours.averaging_rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["first", "resume", "neutral"], required=True)
    parser.add_argument("--dir", required=True)
    options = parser.parse_args()
    out = os.path.join(options.dir, "local_sgd")
    if options.phase == "first":
        result = local_sgd_run(out, None)
    elif options.phase == "neutral":
        result = {
            f"{looks}-{outer}": neutral_run(
                os.path.join(options.dir, f"neutral-{looks}-{outer}"), looks, outer
            )
            for outer in (False, True)
            for looks in (False, True)
        }
        result["dropout"] = neutral_run(os.path.join(options.dir, "dropout"), True, False, True)
    else:
        result = local_sgd_run(out, os.path.join(out, f"checkpoint-{SAVE_STEPS}"))
        result["ddp_run"] = ddp_run(os.path.join(options.dir, "ddp"))
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
