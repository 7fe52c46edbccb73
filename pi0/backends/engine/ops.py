"""The engine's primitive ops, all in one place: another accelerator backend (e.g. TTNN) replaces
this module. Activations are [B, L, features]; norms keep fp32 statistics; attention softmax runs
in fp32."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pi0.model.functional import MASK_VALUE, rope_inv_freq
from pi0.hardware import int8_isa


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


def linear(x: Tensor | Quantized, w: Tensor | Int8Weight, b: Tensor | None = None,
           residual: Tensor | None = None) -> Tensor:
    """x @ w.T (+ b) (+ residual): float weights (plain or oneDNN-packed), or int8 ones (`int8_linear`, which
    also takes activations its producer already quantised for w)."""
    if isinstance(w, Int8Weight):
        return int8_linear(x, w, b, residual)
    if w.is_mkldnn:
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    else:
        out = F.linear(x, w, b)
    return out if residual is None else residual + out


def embedding(table: Tensor | Int8Weight, ids: Tensor) -> Tensor:
    """Rows `ids` of an embedding table (float, or int8 with one scale per row)."""
    if isinstance(table, Int8Weight):
        return (table.q[ids].float() * table.scale[ids, None]).to(table.dtype)
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


_GELU_C = 2 * math.sqrt(2 / math.pi)
_TINY = torch.finfo(torch.float32).tiny


def _gated_gelu_eager(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def _gated_gelu_fused(gate_up: Tensor, row_scale: Tensor | None = None) -> Tensor:
    # gelu_tanh(g) = g * sigmoid(2 * sqrt(2/pi) * (g + 0.044715 g^3)), in fp32, rounded once;
    # row_scale [M, 1]: an int8 product's token scales, applied here instead of in a pass of their own
    gate, up = gate_up.chunk(2, dim=-1)
    g, u = gate.float(), up.float()
    if row_scale is not None:
        g, u = g * row_scale, u * row_scale
    return (g * torch.sigmoid(_GELU_C * (g + 0.044715 * g * g * g)) * u).to(gate_up.dtype)


def _quantize_rows(x: Tensor, offset: int, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: x [M, K] -> round(x / s) + offset (int8 for offset 0, uint8 for 128) and
    s = max|x_row| / qmax, fp32 [M, 1]."""
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(_TINY)
    q = torch.round(xf / s).clamp(-qmax, qmax) + offset
    return q.to(torch.uint8 if offset else torch.int8), s


def _rescale(y: Tensor, row_scale: Tensor, col_scale: Tensor | None, bias: Tensor | None, dtype: torch.dtype,
             residual: Tensor | None = None) -> Tensor:
    """An int8 product's epilogue: y * row_scale [M, 1] (* col_scale [N]) (+ bias) (+ residual [M, N]), in fp32,
    rounded to dtype once."""
    out = y.float() * row_scale
    if col_scale is not None:
        out = out * col_scale
    if bias is not None:
        out = out + bias.float()
    if residual is not None:
        out = out + residual.float()
    return out.to(dtype)


def _rescale_add(y: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor, dtype: torch.dtype,
                 residual: Tensor) -> Tensor:
    """`_rescale` with a residual (compiled apart: each compiled function keeps to one form per dtype)."""
    return _rescale(y, row_scale, col_scale, bias, dtype, residual)


# The producers of an int8 product's input, each quantising it per token in the same kernel (one pass over memory
# instead of two or three, one call instead of several): the norms before q/k/v, gate|up and fc1, the gelus before
# down and fc2. Each rounds to the float dtype first, as the unfused ops do.

def _rms_norm_quantize(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype, offset: int) -> tuple[Tensor, Tensor]:
    return _quantize_rows(F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(dtype), offset)


def _layer_norm_quantize(x: Tensor, weight: Tensor, bias: Tensor, eps: float, offset: int) -> tuple[Tensor, Tensor]:
    return _quantize_rows(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), offset)


def _rescale_gelu_quantize(y: Tensor, row_scale: Tensor, bias: Tensor, dtype: torch.dtype,
                           offset: int) -> tuple[Tensor, Tensor]:
    # fc1's epilogue (token scales, bias), SigLIP's gelu, and fc2's quantisation
    return _quantize_rows(F.gelu(_rescale(y, row_scale, None, bias, dtype), approximate="tanh"), offset)


