"""The training recipe: `Trainer` sets up the model, the data and the optimiser, steps, saves and resumes; a run of
`pi0 train` (and `torchrun --nproc-per-node N -m pi0.train`) on a LeRobot v3 dataset, full or LoRA, into a
checkpoint that `pi0.load_model`, `pi0.Policy` and `pi0 serve` take as it is (../shared/spec/training.md).

The loss is the reference model's `compute_loss` (LeRobot 0.6.1's, tested to 1e-5), averaged over the
dataset's real action dims (π0-FAST: its answer's cross-entropy, `pi0.train.fast`). Inputs are prepared by the observation pipeline `pi0.Policy` serves the saved
checkpoint with (`pi0.robot.openpi`): a robot preset's maps (`--preset`; default `generic`, the dataset's own
keys), normalisation with the saved stats (z-score for pi0, quantiles for pi0.5), openpi's resize-with-pad, the
same prompt tokens; the targets go through the inverse of the preset's action map. Every random draw of a sample (noise, flow time, augmentation) comes from
a generator seeded by (seed, step, position in the global batch) and the data order from (seed, epoch), so a
resumed run continues bit for bit and N data-parallel processes follow one process's trajectory.

Output directory: `step-NNNNNN/` checkpoints (weights in openpi's layout + config.json, norm stats as openpi's
assets/<id>/norm_stats.json and LeRobot's stats.safetensors, the tokenizer, train_state.pt for resuming), a
`latest` link to the newest complete one, `train_log.jsonl` and `loss.png`. A checkpoint is written under a
temporary name and renamed when complete, so an interrupted run leaves the previous one intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pi0.data.dataset import DatasetError, LeRobotDataset
from pi0.data.mixture import DatasetMixture
from pi0.hardware import peak_gpu_gib, peak_rss_gib, resolve_device, resolve_dtype
from pi0.model.config import size_config
from pi0.model.fast_config import FastConfig
from pi0.model.features import feature_fields, features
from pi0.robot.assets import find_fast_tokenizer, write_assets
from pi0.robot.fast_pipeline import OpenpiFastPipeline, checked_norm
from pi0.robot.normalize import Normalizer
from pi0.robot.openpi import OpenpiPipeline
from pi0.robot.presets import PRESETS, RobotPreset, generic_preset
from pi0.robot.tokenizer import PromptTokenizer, train_tokenizer
from pi0.train.args import TrainArgs
from pi0.train.data import (
    ACTION_KEY,
    STATE_KEY,
    StepBatches,
    TrainingData,
    camera_keys,
    checkpoint_stats,
    dataset_stats,
)
from pi0.train.distributed import barrier, mean_over_ranks, rank_and_world, shard_model
from pi0.train.lora import add_lora, merge_lora
from pi0.train.fast import FastLossModule, fast_pipeline, fast_size_config
from pi0.train.loss import LossModule, unreachable_modules
from pi0.train.report import TrainProgress, plot_loss
from pi0.train.schedule import learning_rate

TRAIN_STATE = "train_state.pt"
NORM_STATS = ("dataset", "checkpoint")  # where --norm-stats takes the stats from
LOG = "train_log.jsonl"


class Trainer:
    """A run of `pi0 train`: set up from `TrainArgs`, then `run()` (or `resume(step_dir)` first)."""

    def __init__(self, args: TrainArgs, log: Callable[[str], None] | None = None):
        self.args = args
        self.say = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.rank, self.world = rank_and_world()
        if args.batch % self.world:
            raise ValueError(f"--batch {args.batch} must be a multiple of the {self.world} processes")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(args.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        self.dtype, self.dtype_reason = resolve_dtype(args.dtype, self.device)
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"training runs in float32 or bfloat16 autocast, not {self.dtype}")
        if len(args.datasets) > 1 or args.weights is not None:
            self.ds = DatasetMixture([LeRobotDataset(d) for d in args.datasets], args.weights)
        else:
            self.ds = LeRobotDataset(args.datasets[0])
        self._model_and_config()
        self.ds.horizon = self.config.action_horizon  # samples carry the model's action chunk
        self._check_dataset()
        self._processing()
        self._trainable()
        self.start_step = 0
        self.history: list[dict[str, Any]] = []

    # -- set-up ---------------------------------------------------------------------------------

    def _model_and_config(self) -> None:
        import pi0

        a = self.args
        if (a.init is None) == (a.size is None):
            raise ValueError("give --init CKPT (a checkpoint to fine-tune) or --size NAME (random weights), not both")
        self.init_meta: dict[str, Any] = {}
        self.init_root: Path | None = None
        if a.norm_stats not in NORM_STATS:
            raise ValueError(f"--norm-stats {a.norm_stats!r}: choose one of {', '.join(NORM_STATS)}")
        self.tokenizer_path: Path | None = Path(a.tokenizer) if a.tokenizer else None
        if a.init is not None:
            from pi0.checkpoint.load import inspect_checkpoint
            from pi0.robot.assets import find_tokenizer

            info = inspect_checkpoint(a.init, action_horizon=a.action_horizon, download=a.download)
            self.init_meta = info.meta
            self.init_root = info.files.root
            self.tokenizer_path = find_tokenizer(a.tokenizer, info.files.root)
            self.model = pi0.load_model(a.init, backend="reference", action_horizon=a.action_horizon,
                                        device=self.device)
            self.config = self.model.config
            if a.model is not None and a.model != self.config.kind.replace("pi05", "pi0"):
                raise ValueError(f"--model {a.model}: --init {a.init} is a {self.config.kind} checkpoint")
            return
        cfg = size_config(a.size)
        if self.tokenizer_path is None:
            tasks = sorted(set(self.ds.tasks))
            prefix = self.out / "tokenizer"
            if self.rank == 0:
                train_tokenizer(tasks, prefix, a.tokenizer_vocab)
            barrier(self.world)
            self.tokenizer_path = Path(str(prefix) + ".model")
        import sentencepiece

        vocab = sentencepiece.SentencePieceProcessor(model_file=str(self.tokenizer_path)).vocab_size()
        if a.model == "pi0_fast":
            self.config = fast_size_config(cfg, vocab, a.fast_vocab, self.ds.shape(ACTION_KEY)[0],
                                           a.action_horizon or 10)
            self.model = pi0.build_model(self.config, backend="reference", seed=a.seed, device=self.device)
            return
        cfg = dataclasses.replace(  # the embedding table sized to the tokenizer
            cfg, vlm=dataclasses.replace(cfg.vlm, vocab_size=vocab), action_horizon=a.action_horizon or cfg.action_horizon,
            num_cameras=len(camera_keys(a.cameras, None, self.ds, self._robot(None))))
        self.config = cfg
        self.model = pi0.build_model(cfg, backend="reference", seed=a.seed, device=self.device)

    def _robot(self, checkpoint_preset: str | None) -> RobotPreset | None:
        """--preset (else the one the --init checkpoint was trained with); None: generic, from the dataset."""
        name = self.args.preset or checkpoint_preset
        if name is None or name == "generic":
            return None
        if name not in PRESETS:
            raise ValueError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}, generic")
        return PRESETS[name]

    def _check_dataset(self) -> None:
        cfg, ds = self.config, self.ds
        feats = features(self.init_meta)
        self.robot = self._robot(feats.robot_preset)
        self.cameras = camera_keys(self.args.cameras, list(feats.cameras) or None, ds, self.robot,
                                   isinstance(cfg, FastConfig))
        if ACTION_KEY not in ds.features:
            raise DatasetError(f"{ds.root}/meta/info.json has no '{ACTION_KEY}' feature")
        a_dim = ds.shape(ACTION_KEY)[0]
        if a_dim > cfg.action_dim:
            raise DatasetError(f"{ds.root}/meta/info.json: '{ACTION_KEY}' has {a_dim} dims, the model takes at most "
                               f"{cfg.action_dim}")
        if STATE_KEY in ds.features and ds.shape(STATE_KEY)[0] > getattr(cfg, "state_dim", float("inf")):
            raise DatasetError(f"{ds.root}/meta/info.json: '{STATE_KEY}' has {ds.shape(STATE_KEY)[0]} dims, the model "
                               f"takes at most {cfg.state_dim}")
        if STATE_KEY not in ds.features and not getattr(cfg, "pi05", True):
            raise DatasetError(f"{ds.root}/meta/info.json has no '{STATE_KEY}' feature, which pi0 needs")
        empty = [i for i, t in enumerate(ds.tasks) if not t.strip()]
        if empty:
            raise DatasetError(f"{ds.root}/meta/tasks.parquet: task {empty[0]} is empty; every episode needs an "
                               "instruction (its prompt)")

    def _processing(self) -> None:
        """The observation pipeline the saved checkpoint is served with (openpi's conventions, the preset's maps, the
        dataset's stats in the model's units), which prepares every training frame and target."""
        cfg, ds, a = self.config, self.ds, self.args
        fast = isinstance(cfg, FastConfig)
        if not fast and (a.norm or a.fast_tokenizer):
            raise ValueError(f"--norm and --fast-tokenizer apply to π0-FAST; this run trains {cfg.kind}")
        mode = checked_norm(a.norm, features(self.init_meta).normalization, self.init_root) if fast else \
            "QUANTILES" if cfg.pi05 else "MEAN_STD"
        self.norm_mode = mode
        a_dim = ds.shape(ACTION_KEY)[0]
        s_dim = ds.shape(STATE_KEY)[0] if STATE_KEY in ds.features else None
        robot = self.robot or generic_preset(self.cameras, a_dim, s_dim)
        if self.robot is not None:
            for what, ours, theirs in (("state", s_dim, robot.state_len), ("action", a_dim, robot.action_dim)):
                if theirs is not None and ours != theirs:
                    raise DatasetError(f"{ds.root}: {what} has {ours} values; preset {robot.name}'s robot has {theirs}")
        maps = robot.maps
        if a.norm_stats == "checkpoint":
            if self.init_root is None:
                raise ValueError("--norm-stats checkpoint keeps the stats of the checkpoint being fine-tuned: give --init")
            self.state_stats, self.action_stats, source = checkpoint_stats(self.init_root, mode, s_dim, a_dim)
        else:
            self.state_stats = dataset_stats(ds, STATE_KEY, robot.state_in if maps else None) if s_dim else None
            self.action_stats = dataset_stats(ds, ACTION_KEY, robot.actions_in if maps else None)
            source = f"{ds.root} (dataset stats)"
        normalizer = Normalizer(self.state_stats, self.action_stats, mode, mode)
        if fast:
            given = a.fast_tokenizer or (find_fast_tokenizer(None, self.init_root, self.init_meta) if self.init_root
                                         else None)
            self.pipeline: OpenpiPipeline = fast_pipeline(
                cfg, robot, normalizer, self.tokenizer_path, mode=mode, state_len=s_dim, action_dim=a_dim,
                source=source, fast_dir=given, ds=ds, fast_vocab=a.fast_vocab)
        else:
            self.pipeline = OpenpiPipeline(cfg, robot, normalizer, PromptTokenizer(self.tokenizer_path, cfg.max_token_len),
                                           state_in_prompt=a.state_in_prompt, state_len=s_dim, action_dim=a_dim,
                                           stats_source=source)
        self.data = TrainingData(ds, cfg, self.cameras, self.pipeline, a.augment, a.seed)

    def _trainable(self) -> None:
        a, m = self.args, self.model
        m.train()
        if a.grad_checkpointing:
            m.gradient_checkpointing_()
        self.lora_names: list[str] = []
        dead = unreachable_modules(m)
        if a.lora:
            self.lora_names = add_lora(m, a.lora, a.lora_alpha, a.lora_targets, seed=a.seed, exclude=dead)
        else:
            m.requires_grad_(True)
            if a.freeze in ("vision", "vlm"):
                m.vision.requires_grad_(False)
            if a.freeze == "vlm":
                m.projector.requires_grad_(False)
                m.vlm.requires_grad_(False)
            elif a.freeze not in (None, "vision"):
                raise ValueError(f"--freeze {a.freeze!r}: choose vision or vlm")
        for name in dead:  # no gradient ever reaches them (and DDP insists every trainable parameter gets one)
            m.get_submodule(name).requires_grad_(False)
        self.trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        fast = isinstance(self.config, FastConfig)
        self.loss_module: nn.Module = FastLossModule(m) if fast else LossModule(m, self.data.action_dim)
        if a.fsdp:
            if self.world == 1:
                raise ValueError("--fsdp shards the model across processes: start it under torchrun --nproc-per-node N")
            shard_model(m)
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.loss_module = DistributedDataParallel(
                self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.params = [p for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=a.weight_decay)
        self.ema = [p.detach().clone() for p in self.params] if a.ema else None

    # -- state: full (unsharded) state dicts through torch.distributed.checkpoint's API, so that one process,
    # DDP and FSDP save and resume alike (collective calls: every process makes them) ------------------------

    def _full_state(self) -> dict[str, Tensor]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # on a CPU these are the live tensors themselves: copy them, since the weights change after this call
        live = {t.data_ptr() for t in self.model.state_dict().values()}
        return {k: v.clone() if v.data_ptr() in live else v for k, v in state.items()}

    def _trainable_state(self) -> dict[str, Tensor]:
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in self._full_state().items() if k in names}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def _swap_ema(self) -> None:
        """Exchange the EMA and the raw trainable weights in place."""
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                tmp = p.detach().clone()
                p.copy_(e)
                e.copy_(tmp)

    def resume(self, step_dir: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        state = torch.load(step_dir / TRAIN_STATE, map_location="cpu", weights_only=False)
        if state.get("ema") is not None:  # load the EMA into the parameters, keep it aside, then the raw weights
            self._load_state(state["ema"])
            self._swap_ema()
        if state.get("params") is not None:
            self._load_state(state["params"])
        else:  # a full fine-tune without EMA: the saved weights are the trained ones
            from pi0.checkpoint.load import inspect_checkpoint, load_state_dict

            self._load_state(load_state_dict(inspect_checkpoint(step_dir), torch.float32))
        set_optimizer_state_dict(self.model, self.opt, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.start_step = int(state["step"])
        log = self.out / LOG
        if log.is_file():
            self.history = [r for r in map(json.loads, log.read_text().splitlines()) if r["step"] <= self.start_step]

    # -- saving -----------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """step-NNNNNN/ written under a temporary name, renamed, `latest` pointed at it; old ones pruned.
        Every process takes part in gathering the state; process 0 writes."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        from pi0.checkpoint.save import save_checkpoint

        optimizer = get_optimizer_state_dict(self.model, self.opt,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        raw = self._trainable_state() if self.ema is not None or self.lora_names else None
        ema = None
        if self.ema is not None:  # the saved weights are the EMA's
            self._swap_ema()
            ema = self._trainable_state()
        weights = merge_lora(self._full_state(), self.model)
        if self.ema is not None:
            self._swap_ema()
        final = self.out / f"step-{step:06d}"
        if self.rank != 0:
            return final
        tmp = self.out / f".step-{step:06d}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_checkpoint({k: v.float().contiguous() for k, v in weights.items()}, self.config, tmp, "openpi",
                        extra_config=self._config_fields(step))
        write_assets(tmp, self.asset_id, self.state_stats, self.action_stats, self.tokenizer_path)
        if isinstance(self.pipeline, OpenpiFastPipeline):
            self.pipeline.fast.save(tmp / "fast_tokenizer")
        torch.save({"step": step, "args": self.args.to_dict(), "optimizer": optimizer, "params": raw, "ema": ema},
                   tmp / TRAIN_STATE)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        link = self.out / ".latest.partial"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(final.name)
        os.replace(link, self.out / "latest")
        steps = sorted(self.out.glob("step-*"))
        for old in steps[: max(0, len(steps) - self.args.keep)]:
            shutil.rmtree(old)
        return final

    @property
    def asset_id(self) -> str:
        return "+".join(Path(str(d).rstrip("/")).name for d in self.args.datasets) or "dataset"

    def _config_fields(self, step: int) -> dict[str, Any]:
        """What config.json carries beside the model: the features pi0.Policy's pipeline reads (cameras in slot
        order, state, action width, normalisation, the robot preset), and how the run was made."""
        ds = self.ds
        cams = {}
        for key in self.cameras:
            if key is not None:
                h, w, c = ds.shape(key)
                cams[key] = (c, h, w)
        state = ds.shape(STATE_KEY)[0] if STATE_KEY in ds.features else None
        keep = {k: v for k, v in self.init_meta.items()
                if k not in ("pi0", "input_features", "output_features", "robot_preset")}
        fields = feature_fields(cams, state, ds.shape(ACTION_KEY)[0], self.norm_mode, self.args.state_in_prompt,
                                self.robot.name if self.robot is not None else None)
        return {**keep, **fields, "pi0_train": {"dataset": self.args.dataset, "step": step, "cameras": self.cameras,
                                                "asset_id": self.asset_id, "args": self.args.to_dict()}}

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, callback: Callable[[int, dict[str, Any]], None] | None = None) -> Path | None:
        """Train from start_step to args.steps. Ctrl-C stops after the running step; the last complete
        checkpoint stays. Returns the last checkpoint written (None if none)."""
        a = self.args
        warmup = a.warmup if a.warmup is not None else min(1000, max(1, round(a.steps / 30)))
        final_lr = a.decay_lr if a.decay_lr is not None else a.lr / 10
        save_every = a.save_every or a.steps
        batches = StepBatches(self.data, self.start_step, a.steps, a.batch, self.rank, self.world, a.seed)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=a.workers,
                                             persistent_workers=False, prefetch_factor=2 if a.workers else None)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)
        bar = TrainProgress(a.steps, self.start_step, a.progress and self.rank == 0)
        last: Path | None = None
        log = (self.out / LOG).open("w") if self.rank == 0 else None
        if log is not None:
            for r in self.history:
                log.write(json.dumps(r) + "\n")
        t_last, step = time.perf_counter(), self.start_step
        try:
            for step_batch in loader:
                obs, targets = step_batch
                obs = obs.to(self.device, torch.float32)
                targets = {k: v.to(self.device) for k, v in targets.items()}
                lr = learning_rate(step, a.lr, warmup, a.steps, final_lr)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                with autocast:
                    loss = self.loss_module(obs, **targets)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, a.clip)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                    grad_norm = grad_norm.full_tensor()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                if self.ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - a.ema)
                step += 1
                loss_value = mean_over_ranks(loss.detach(), self.world)
                now = time.perf_counter()
                rec = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                       "seconds": now - t_last, "samples_per_s": a.batch / (now - t_last),
                       "peak_rss_gib": peak_rss_gib()}
                if self.device.type == "cuda":
                    rec["peak_gpu_gib"] = peak_gpu_gib(self.device)
                t_last = now
                self.history.append(rec)
                if log is not None and (step % a.log_every == 0 or step == a.steps or step == self.start_step + 1):
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                bar.update(rec)
                if step % save_every == 0 or step == a.steps:
                    last = self.save(step)
                    barrier(self.world)
                    if self.rank == 0:
                        plot_loss(self.history, self.out / "loss.png")
                if callback is not None:
                    callback(step, rec)
        except KeyboardInterrupt:
            self.say(f"pi0 train: interrupted after step {step}; the last complete checkpoint is "
                     f"{os.path.realpath(self.out / 'latest') if (self.out / 'latest').exists() else 'none'}")
        finally:
            bar.close()
            if log is not None:
                log.close()
        return last
