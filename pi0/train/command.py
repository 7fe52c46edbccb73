"""The `pi0 train` command: its options, `--resume`, and the run it starts (`python -m pi0.train` is the same)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from pi0.model.config import SIZES
from pi0.robot.presets import PRESETS
from pi0.train.args import TrainArgs
from pi0.train.fast import MODELS
from pi0.train.trainer import NORM_STATS, TRAIN_STATE, Trainer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", action="append", help="a LeRobot v3 dataset: a directory or a hub repo id in the local "
                   "cache; repeat it to mix datasets of one robot (demonstrations, recorded deployments, DAgger labels)")
    p.add_argument("--weights", default=None, help="with several --dataset: how often a sample comes from each, "
                   "comma-separated (e.g. 1,2; default: in proportion to their frames)")
    p.add_argument("--init", default=None, help="the checkpoint to fine-tune (any layout pi0 reads)")
    p.add_argument("--norm-stats", default="dataset", choices=NORM_STATS, help="the state and action stats the "
                   "model sees its data through: dataset (computed from the --dataset frames, for a new robot or "
                   "task) or checkpoint (the --init checkpoint's own, so that fine-tuning on more data of the same "
                   "robot, such as recorded deployments or DAgger labels, keeps the units the model learned)")
    p.add_argument("--download", action="store_true", help="fetch --init's hub repo id if it is not in the "
                   "huggingface_hub cache (pi0 downloads nothing otherwise)")
    p.add_argument("--size", default=None, help="train from seeded random weights instead: "
                   f"{', '.join(SIZES)}, "
                   "or a JSON file with a Pi0Config")
    p.add_argument("--model", default=None, choices=MODELS, help="with --size: the model family (pi0_fast: π0-FAST, "
                   "actions as FAST tokens; default pi0, whose --size picks pi0 or pi0.5); --init's is its own")
    p.add_argument("--fast-tokenizer", default=None, help="π0-FAST: the FAST tokenizer's directory (default: --init's, "
                   "else one fitted on the dataset's normalised action chunks and saved with each checkpoint)")
    p.add_argument("--fast-vocab", type=int, default=1024, help="π0-FAST: the vocabulary of a FAST tokenizer fitted here")
    p.add_argument("--norm", default=None, choices=["QUANTILES", "MEAN_STD"], help="π0-FAST: the normalisation of "
                   "state and actions (default: --init's record, else QUANTILES); config.json records it")
    p.add_argument("--out", help="output directory (checkpoints step-NNNNNN/, latest, train_log.jsonl, loss.png)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps in all (default 1000)")
    p.add_argument("--batch", type=int, default=8, help="global batch (split across torchrun processes)")
    p.add_argument("--lr", type=float, default=2.5e-5, help="peak learning rate (AdamW, betas 0.9 / 0.95)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default steps / 30, at most 1000)")
    p.add_argument("--decay-lr", type=float, default=None, help="learning rate at the last step, cosine decay "
                   "(default lr / 10)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping: the global norm")
    p.add_argument("--ema", type=float, default=None, help="keep an exponential moving average of the weights with "
                   "this decay (openpi: 0.99) and save it")
    p.add_argument("--lora", type=int, default=None, metavar="R", help="train rank-R adapters only, merged into the "
                   "saved weights")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default R: scale 1)")
    p.add_argument("--lora-targets", default="expert", help="expert (LeRobot's default: the expert's q/v and the "
                   "action/state/time projections), all (every VLM and expert projection) or a regex over module names")
    p.add_argument("--freeze", default=None, choices=["vision", "vlm"], help="full fine-tuning with SigLIP (vision) or "
                   "SigLIP, projector and the VLM (vlm) frozen")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer in the backward pass")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimiser state "
                   "across the processes (FSDP) instead of replicating the model (DDP)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast where bf16 is native, fp32 master weights), "
                   "float32 or bfloat16")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no image augmentation")
    p.add_argument("--preset", default=None, choices=[*PRESETS, "generic"], help="the robot preset the checkpoint will "
                   "be served with: its state and action maps (aloha's joint flips, gripper angles) apply to the data "
                   "as in serving, and config.json records it (default: the --init checkpoint's, else generic)")
    p.add_argument("--cameras", default=None, help="dataset camera keys in the model's camera order, comma-separated "
                   "(none: an empty slot); default: the checkpoint's, else the dataset's")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the --init checkpoint's; with --size "
                   "a small one is trained on the dataset's tasks)")
    p.add_argument("--tokenizer-vocab", type=int, default=256, help="vocabulary of that small tokenizer")
    p.add_argument("--action-horizon", type=int, default=None, help="actions per chunk (default: the checkpoint's)")
    p.add_argument("--no-state-in-prompt", dest="state_in_prompt", action="store_false",
                   help="pi0.5: leave the discretised state out of the prompt")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes preparing batches ahead")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", default=None, help="continue a run: its output directory (or one step directory)")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")


def args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    d = {k: v for k, v in vars(ns).items() if k in fields and v is not None}
    return TrainArgs(**_lists(d))


def _lists(d: dict[str, Any]) -> dict[str, Any]:
    """The comma-separated options as lists (--cameras, --weights)."""
    if isinstance(d.get("cameras"), str):
        d["cameras"] = [c.strip() for c in d["cameras"].split(",") if c.strip()]
    if isinstance(d.get("weights"), str):
        try:
            d["weights"] = [float(w) for w in d["weights"].split(",") if w.strip()]
        except ValueError:
            raise ValueError(f"--weights {d['weights']!r}: give numbers separated by commas, one per --dataset") from None
    if isinstance(d.get("dataset"), list) and len(d["dataset"]) == 1:
        d["dataset"] = d["dataset"][0]
    return d


def resume_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / TRAIN_STATE).is_file():
        return p
    if (p / "latest" / TRAIN_STATE).is_file():
        return (p / "latest").resolve()
    raise FileNotFoundError(f"nothing to resume at {p}: no {TRAIN_STATE} there or under {p}/latest")


RESUME_MAY_CHANGE = ("steps", "progress")  # what --resume takes from the command line; the rest is the run's


def resume_conflicts(ns: argparse.Namespace, saved: dict[str, Any]) -> list[str]:
    """The options given with --resume (other than --steps and --quiet) that differ from the resumed run's."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = vars(parser.parse_args([]))
    fields = {f.name for f in dataclasses.fields(TrainArgs)} - set(RESUME_MAY_CHANGE)
    given = {k: v for k, v in vars(ns).items() if k in fields and v != default.get(k)}
    given = _lists(given)
    return [f"--{k.replace('_', '-')} {v} (the run has {saved.get(k)})" for k, v in given.items() if v != saved.get(k)]


