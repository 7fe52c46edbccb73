"""Build, load and save a pi0 / pi0.5 model with any backend: `build_model` (seeded random weights), `load_model`
(a checkpoint), `save_model`; the backends by name in `BACKENDS`."""

from __future__ import annotations

import importlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Callable

import torch

from pi0.checkpoint.info import CheckpointInfo
from pi0.checkpoint.load import inspect_checkpoint, load_state_dict
from pi0.checkpoint.save import save_checkpoint
from pi0.hardware import (
    compute_dtype,
    resolve_device,
    resolve_dtype,
    weights_allocation,
)
from pi0.model.backend import Backend, LoadHook
from pi0.model.config import Pi0Config
from pi0.model.fast_config import FastConfig, model_shapes

# name -> the module that builds it (`pi0.model.backend` says what such a module provides). A new backend is a
# package under pi0/backends/ with its spec.py, and a line here.
BACKENDS: dict[str, str] = {"reference": "pi0.backends.reference.spec", "engine": "pi0.backends.engine.spec",
                            "ttnn": "pi0.backends.ttnn.spec"}


def backend_spec(backend: str) -> ModuleType:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend])


def state_device(spec: ModuleType, device: str | torch.device) -> torch.device:
    """Where a backend has the canonical tensors loaded: its own `state_device(device)` (a backend whose device is
    no torch device loads them on the CPU and places them itself in `build`), else the torch device asked for."""
    return getattr(spec, "state_device", resolve_device)(device)


def backend_dtype(spec: ModuleType, dtype: str | torch.dtype, where: torch.device) -> tuple[torch.dtype, str]:
    """The dtype a backend computes in and why: its own `resolve_dtype(dtype, device)` (a backend whose formats are
    no torch dtype's, as TTNN's), else pi0.hardware's."""
    return getattr(spec, "resolve_dtype", resolve_dtype)(dtype, where)


_BLOCK = 1 << 22  # values per generator block in random_state_dict


def _init_rule(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) that keep activations O(1): linear/conv weights N(0, 1/fan_in), biases N(0, 0.02^2),
    LayerNorm weight 1 + N(0, 0.1^2), Gemma RMSNorm w (used as 1 + w) N(0, 0.1^2), embeddings N(0, 1/width)."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("embed_tokens.weight"):
        return 0.0, shape[1] ** -0.5
    if name.endswith("position_embedding.weight"):
        return 0.0, 0.1
    if "layer_norm" in name or "post_layernorm" in name:
        return (1.0, 0.1) if leaf == "weight" else (0.0, 0.02)
    if len(shape) == 1:
        return (0.0, 0.1) if leaf == "weight" else (0.0, 0.02)
    return 0.0, math.prod(shape[1:]) ** -0.5


def random_state_dict(config: Pi0Config | FastConfig, seed: int, dtype: torch.dtype, device: str | torch.device = "cpu",
                      progress: Callable[[float], None] | None = None,
                      hook: LoadHook | None = None) -> dict[str, torch.Tensor]:
    """Seeded random canonical weights, written directly into `dtype`, one tensor at a time (hook(name,
    tensor), if given, is applied to each as soon as it is filled). Each block of rows has its own generator
    (seeded by seed, tensor index, block index), so the values do not depend on the thread count, and the
    blocks are filled on all cores. Values are drawn in fp32 and rounded to `dtype`, so a bf16 build holds
    the bf16-rounded weights of the fp32 build with the same seed. The tensors `hook.first` picks, if it has
    that attribute, are made first; those its `streams` picks reach it as fp32 `RandomRows`, never whole."""
    shapes = sorted(model_shapes(config).items())
    total = sum(math.prod(s) for _, s in shapes)
    done = 0
    out = {}
    first = getattr(hook, "first", None)
    streams = getattr(hook, "streams", None)
    order = sorted(range(len(shapes)), key=lambda i: not first(shapes[i][0])) if first else range(len(shapes))
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for i in order:  # the values depend on the tensor's index in `shapes`, not on the order they are made in
            name, shape = shapes[i]
            rows = RandomRows(tuple(shape), seed * 2**40 + i * 2**20, *_init_rule(name, tuple(shape)), pool)
            if streams is not None and len(shape) >= 2 and streams(name):
                out[name] = hook(name, rows)  # fp32 blocks, as a loader streams an fp32 file
            else:
                t = torch.empty(shape, dtype=dtype, device=device)
                r0 = 0
                for block in rows:
                    t[r0:r0 + len(block)].copy_(block)
                    r0 += len(block)
                out[name] = t if hook is None else hook(name, t)
                del t
            done += math.prod(shape)
            if progress is not None:
                progress(done / total)
    return out


