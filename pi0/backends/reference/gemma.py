"""Gemma as the reference writes it: the VLM and the action expert, one shared attention per layer over both token
streams (RoPE, multi-query attention, pi0.5's adaptive norms)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from pi0.model.config import GemmaConfig
from pi0.model.functional import MASK_VALUE, rope_tables


class RMSNorm(nn.Module):
    """Gemma RMSNorm `rms(x) * (1 + w)`; with `cond_dim` (pi0.5 expert) adaptive:
    `scale, shift, gate = dense(cond)`, `rms(x) * (1 + scale) + shift`, and the gate for the residual."""

    def __init__(self, width: int, eps: float, cond_dim: int | None = None):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(width))
        else:
            self.dense = nn.Linear(cond_dim, 3 * width)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if not hasattr(self, "dense"):
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        if cond is None:
            raise ValueError("an adaptive RMSNorm (pi0.5 expert) needs the time conditioning `cond`")
        scale, shift, gate = self.dense(cond)[:, None, :].chunk(3, dim=-1)  # each [B, 1, W]
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate


def gated_residual(x: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:
    return x + y if gate is None else x + y * gate


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.rms_norm_eps, cond_dim)
        self.self_attn = GemmaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.rms_norm_eps, cond_dim)
        self.mlp = GemmaMLP(cfg)


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        if cfg.vocab_size:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(GemmaLayer(cfg, cond_dim) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.rms_norm_eps, cond_dim)


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate-half RoPE. x [B, L, heads, D], positions int [B, L]."""
    d = x.shape[-1]
    cos, sin = rope_tables(positions, d, theta, x.dtype)  # [B, L, 1, D]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, K, D], mask bool [B, Lq, Lk] -> [B, Lq, H*D]. Softmax in fp32."""
    b, lq, h, d = q.shape
    assert k.shape[1] == mask.shape[2], f"keys {k.shape[1]} != mask columns {mask.shape[2]}"
    assert lq == mask.shape[1], f"queries {lq} != mask rows {mask.shape[1]}"
    groups = h // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)  # kv head j serves q heads j*groups .. (j+1)*groups-1
    v = v.repeat_interleave(groups, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5
    logits = torch.where(mask[:, None], logits, MASK_VALUE)
    probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, h * d)


def joint_layer(
    layers: list[GemmaLayer],
    xs: list[Tensor],
    conds: list[Tensor | None],
    positions: Tensor,
    mask: Tensor,
    past_kv: tuple[Tensor, Tensor] | None = None,
) -> tuple[list[Tensor], tuple[Tensor, Tensor]]:
    """One transformer layer over several experts' token streams with one shared attention.
    xs[i] [B, L_i, W_i] uses layers[i]; the streams are concatenated along tokens for attention.
    past_kv: cached (k, v) [B, Lc, K, D] of earlier tokens, prepended to the keys (read, never grown).
    Returns the new streams and this call's post-RoPE (k, v)."""
    qs, ks, vs, gates = [], [], [], []
    for layer, x, cond in zip(layers, xs, conds, strict=True):
        b, n, _ = x.shape
        h, gate = layer.input_layernorm(x, cond)
        att = layer.self_attn
        qs.append(att.q_proj(h).view(b, n, -1, att.head_dim))  # [B, n, H, D]
        ks.append(att.k_proj(h).view(b, n, -1, att.head_dim))  # [B, n, K, D]
        vs.append(att.v_proj(h).view(b, n, -1, att.head_dim))
        gates.append(gate)
    q, k, v = torch.cat(qs, dim=1), torch.cat(ks, dim=1), torch.cat(vs, dim=1)
    assert q.shape[1] == positions.shape[1], f"tokens {q.shape[1]} != positions {positions.shape[1]}"
    theta = layers[0].self_attn.rope_theta
    q, k = rope(q, positions, theta), rope(k, positions, theta)
    new_kv = (k, v)
    if past_kv is not None:
        assert past_kv[0].shape[0] == k.shape[0], f"cache batch {past_kv[0].shape[0]} != batch {k.shape[0]}"
        k = torch.cat([past_kv[0], k], dim=1)
        v = torch.cat([past_kv[1], v], dim=1)
    out = attention(q, k, v, mask)

    outs, start = [], 0
    for layer, x, cond, gate in zip(layers, xs, conds, gates, strict=True):
        end = start + x.shape[1]
        x = gated_residual(x, layer.self_attn.o_proj(out[:, start:end]), gate)
        h2, gate2 = layer.post_attention_layernorm(x, cond)
        outs.append(gated_residual(x, layer.mlp(h2), gate2))
        start = end
    assert start == out.shape[1], f"streams cover {start} tokens, attention returned {out.shape[1]}"
    return outs, new_kv
