"""Low-rank adapters (LoRA) on the reference model's linear layers, and their merge into plain weights.

A target `nn.Linear` W becomes `W x + (alpha / r) * B (A x)` with A [r, in] and B [out, r]; only A and B
train. A starts as PEFT starts it (Kaiming-uniform) and B at zero, so training starts from the base model
exactly. `merge_lora` folds `W + (alpha / r) * B @ A` back into the canonical layout, so a LoRA
fine-tune saves, loads and serves like any checkpoint.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

# LeRobot 0.6.1's default PEFT targets: the expert's q and v projections and the action / state / time
# projections that exist in the model (pi0.5 has no state_proj and no action_time_mlp)
EXPERT_TARGETS = r"expert\.layers\.\d+\.self_attn\.(q|v)_proj|state_proj|action_in_proj|action_out_proj|action_time_mlp_(in|out)"
# every projection of the VLM and the expert (openpi's gemma LoRA: attention and feed-forward)
ALL_TARGETS = r"(vlm|expert)\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
TARGET_SETS = {"expert": EXPERT_TARGETS, "all": ALL_TARGETS}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update of rank r, scaled by alpha / r."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:  # code that reads .weight (dtype, device) sees the base's
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def target_pattern(targets: str) -> re.Pattern:
    """"expert", "all" or a regular expression over module names (e.g. `vlm\\.layers\\.1[0-7]\\..*proj`)."""
    pattern = TARGET_SETS.get(targets, targets)
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--lora-targets {targets!r} is neither expert, all nor a valid regular expression: {e}") from e


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: str = "expert",
             seed: int = 0, exclude: list[str] = ()) -> list[str]:
    """Freeze `model` and wrap every nn.Linear whose name fully matches `targets` (and lies under none of
    `exclude`) in a LoRALinear (alpha defaults to rank: a scale of 1, as openpi's). Returns the wrapped names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    pattern = target_pattern(targets)
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)
             and not any(n == e or n.startswith(e + ".") for e in exclude)]
    if not names:
        raise ValueError(f"--lora-targets {targets!r} matches no linear layer of this model (names look like "
                         "expert.layers.0.self_attn.q_proj, vlm.layers.3.mlp.down_proj, action_out_proj)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, rank if alpha is None else alpha))
    return names


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """`state` (the model's full state dict) with every adapter of `model` folded into its base weight,
    W + (alpha / r) B A, under the base layer's own name: the canonical layout again."""
    scales = {n: m.scale for n, m in adapters(model).items()}
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("lora_a", "lora_b"):
            continue
        owner = module[: -len(".base")] if module.endswith(".base") else None
        if owner in scales:
            if leaf == "weight":
                delta = state[f"{owner}.lora_b"].float() @ state[f"{owner}.lora_a"].float() * scales[owner]
                t = (t.float() + delta.to(t.device)).to(t.dtype)
            name = f"{owner}.{leaf}"
        out[name] = t
    return out