class RandomRows:
    """One seeded random tensor as consecutive fp32 blocks of whole rows (block j from its own generator, so the
    values depend neither on the thread count nor on how they are consumed), drawn a few blocks at a time on the
    pool's threads. `random_state_dict` copies them into a tensor of its dtype, or hands them to a hook that
    `streams` the tensor (int8 then quantises the fp32 values, as it does reading an fp32 file). Iterate once."""

    def __init__(self, shape: tuple[int, ...], seed: int, mean: float, std: float, pool: ThreadPoolExecutor):
        self.shape, self.dtype = shape, torch.float32
        self.seed, self.mean, self.std, self.pool = seed, mean, std, pool
        self.step = max(1, _BLOCK // max(1, math.prod(shape[1:])))

    def _block(self, j: int) -> torch.Tensor:
        r0 = j * self.step
        block = torch.empty((min(self.shape[0], r0 + self.step) - r0, *self.shape[1:]), dtype=torch.float32)
        return block.normal_(self.mean, self.std, generator=torch.Generator().manual_seed(self.seed + j))

    def __iter__(self):
        blocks = math.ceil(self.shape[0] / self.step)
        ahead = max(1, torch.get_num_threads())
        for j in range(0, blocks, ahead):
            yield from self.pool.map(self._block, range(j, min(blocks, j + ahead)))


def build_model(config: Pi0Config | FastConfig, *, backend: str = "reference", seed: int = 0,
                device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                progress: Callable[[float], None] | None = None) -> Backend:
    """A model with seeded random weights, allocated directly in `dtype` on `device`. dtype and device may
    be "auto" (pi0.hardware). progress: called with the fraction of parameters filled so far."""
    spec = backend_spec(backend)
    where = state_device(spec, device)
    dtype = backend_dtype(spec, dtype, where)[0]
    with weights_allocation():
        state = random_state_dict(config, seed, compute_dtype(dtype, where), where, progress,
                                  spec.load_hook(dtype, where))
        return spec.build(config, state, device)


def load_model(path_or_repo_id: str | os.PathLike, *, backend: str = "reference", device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "float32", action_horizon: int | None = None,
               progress: Callable[[float], None] | None = None, download: bool = False) -> Backend:
    """Load a checkpoint in any known layout (directory, .safetensors file, sharded, hub id, openpi Orbax
    directory or gs:// name in openpi's cache). dtype and device may be "auto" (pi0.hardware).
    action_horizon: override what config.json says (or openpi's default, 50, where there is none). download: fetch
    a hub id missing from the huggingface_hub cache (nothing is downloaded otherwise)."""
    info = inspect_checkpoint(path_or_repo_id, action_horizon=action_horizon, download=download)
    return load_from_info(info, backend=backend, dtype=dtype, device=device, progress=progress)


def load_from_info(info: CheckpointInfo, *, backend: str, dtype: str | torch.dtype, device: str | torch.device = "cpu",
                   progress: Callable[[float], None] | None = None) -> Backend:
    """The model of an already inspected checkpoint."""
    spec = backend_spec(backend)
    where = state_device(spec, device)
    dtype = backend_dtype(spec, dtype, where)[0]
    with weights_allocation():
        state = load_state_dict(info, compute_dtype(dtype, where), where, progress, spec.load_hook(dtype, where))
        model = spec.build(info.config, state, device)
    model.checkpoint_info = info
    return model


def save_model(model: Backend, directory: str | os.PathLike, layout: str = "openpi") -> None:
    """Write a model that holds its canonical tensors (the reference) in `layout` (default openpi-converted: 777
    tensors for pi0) with config.json."""
    if not hasattr(model, "state_dict"):
        raise ValueError(f"{type(model).__name__} keeps no canonical tensors to save: save the reference model of the "
                         "same weights (backend='reference')")
    save_checkpoint({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.config, directory, layout)