def _gated_gelu_quantize(gate_up: Tensor, row_scale: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    # gate|up's token scales, the gated gelu, and down's quantisation
    return _quantize_rows(_gated_gelu_fused(gate_up, row_scale), offset)


def _quantize_weight_rows(w: Tensor, offset: int, qmax: int) -> tuple[Tensor, Tensor]:
    """`_quantize_rows` for weights at load: compiled and probed apart from the activations' (the file's dtype,
    offset 0, qmax 63 / 127) and a code object of its own, so their compiled variants never share one cache."""
    return _quantize_rows(w, offset, qmax)


_FUSED = {"gated_gelu": _gated_gelu_fused, "quantize_rows": _quantize_rows, "rescale": _rescale, "rescale_add": _rescale_add,
          "quantize_weight": _quantize_weight_rows, "rms_norm_quantize": _rms_norm_quantize,
          "layer_norm_quantize": _layer_norm_quantize, "rescale_gelu_quantize": _rescale_gelu_quantize,
          "gated_gelu_quantize": _gated_gelu_quantize}
INT8_FUSED = ("quantize_rows", "rescale", "rescale_add", "rms_norm_quantize", "layer_norm_quantize", "rescale_gelu_quantize",
              "gated_gelu_quantize")  # what an int8 engine runs compiled, where each probe passes
_compiled_fns: dict[str, object] = {}


def _compiled(name: str) -> object:
    """torch.compile of one of the `_FUSED` functions (one vectorised loop instead of a pass per op), called on
    detached aliases of its tensors: a view's base (e.g. [B, L, K] under an [B*L, K] input) is nothing to these
    kernels, but Dynamo would guard on its layout and compile again for each one, up to its recompile limit, and
    then run eager ops without a word."""
    if name not in _compiled_fns:
        fn = torch.compile(_FUSED[name], dynamic=True)
        _compiled_fns[name] = lambda *args: fn(*(a.detach() if isinstance(a, Tensor) else a for a in args))
    return _compiled_fns[name]


def _run(name: str, fused: frozenset[str], *args):
    return _compiled(name)(*args) if name in fused else _FUSED[name](*args)


def _fusion_checks(dtype: torch.dtype, device_type: str, offset: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 7, 2 * 99, generator=g).to(device_type).to(dtype)
    x2 = torch.randn(37, 99, generator=g).to(device_type).to(dtype)
    rs, cs = torch.rand(37, 1, generator=g).to(device_type), torch.rand(99, generator=g).to(device_type)
    nw = (1 + torch.rand(99, generator=g)).to(device_type)  # a norm's gain, fp32 as the engine stores (1 + w)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5

    def close(a: Tensor, b: Tensor) -> bool:
        return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)

    def quantized_as(want: Tensor, *form):
        """The compiled (q, s) against eager ops': the same scales, levels at most one apart (a value the two
        round on either side of a .5 boundary; where the float dtype's rounding moved a value, one level)."""
        def check(got) -> bool:
            q, sc = _quantize_rows(want, *form)
            return (got[0].dtype == q.dtype and torch.allclose(got[1], sc, rtol=tol)
                    and (got[0].int() - q.int()).abs().max().item() <= 1)
        return check

    gu = x2.repeat(1, 2)
    i32 = torch.randint(-2**20, 2**20, x2.shape, generator=g, dtype=torch.int32).to(device_type)
    eps = 1e-6
    return {  # name: [(arguments, check of the compiled result), ...]: every form that runs
        "gated_gelu": [((x,), lambda got: close(got, _gated_gelu_eager(x))),
                       # an int8 product's, with its token scales applied inside the gelu
                       ((gu, rs), lambda got: close(got, _gated_gelu_eager((gu.float() * rs).to(dtype))))],
        # activations: u8 with zero point 128 (oneDNN) or s8 (_int_mm, plain); weights: s8, 8- or 7-bit
        "quantize_rows": [((x2, offset), quantized_as(x2, offset))],
        "quantize_weight": [((x2, 0, 127), quantized_as(x2, 0, 127)), ((x2, 0, 63), quantized_as(x2, 0, 63))],
        # the epilogues, every operand a tensor (`_epilogue`); _int_mm's int32 products too
        "rescale": [((x2, rs, cs, cs, dtype), lambda got: close(got, _rescale(x2, rs, cs, cs, dtype)))] + (
            [((i32, rs, cs, cs, dtype), lambda got: close(got, _rescale(i32, rs, cs, cs, dtype)))] if offset == 0 else []),
        "rescale_add": [((x2, rs, cs, cs, dtype, x2), lambda got: close(got, _rescale(x2, rs, cs, cs, dtype) + x2))],
        "rms_norm_quantize": [((x2, nw, eps, dtype, offset),
                               quantized_as(rms_norm(x2, nw, eps).to(dtype), offset))],
        "layer_norm_quantize": [((x2, nw.to(dtype), cs.to(dtype), eps, offset),
                                 quantized_as(layer_norm(x2, nw.to(dtype), cs.to(dtype), eps), offset))],
        "rescale_gelu_quantize": [((x2, rs, cs, dtype, offset),
                                   quantized_as(gelu_tanh(_rescale(x2, rs, None, cs, dtype)), offset))],
        "gated_gelu_quantize": [((gu, rs, offset),
                                 quantized_as(_gated_gelu_eager((gu.float() * rs).to(dtype)), offset))],
    }


