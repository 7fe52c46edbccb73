"""Data-parallel training helpers: the process group under torchrun, FSDP sharding, and the collectives the loop
uses."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torchrun (process group started here), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard_model(model: nn.Module) -> None:
    """FSDP (fully_shard) over the processes: every module that holds parameters and is called becomes a unit
    (the reference model calls its Linear / norm modules inside shared-attention layers, not the layers), SigLIP
    as one unit for the patch and position embeddings it reads directly, and compute_loss runs the root's hooks."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    direct = {model.vision.patch_embedding, model.vision.position_embedding}
    for mod in reversed(list(model.modules())):
        if mod is not model and mod not in direct and any(True for _ in mod.parameters(recurse=False)):
            fully_shard(mod)
    fully_shard(model.vision)
    fully_shard(model)
    register_fsdp_forward_method(model, "compute_loss")


def mean_over_ranks(x: Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return float(x)


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
