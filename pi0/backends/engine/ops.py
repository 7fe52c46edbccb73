"""The engine's float op set: every primitive the engine model calls, and so everything another backend of the same
design provides. Activations are [B, L, features]; norms keep fp32 statistics; attention softmax runs in fp32. A
weight that is not a float tensor (int8: `pi0.backends.engine.int8`) brings its own ops, which these hand it."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from pi0.backends.engine.kernels import compiled, gated_gelu_eager
from pi0.model.functional import MASK_VALUE


@functools.cache
def packing_works(dtype: torch.dtype, device_type: str) -> tuple[bool, str]:
    """Can weights of `dtype` be kept in oneDNN's blocked layout here? Probed once by packing a small
    weight and checking the product against F.linear (oneDNN refuses bf16 packing on CPUs without
    avx512bw/vl/dq or avx_ne_convert, e.g. AVX2-only ones)."""
    if device_type != "cpu" or not torch.backends.mkldnn.is_available():
        return False, f"no oneDNN weight packing on {device_type}"
    if dtype not in (torch.bfloat16, torch.float32):
        return False, f"no oneDNN weight packing for {dtype}"
    w, x = torch.randn(64, 32).to(dtype), torch.randn(3, 32).to(dtype)
    try:
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 3), None, "none", [], "")
    except RuntimeError as e:
        return False, f"oneDNN cannot pack {dtype} weights here: {str(e).splitlines()[0]}"
    if not torch.allclose(got.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2):
        return False, f"oneDNN-packed {dtype} products disagree with F.linear here"
    return True, f"oneDNN-packed {dtype} weights"


def pack(w: Tensor, rows_hint: int, enabled: bool) -> Tensor:
    """A weight [out, in] in the layout `linear` runs fastest with. With `enabled` (decided once per engine
    by `packing_works`), oneDNN's blocked layout: 2-2.5x the GEMM rate of F.linear for the expert's 50-row
    products and ~10% for the prefix's 800-row ones, with the same results. Otherwise a plain tensor."""
    if enabled:
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows_hint)
    return w.contiguous()


def linear(x: Tensor, w: Tensor, b: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """x @ w.T (+ b) (+ residual) for float weights (plain or oneDNN-packed); another weight format computes its own
    (`w.linear`: int8, which also takes activations its producer already quantised for it)."""
    if not isinstance(w, Tensor):
        return w.linear(x, b, residual)
    if w.is_mkldnn:
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    else:
        out = F.linear(x, w, b)
    return out if residual is None else residual + out


def embedding(table: Tensor, ids: Tensor) -> Tensor:
    """Rows `ids` of an embedding table (another weight format: its own `embedding`)."""
    if not isinstance(table, Tensor):
        return table.embedding(ids)
    return table[ids]


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Gemma RMSNorm in fp32; `weight` is the stored w already turned into (1 + w), fp32. Returns fp32."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps)


def ada_rms_norm(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> Tensor:
    """pi0.5 adaptive RMSNorm: rms(x) * (1 + scale) + shift, in fp32. scale/shift [B, 1, W] fp32."""
    return torch.addcmul(shift, F.rms_norm(x.float(), (x.shape[-1],), None, eps), 1 + scale)


def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def gated_gelu(gate_up: Tensor, fused: bool) -> Tensor:
    """[.., 2M] fused gate|up projection -> gelu_tanh(gate) * up [.., M]; `fused`: the compiled kernel
    (decided once per engine by `fusion_works`), else eager ops."""
    if not fused:
        return gated_gelu_eager(gate_up)
    out = compiled("gated_gelu")(gate_up.reshape(-1, gate_up.shape[-1]))  # 2-D, as the int8 path calls it
    return out.view(*gate_up.shape[:-1], out.shape[-1])


def linear_gated_gelu(x: Tensor, w: Tensor, fused: bool, then: Tensor | None = None) -> Tensor:
    """gated_gelu(linear(x, w)) for the fused gate|up weight; `then` is the weight the result feeds (the down
    projection), for a weight format that prepares its input for it (`w.gated_gelu_of`: int8)."""
    if not isinstance(w, Tensor):
        return w.gated_gelu_of(x, then)
    return gated_gelu(linear(x, w), fused)


def linear_gelu(x: Tensor, w: Tensor, b: Tensor, then: Tensor | None = None) -> Tensor:
    """gelu_tanh(linear(x, w, b)) (SigLIP's fc1); `then`: the weight it feeds (fc2), as in `linear_gated_gelu`."""
    if not isinstance(w, Tensor):
        return w.gelu_of(x, b, then)
    return gelu_tanh(linear(x, w, b))


def rms_norm_for(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype, w: Tensor) -> Tensor:
    """rms_norm(x).to(dtype), the input of the linear weight w (a weight of another format prepares its own input:
    `w.rms_norm_input`)."""
    if not isinstance(w, Tensor):
        return w.rms_norm_input(x, weight, eps, dtype)
    return rms_norm(x, weight, eps).to(dtype)


def layer_norm_for(x: Tensor, weight: Tensor, bias: Tensor, eps: float, w: Tensor) -> Tensor:
    """layer_norm(x), the input of the linear weight w (another format: `w.layer_norm_input`)."""
    if not isinstance(w, Tensor):
        return w.layer_norm_input(x, weight, bias, eps)
    return layer_norm(x, weight, bias, eps)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, L, heads, D]."""
    d = x.shape[-1] // 2
    rotated = torch.cat([-x[..., d:], x[..., :d]], dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """Attention where every query sees every valid key; q is pre-scaled by head_dim^-0.5.
    q [B, Lq, H, D]; k, v [B, K, Lk, D]; key_mask bool [B, Lk] or None -> [B, Lq, H*D].
    With one kv head (Gemma's multi-query attention) the H*Lq queries are one matrix against the shared
    keys: two GEMMs and an fp32 softmax, no copies of k or v."""
    b, lq, h, d = q.shape
    kv_heads = k.shape[1]
    if kv_heads == 1:
        scores = torch.bmm(q.reshape(b, lq * h, d), k[:, 0].transpose(1, 2))  # [B, Lq*H, Lk]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], MASK_VALUE)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.bmm(probs, v[:, 0]).view(b, lq, h * d)
    g = h // kv_heads
    mask = None if key_mask is None else key_mask[:, None, None, :]
    qg = q.view(b, lq, kv_heads, g, d).permute(0, 2, 1, 3, 4).reshape(b, kv_heads, lq * g, d)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=1.0)
    return out.view(b, kv_heads, lq, g, d).permute(0, 2, 1, 3, 4).reshape(b, lq, h * d)


def mha(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain multi-head self-attention, no mask. q, k, v [B, L, H, D] -> [B, L, H*D]."""
    b, n, h, d = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, n, h * d)
