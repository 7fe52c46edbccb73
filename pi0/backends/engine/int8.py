"""int8 in the engine: dynamic W8A8 linears (per-output-channel int8 weights, per-token int8 activations), the
weight format `Int8Weight` with its ops, and the choice of kernel for the CPU it runs on. The float op set
(`pi0.backends.engine.ops`) hands any weight that is not a float tensor to the weight's own methods, so the engine
model reads the same with int8 or without."""

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

from pi0.backends.engine import kernels
from pi0.backends.engine.kernels import compiled, rescale, run
from pi0.hardware import int8_isa

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

    # -- the ops on an int8 weight (what pi0.backends.engine.ops hands a weight that is not a float tensor) --------

    def linear(self, x: Tensor | Quantized, b: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        return int8_linear(x, self, b, residual)

    def embedding(self, ids: Tensor) -> Tensor:
        """Rows `ids` (one scale per row)."""
        return (self.q[ids].float() * self.scale[ids, None]).to(self.dtype)

    def gated_gelu_of(self, x: Tensor | Quantized, then: Tensor | Int8Weight | None) -> Tensor | Quantized:
        """gated_gelu(x @ self.T) for the fused gate|up weight: the token scales applied inside the gelu instead of
        in a pass over the (widest) activations of their own, and where `then` (the down projection) is int8 too,
        the gelu's output quantised for it in the same kernel."""
        from pi0.backends.engine.ops import gated_gelu

        lead = _lead(x)
        y, s, side = _int8_product(_rows(x), self)
        if side is not None:  # the outlier channels' product joins before the gelu
            y = (rescale(y, s, None, None, torch.float32) + side.float()).to(self.dtype)
            return gated_gelu(y, "gated_gelu" in self.fused).view(*lead, y.shape[-1] // 2)
        if _quantizes_for(then, "gated_gelu_quantize"):
            return Quantized(*compiled("gated_gelu_quantize")(y, s, _offset(then)), lead)
        return run("gated_gelu", self.fused, y, s).view(*lead, y.shape[-1] // 2)

    def gelu_of(self, x: Tensor | Quantized, b: Tensor, then: Tensor | Int8Weight | None) -> Tensor | Quantized:
        """gelu_tanh(x @ self.T + b) (SigLIP's fc1); where `then` (fc2) is int8 too, the epilogue, the gelu and fc2's
        quantisation run as one compiled kernel."""
        if self.outlier_cols is None and _quantizes_for(then, "rescale_gelu_quantize"):
            y, s, _ = _int8_product(_rows(x), self)
            return Quantized(*compiled("rescale_gelu_quantize")(y, s, b.float(), self.dtype, _offset(then)), _lead(x))
        return F.gelu(self.linear(x, b), approximate="tanh")

    def rms_norm_input(self, x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor | Quantized:
        """rms_norm(x).to(dtype) as this weight's input: quantised for it in the same compiled kernel where it can."""
        if _quantizes_for(self, "rms_norm_quantize"):
            return Quantized(*compiled("rms_norm_quantize")(_rows(x), weight, eps, dtype, _offset(self)), _lead(x))
        return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(dtype)

    def layer_norm_input(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor | Quantized:
        """layer_norm(x) as this weight's input: quantised for it in the same compiled kernel where it can."""
        if _quantizes_for(self, "layer_norm_quantize"):
            return Quantized(*compiled("layer_norm_quantize")(_rows(x), weight, bias, eps, _offset(self)), _lead(x))
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


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
    fn = kernels.compiled("quantize_weight") if compiled else kernels.quantize_rows
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
        xq, s = run("quantize_rows", w.fused, x, _offset(w))
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
        return run("rescale", w.fused, y, row_scale, col, b, w.dtype)
    return run("rescale_add", w.fused, y, row_scale, col, b, w.dtype, residual)


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
        out = rescale(y, s, None, b, torch.float32) + side.float()
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