@functools.cache
def fusion_works(dtype: torch.dtype, device_type: str, name: str = "gated_gelu", offset: int = 128) -> tuple[bool, str]:
    """Does torch.compile build the fused kernel `name` here (the gated gelu: 3.3x; int8 quantisation and
    rescaling: 7x / 30x fewer seconds than eager ops on the prefix)? Probed once per dtype, device type,
    kernel and activation zero point (`offset`: 128 for oneDNN, 0 for the others) by compiling it and checking it
    against eager ops on odd sizes (the vector loops' tails too); it fails without a C++ compiler (CPU) or
    Triton (GPU), and miscompiles on some (torch 2.13 held to AVX2)."""
    label = name.replace("_", " ")
    try:
        with torch.no_grad():  # as the engine runs them (grad mode is part of what Dynamo compiles for)
            good = all(ok(_compiled(name)(*args)) for args, ok in _fusion_checks(dtype, device_type, offset)[name])
    except Exception as e:  # noqa: BLE001 - any compiler failure means eager ops
        return False, f"torch.compile failed here ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return (True, f"torch.compile'd {label}") if good else (False, f"the compiled {label} disagrees with eager ops here")


def gated_gelu(gate_up: Tensor, fused: bool) -> Tensor:
    """[.., 2M] fused gate|up projection -> gelu_tanh(gate) * up [.., M]; `fused`: the compiled kernel
    (decided once per engine by `fusion_works`), else eager ops."""
    if not fused:
        return _gated_gelu_eager(gate_up)
    out = _compiled("gated_gelu")(gate_up.reshape(-1, gate_up.shape[-1]))  # 2-D, as the int8 path calls it
    return out.view(*gate_up.shape[:-1], out.shape[-1])


