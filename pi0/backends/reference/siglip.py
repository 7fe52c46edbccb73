"""SigLIP So400m/14, the vision tower, as the reference writes it: plain fp32 modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from pi0.model.config import SiglipConfig
from pi0.model.functional import interpolate_position_embedding, patchify


def checkpointed(enabled: bool, fn, *args):
    """fn(*args); with `enabled` and gradients being taken, its activations are recomputed in the backward
    pass instead of kept (gradient checkpointing: the same numbers, less memory)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:  # [B, N, W]
        b, n, w = x.shape
        d = w // self.num_heads
        q, k, v = (p(x).view(b, n, self.num_heads, d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        logits = (q @ k.transpose(-1, -2)) * d**-0.5  # [B, H, N, N]
        probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, n, w)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVision(nn.Module):
    gradient_checkpointing = False

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.width)
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.depth))
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, images: Tensor) -> Tensor:  # [B, 3, S, S] in [-1, 1] -> [B, (S//p)^2, W]
        # the stride-p convolution as one linear map of the flattened patches (functional.patchify says why)
        patches, grid = patchify(images, self.patch_embedding.stride[0])  # [B, g*g, 3*p*p]
        x = F.linear(patches, self.patch_embedding.weight.flatten(1), self.patch_embedding.bias)  # [B, g*g, W]
        x = x + interpolate_position_embedding(self.position_embedding.weight, grid)
        for layer in self.layers:
            x = checkpointed(self.gradient_checkpointing, layer, x)
        return self.post_layernorm(x)