def main(ns: argparse.Namespace) -> int:
    if ns.resume:
        step_dir = resume_dir(ns.resume)
        saved = torch.load(step_dir / TRAIN_STATE, map_location="cpu", weights_only=False)["args"]
        conflicts = resume_conflicts(ns, saved)
        if conflicts:
            raise ValueError(f"--resume continues {step_dir} as it was started; these options differ from it: "
                             f"{'; '.join(conflicts)}. Drop them (only --steps and --quiet may change), or start a "
                             "new run with --out")
        args = TrainArgs(**{**saved, "steps": ns.steps or saved["steps"], "progress": ns.progress})
        trainer = Trainer(args)
        trainer.resume(step_dir)
        trainer.say(f"pi0 train: resuming {args.out} at step {trainer.start_step} of {args.steps}")
    else:
        if not ns.dataset or not ns.out:
            raise ValueError("pi0 train needs --dataset and --out (or --resume DIR)")
        args = args_from_namespace(ns)
        trainer = Trainer(args)
    if trainer.rank == 0:
        lora = f", LoRA rank {args.lora} on {len(trainer.lora_names)} layers" if args.lora else ""
        trainer.say(f"pi0 train: {trainer.config.kind} {'from ' + args.init if args.init else 'size ' + str(args.size)}, "
                    f"{trainer.trainable:,} trainable parameters{lora}; dataset {trainer.ds.root} "
                    f"({len(trainer.ds)} frames, {trainer.ds.num_episodes} episodes, cameras {trainer.cameras}); "
                    f"{trainer.world} process(es), device {trainer.device}, {trainer.dtype_reason}")
    last = trainer.run()
    if trainer.rank == 0 and last is not None:
        trainer.say(f"pi0 train: saved {last} (serve it: pi0 serve --checkpoint {Path(args.out) / 'latest'})")
    if trainer.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0