def linear_gated_gelu(x: Tensor | Quantized, w: Tensor | Int8Weight, fused: bool,
                      then: Tensor | Int8Weight | None = None) -> Tensor | Quantized:
    """gated_gelu(linear(x, w)) for the fused gate|up weight; an int8 product's token scales are applied inside
    the gelu instead of in a pass over the (widest) activations of their own, and where `then` (the down
    projection) is int8 too, the gelu's output is quantised for it in the same kernel."""
    if not isinstance(w, Int8Weight):
        return gated_gelu(linear(x, w), fused)
    lead = _lead(x)
    y, s, side = _int8_product(_rows(x), w)
    if side is not None:  # the outlier channels' product joins before the gelu
        y = (_rescale(y, s, None, None, torch.float32) + side.float()).to(w.dtype)
        return gated_gelu(y, "gated_gelu" in w.fused).view(*lead, y.shape[-1] // 2)
    if _quantizes_for(then, "gated_gelu_quantize"):
        return Quantized(*_compiled("gated_gelu_quantize")(y, s, _offset(then)), lead)
    return _run("gated_gelu", w.fused, y, s).view(*lead, y.shape[-1] // 2)


def linear_gelu(x: Tensor | Quantized, w: Tensor | Int8Weight, b: Tensor,
                then: Tensor | Int8Weight | None = None) -> Tensor | Quantized:
    """gelu_tanh(linear(x, w, b)) (SigLIP's fc1); where w and `then` (fc2) are int8, fc1's epilogue, the gelu and
    fc2's quantisation run as one compiled kernel."""
    if isinstance(w, Int8Weight) and w.outlier_cols is None and _quantizes_for(then, "rescale_gelu_quantize"):
        y, s, _ = _int8_product(_rows(x), w)
        return Quantized(*_compiled("rescale_gelu_quantize")(y, s, b.float(), w.dtype, _offset(then)), _lead(x))
    return gelu_tanh(linear(x, w, b))


def rms_norm_for(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype,
                 w: Tensor | Int8Weight) -> Tensor | Quantized:
    """rms_norm(x).to(dtype), the input of the linear weight w; for an int8 w, quantised for it in the same
    compiled kernel."""
    if _quantizes_for(w, "rms_norm_quantize"):
        return Quantized(*_compiled("rms_norm_quantize")(_rows(x), weight, eps, dtype, _offset(w)), _lead(x))
    return rms_norm(x, weight, eps).to(dtype)


def layer_norm_for(x: Tensor, weight: Tensor, bias: Tensor, eps: float, w: Tensor | Int8Weight) -> Tensor | Quantized:
    """layer_norm(x), the input of the linear weight w; for an int8 w, quantised for it in the same compiled
    kernel."""
    if _quantizes_for(w, "layer_norm_quantize"):
        return Quantized(*_compiled("layer_norm_quantize")(_rows(x), weight, bias, eps, _offset(w)), _lead(x))
    return layer_norm(x, weight, bias, eps)


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


# ---------------------------------------------------------------------------------------------
# int8: dynamic W8A8 linears (per-output-channel int8 weights, per-token int8 activations)

INT8_KERNELS = ("onednn", "int_mm", "plain")


@dataclass
class Int8Weight:
    """A linear weight w [out, in] as w ~ q * scale[:, None]: symmetric int8 with one fp32 scale per output
    channel, made once at load. `dtype`: the float dtype the layer's inputs and outputs are in. After
    `pack_int8`, `q` is in the layout of `kernel`: "onednn" (oneDNN's packed s8 weight), "int_mm"
    ([in, out] view for torch._int_mm) or "plain" (int8 [out, in], dequantised at each call)."""

    q: Tensor
    scale: Tensor  # fp32 [out]
    dtype: torch.dtype
    kernel: str = "plain"
    fused: frozenset[str] = frozenset()  # the `_FUSED` kernels compiled for it (`fusion_works`)
    # outlier input channels, computed in the float dtype instead (LLM.int8()'s decomposition): their indices
    # (long [k]) and those columns of the weight ([out, k] in `dtype`); q holds zeros there
    outlier_cols: Tensor | None = None
    outlier_w: Tensor | None = None


def quantize_weight(w: Tensor, dtype: torch.dtype | None = None, qmax: int = 127,
                    outlier_cols: Tensor | None = None, compiled: bool = False) -> Int8Weight:
    """[out, in] float -> Int8Weight: scale = max|w_row| / qmax per output row, q = round(w / scale), in fp32,
    a block of rows at a time (the embedding's 0.5 G values would otherwise need 2 GB per fp32 temporary).
    qmax 63 where the kernel would saturate with 8-bit weights (`int8_kernel`). outlier_cols: input channels kept
    out of the int8 product (and out of the row scales), their columns stored in `dtype`. compiled: quantise with
    the compiled kernel (only where `fusion_works(w.dtype, "cpu", "quantize_weight")` passed)."""
    step = max(1, (1 << 22) // max(1, w.shape[1]))
    return quantize_blocks(w.split(step), tuple(w.shape), dtype or w.dtype, qmax, outlier_cols, compiled)


def quantize_blocks(blocks: Iterable[Tensor], shape: tuple[int, ...], dtype: torch.dtype, qmax: int = 127,
                    outlier_cols: Tensor | None = None, compiled: bool = False) -> Int8Weight:
    """`quantize_weight` of a weight [out, in] that arrives as consecutive blocks of whole rows (any float dtype;
    a block may be reused by its producer once the next is asked for): the loader streams big weights from the
    file this way, so their float values are never held at once. Per-row scales make the result the same for
    any split into blocks."""
    cols = outlier_cols if outlier_cols is not None and outlier_cols.numel() else None
    q = torch.empty(shape, dtype=torch.int8)
    scale = torch.empty(shape[0], dtype=torch.float32)
    side = None if cols is None else torch.empty(shape[0], cols.numel(), dtype=dtype)
    fn = _compiled("quantize_weight") if compiled else _quantize_rows
    r = 0
    for block in blocks:
        n = block.shape[0]
        assert r + n <= shape[0], f"quantize_blocks: blocks hold over {r + n} rows, the weight {shape[0]}"
        if cols is not None:
            side[r:r + n] = block[:, cols]
            block = block.index_fill(1, cols, 0.0)
        with torch.no_grad():  # as probed, whatever the caller's grad mode
            q[r:r + n], s = fn(block, 0, qmax)
        scale[r:r + n] = s[:, 0]
        r += n
    assert r == shape[0], f"quantize_blocks: blocks hold {r} rows, the weight {shape[0]}"
    return Int8Weight(q, scale, dtype, outlier_cols=cols, outlier_w=side)


def cat_rows(ws: list) -> Tensor | Int8Weight:
    """Weights stacked along their output rows (fused QKV, gate|up): per-row scales make quantising the parts
    and then stacking them the same as quantising the stack."""
    if all(isinstance(w, Tensor) for w in ws):
        return torch.cat(ws)
    if not all(isinstance(w, Int8Weight) and w.kernel == "plain" for w in ws):
        raise TypeError("cat_rows: mixed float / int8 (or already packed) weights")
    cols = ws[0].outlier_cols
    if not all(w.outlier_cols is None if cols is None else w.outlier_cols is not None and torch.equal(w.outlier_cols, cols)
               for w in ws):
        raise ValueError("cat_rows: weights that read the same input have different outlier channels")
    outlier_w = None if cols is None else torch.cat([w.outlier_w for w in ws])
    return Int8Weight(torch.cat([w.q for w in ws]), torch.cat([w.scale for w in ws]), ws[0].dtype,
                      outlier_cols=cols, outlier_w=outlier_w)


def scale_rows(w: Tensor | Int8Weight, c: float) -> Tensor | Int8Weight:
    """c * w (the attention scale folded into W_q): for int8, into the per-row scales (and outlier columns)."""
    if isinstance(w, Int8Weight):
        outlier_w = None if w.outlier_w is None else (w.outlier_w.float() * c).to(w.outlier_w.dtype)
        return dataclasses.replace(w, scale=w.scale * c, outlier_w=outlier_w)
    return (w.float() * c).to(w.dtype)


@dataclass
class Quantized:
    """Activations [*lead, K] already quantised per token for an int8 weight by the kernel that made them (a
    norm, a gelu): q [M, K] in that weight's activation form (`_offset`), s [M, 1] fp32."""

    q: Tensor
    s: Tensor
    lead: tuple[int, ...]


def activation_offset(kernel: str) -> int:
    """The activations' zero point for an int8 kernel: u8 around 128 for oneDNN, s8 otherwise."""
    return 128 if kernel == "onednn" else 0


def _offset(w: Int8Weight) -> int:
    return activation_offset(w.kernel)


def _quantizes_for(w: Tensor | Int8Weight | None, name: str) -> bool:
    """Can w's input be quantised by its producer (compiled kernel `name`)? Only for an int8 w without outlier
    channels (their float columns need the float input), where that kernel's probe passed."""
    return isinstance(w, Int8Weight) and w.outlier_cols is None and name in w.fused


def _rows(x: Tensor | Quantized) -> Tensor | Quantized:
    return x if isinstance(x, Quantized) else x.reshape(-1, x.shape[-1])


def _lead(x: Tensor | Quantized) -> tuple[int, ...]:
    return x.lead if isinstance(x, Quantized) else tuple(x.shape[:-1])


def _int8_product(x: Tensor | Quantized, w: Int8Weight) -> tuple[Tensor, Tensor, Tensor | None]:
    """x [M, K] float -> (y, s, side): y[m, n] = scale[n] * sum_k round(x[m, k] / s[m]) q[n, k] in w.dtype, the
    token scales s [M, 1] fp32 still to be applied (by `int8_linear` or inside the consumer, `linear_gated_gelu`),
    and the float product of the outlier channels (None without), to be added after them. The outlier channels
    are zeroed before the token scales are taken, so they cost the other channels no precision."""
    side = None
    if isinstance(x, Quantized):  # by its producer, for this weight (`_quantizes_for`)
        assert w.outlier_cols is None, "activations quantised for an int8 weight with outlier channels"
        xq, s = x.q, x.s
    else:
        if w.outlier_cols is not None:
            side = F.linear(x.index_select(1, w.outlier_cols), w.outlier_w)
            x = x.index_fill(1, w.outlier_cols, 0)
        xq, s = _run("quantize_rows", w.fused, x, _offset(w))
    y = int8_matmul(xq, w)
    if w.kernel == "int_mm":
        y = _epilogue(w, y, torch.ones_like(s), w.scale, None, None)
    return y, s, side


def _epilogue(w: Int8Weight, y: Tensor, row_scale: Tensor, col_scale: Tensor | None, bias: Tensor | None,
              residual: Tensor | None) -> Tensor:
    """`_rescale` of w's product, every absent operand a tensor (ones / zeros: a few KB), so each compiled epilogue
    keeps to one form per dtype."""
    n, dev = y.shape[-1], y.device
    col = _constant(1.0, n, dev) if col_scale is None else col_scale
    b = _constant(0.0, n, dev) if bias is None else bias.float()
    if residual is None:
        return _run("rescale", w.fused, y, row_scale, col, b, w.dtype)
    return _run("rescale_add", w.fused, y, row_scale, col, b, w.dtype, residual)


@functools.cache
def _constant(value: float, n: int, device: torch.device) -> Tensor:
    return torch.full((n,), value, device=device)


def int8_matmul(xq: Tensor, w: Int8Weight) -> Tensor:
    """The raw product of already quantised activations (uint8 with zero point 128 for oneDNN, else int8) and
    an int8 weight in its kernel's layout: oneDNN applies the weight scales in its epilogue (-> w.dtype),
    torch._int_mm returns int32, "plain" dequantised fp32 math (-> w.dtype)."""
    if w.kernel == "onednn":  # u8 activations with zero point 128: oneDNN's JIT int8 kernels on AVX2 too
        return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 128, w.q, w.scale, _zero_points(w.scale.numel()), None,
                                                  1.0, 0, w.dtype, "none", [], "")
    if w.kernel == "int_mm":
        return torch._int_mm(xq, w.q)
    return (F.linear(xq.float(), w.q.float()) * w.scale).to(w.dtype)


@functools.cache
def _zero_points(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.long)


def int8_linear(x: Tensor | Quantized, w: Int8Weight, b: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """Dynamic W8A8: x [..., K] quantised per token (or already, by its producer), int32 accumulation in the
    kernel, the weight scales applied in its epilogue and the token scales, bias and residual [..., N] after
    it, in one pass. Returns [..., N] in w.dtype."""
    lead = _lead(x)
    y, s, side = _int8_product(_rows(x), w)
    r = None if residual is None else residual.reshape(-1, y.shape[-1])
    if side is not None:
        out = _rescale(y, s, None, b, torch.float32) + side.float()
        return (out if r is None else out + r.float()).to(w.dtype).view(*lead, y.shape[-1])
    return _epilogue(w, y, s, None, b, r).view(*lead, y.shape[-1])


def pack_int8(w: Int8Weight, rows_hint: int, kernel: str, fused: frozenset[str] = frozenset()) -> Int8Weight:
    """The weight in `kernel`'s layout (decided once per engine by `int8_kernel`); `fused`: the kernels to run
    compiled around its products (those `fusion_works` passed)."""
    if kernel == "onednn":
        q = torch.ops.onednn.qlinear_prepack(w.q.contiguous(), [rows_hint, w.q.shape[1]])
    elif kernel == "int_mm":
        q = w.q.contiguous().t()
    else:
        q, kernel = w.q.contiguous(), "plain"
    return dataclasses.replace(w, q=q, kernel=kernel, fused=fused)


def _probe_int8(kernel: str, dtype: torch.dtype, qmax: int, m: int, k: int, n: int) -> tuple[float, str]:
    """(seconds per product of [m, k] x [k, n], or inf, and why) for one kernel with weights quantised to
    +-qmax, after checking it on the worst case for saturation: every activation and weight at full scale
    (u8 x s8 kernels without VNNI sum pairs of products in int16: 2 * 255 * 127 overflows; fbgemm and oneDNN
    users reduce one side's range there). The check's reference is exact (integers below 2^24 in fp32)."""
    g = torch.Generator().manual_seed(0)
    sign = lambda *shape: torch.randint(0, 2, shape, generator=g).float() * 2 - 1  # noqa: E731
    x, w = sign(5, 64).to(dtype), sign(24, 64) * torch.linspace(0.5, 2, 24)[:, None]
    wq = quantize_weight(w, dtype, qmax)
    want = (F.linear(torch.round(x.float()), wq.q.float()) * wq.scale).to(dtype)
    try:
        got = int8_linear(x, pack_int8(wq, 5, kernel))
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        return math.inf, f"{kernel}: {str(e).splitlines()[0][:120]}"
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        return math.inf, f"{kernel}: wrong products with {qmax}-level weights here"
    big = pack_int8(quantize_weight(torch.randn(n, k), dtype, qmax), m, kernel)
    xb = torch.randn(m, k).to(dtype)
    int8_linear(xb, big)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        int8_linear(xb, big)
        best = min(best, time.perf_counter() - t)
    return best, f"{kernel}: {2 * m * k * n / best / 1e9:.0f} GOPS"


PATHOLOGICAL = 3.0  # a kernel this many times slower than dequantised fp32 math is ruled out (not raced)
SCREEN = 20.0  # x PATHOLOGICAL on a product 64x smaller: ruled out at once (a reference implementation, say, where
# the full-size measurement would take minutes); a kernel's fixed costs per call are far below this there


def slow_int8(kernel: str, dtype: torch.dtype, qmax: int) -> float | None:
    """How many times slower than the plain path `kernel` computes a small product ([64, 1024] x [1024, 64]) here,
    if that is over SCREEN x PATHOLOGICAL (else None): a kernel no CPU would choose, screened out in seconds."""
    plain = _probe_int8("plain", dtype, qmax, 64, 1024, 64)[0]
    t = _probe_int8(kernel, dtype, qmax, 64, 1024, 64)[0]
    ratio = t / plain
    return ratio if ratio > SCREEN * PATHOLOGICAL else None


@functools.cache
def int8_kernel(dtype: torch.dtype, device_type: str) -> tuple[str, int, str]:
    """(kernel, weight qmax, why) for the CPU it runs on, decided once, before weights are quantised, by capability:
    the weight range by the instruction set (8-bit weights with an int8 dot product — AMX, AVX-512 VNNI,
    AVX-VNNI —, 7-bit without one: u8 x s8 pairs summed in int16 overflow with full-range weights), then the
    kernels in a fixed order of preference — oneDNN's qlinear, torch._int_mm, "plain" (dequantised fp32 math) —
    the first one that computes exact products on saturating inputs and is not pathologically slow (over
    PATHOLOGICAL x the plain path) wins. The same machine makes the same choice on every run. Where the CPU's
    flags cannot be read, the weight range is found by the same saturation check. PI0_INT8_KERNEL=onednn|
    int_mm|plain forces the kernel."""
    forced = os.environ.get("PI0_INT8_KERNEL")
    if forced and forced not in INT8_KERNELS:
        raise ValueError(f"PI0_INT8_KERNEL={forced!r}: choose one of {', '.join(INT8_KERNELS)}")
    isa, dot = int8_isa()
    qmax = 127 if dot else 63
    where = f"{isa}: {'8' if dot else '7'}-bit weights" if isa else "no CPU flags"
    if forced == "plain":
        return "plain", qmax, f"PI0_INT8_KERNEL=plain; {where}"
    if device_type != "cpu":
        return "plain", 127, f"no int8 kernels on {device_type}"
    why = [where]
    plain_s = _probe_int8("plain", dtype, qmax, 64, 1024, 4096)[0]
    for kn in [forced] if forced else ["onednn", "int_mm"]:
        for q in ((qmax,) if isa else (127, 63)):
            t, msg = _probe_int8(kn, dtype, q, 8, 64, 64)  # the exactness check alone
            if not math.isinf(t):
                break
        if math.isinf(t):
            why.append(msg)
            continue
        slow = None if forced else slow_int8(kn, dtype, q)
        if slow is not None:
            why.append(f"{kn} ruled out: {slow:.0f}x slower than dequantised fp32 math on a small product")
            continue
        t, msg = _probe_int8(kn, dtype, q, 64, 1024, 4096)
        why.append(msg)
        if t > PATHOLOGICAL * plain_s and not forced:
            why.append(f"{kn} ruled out: {t / plain_s:.1f}x slower than dequantised fp32 math")
            continue
        return kn, q, f"int8 {kn}, {'8' if q == 127 else '7'}-bit weights ({'; '.join(why)})"
    if forced:
        raise ValueError(f"PI0_INT8_KERNEL={forced}: that kernel gives wrong products here ({'; '.join(why)})")
    return "plain", qmax, f"no int8 kernel works here ({'; '.join(why)})"
