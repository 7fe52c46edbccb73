"""The engine's primitive ops, all in one place: another accelerator backend (e.g. TTNN) replaces
this module. Activations are [B, L, features]; norms keep fp32 statistics; attention softmax runs
in fp32."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pi0.functional import MASK_VALUE, rope_inv_freq


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


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


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


_GELU_C = 2 * math.sqrt(2 / math.pi)


def _gated_gelu_eager(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def _gated_gelu_fused(gate_up: Tensor) -> Tensor:
    # gelu_tanh(g) = g * sigmoid(2 * sqrt(2/pi) * (g + 0.044715 g^3)), in fp32, rounded once
    gate, up = gate_up.chunk(2, dim=-1)
    g = gate.float()
    return (g * torch.sigmoid(_GELU_C * (g + 0.044715 * g * g * g)) * up.float()).to(gate_up.dtype)


_compiled_gated_gelu = None


def _compiled() -> object:
    global _compiled_gated_gelu
    if _compiled_gated_gelu is None:
        _compiled_gated_gelu = torch.compile(_gated_gelu_fused, dynamic=True)
    return _compiled_gated_gelu


@functools.cache
def fusion_works(dtype: torch.dtype, device_type: str) -> tuple[bool, str]:
    """Does torch.compile build the fused gated gelu here (one vectorised loop instead of 3 passes over
    the MLP activations; 3.3x)? Probed once per dtype and device type by compiling it and checking it
    against eager ops; it fails without a C++ compiler (CPU) or Triton (GPU)."""
    x = torch.randn(3, 7, 2 * 99, device=device_type).to(dtype)  # odd sizes: the vector loops' tails too
    try:
        got = _compiled()(x)
    except Exception as e:  # noqa: BLE001 - any compiler failure means eager ops
        return False, f"torch.compile failed here ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    if not torch.allclose(got.float(), _gated_gelu_eager(x).float(), rtol=tol, atol=tol):
        return False, "the compiled gated gelu disagrees with eager ops here"
    return True, "torch.compile'd gated gelu"


def gated_gelu(gate_up: Tensor, fused: bool) -> Tensor:
    """[.., 2M] fused gate|up projection -> gelu_tanh(gate) * up [.., M]; `fused`: the compiled kernel
    (decided once per engine by `fusion_works`), else eager ops."""
    return _compiled()(gate_up) if fused else _gated_gelu_eager(gate_up)


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, L, 1, D] for rotate-half RoPE at integer positions [B, L] (computed in fp32)."""
    inv_freq = rope_inv_freq(head_dim, theta, positions.device)
    ang = positions.float()[..., None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)[:, :, None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


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
