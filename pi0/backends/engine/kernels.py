"""The engine's compiled kernels and their probes: the fused gated gelu, int8 quantisation and rescaling, and the
norms and gelus that quantise their output for an int8 product, each torch.compile'd once and checked against eager
ops on the machine before it is used."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

_GELU_C = 2 * math.sqrt(2 / math.pi)


_TINY = torch.finfo(torch.float32).tiny


def gated_gelu_eager(gate_up: Tensor) -> Tensor:
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


def quantize_rows(x: Tensor, offset: int, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: x [M, K] -> round(x / s) + offset (int8 for offset 0, uint8 for 128) and
    s = max|x_row| / qmax, fp32 [M, 1]."""
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(_TINY)
    q = torch.round(xf / s).clamp(-qmax, qmax) + offset
    return q.to(torch.uint8 if offset else torch.int8), s


def rescale(y: Tensor, row_scale: Tensor, col_scale: Tensor | None, bias: Tensor | None, dtype: torch.dtype,
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
    """`rescale` with a residual (compiled apart: each compiled function keeps to one form per dtype)."""
    return rescale(y, row_scale, col_scale, bias, dtype, residual)


def _rms_norm_quantize(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype, offset: int) -> tuple[Tensor, Tensor]:
    return quantize_rows(F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(dtype), offset)


def _layer_norm_quantize(x: Tensor, weight: Tensor, bias: Tensor, eps: float, offset: int) -> tuple[Tensor, Tensor]:
    return quantize_rows(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), offset)


def _rescale_gelu_quantize(y: Tensor, row_scale: Tensor, bias: Tensor, dtype: torch.dtype,
                           offset: int) -> tuple[Tensor, Tensor]:
    # fc1's epilogue (token scales, bias), SigLIP's gelu, and fc2's quantisation
    return quantize_rows(F.gelu(rescale(y, row_scale, None, bias, dtype), approximate="tanh"), offset)


def _gated_gelu_quantize(gate_up: Tensor, row_scale: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    # gate|up's token scales, the gated gelu, and down's quantisation
    return quantize_rows(_gated_gelu_fused(gate_up, row_scale), offset)


def _quantize_weight_rows(w: Tensor, offset: int, qmax: int) -> tuple[Tensor, Tensor]:
    """`quantize_rows` for weights at load: compiled and probed apart from the activations' (the file's dtype,
    offset 0, qmax 63 / 127) and a code object of its own, so their compiled variants never share one cache."""
    return quantize_rows(w, offset, qmax)


_FUSED = {"gated_gelu": _gated_gelu_fused, "quantize_rows": quantize_rows, "rescale": rescale, "rescale_add": _rescale_add,
          "quantize_weight": _quantize_weight_rows, "rms_norm_quantize": _rms_norm_quantize,
          "layer_norm_quantize": _layer_norm_quantize, "rescale_gelu_quantize": _rescale_gelu_quantize,
          "gated_gelu_quantize": _gated_gelu_quantize}


INT8_FUSED = ("quantize_rows", "rescale", "rescale_add", "rms_norm_quantize", "layer_norm_quantize", "rescale_gelu_quantize",
              "gated_gelu_quantize")  # what an int8 engine runs compiled, where each probe passes


_compiled_fns: dict[str, object] = {}


def compiled(name: str) -> object:
    """torch.compile of one of the `_FUSED` functions (one vectorised loop instead of a pass per op), called on
    detached aliases of its tensors: a view's base (e.g. [B, L, K] under an [B*L, K] input) is nothing to these
    kernels, but Dynamo would guard on its layout and compile again for each one, up to its recompile limit, and
    then run eager ops without a word."""
    if name not in _compiled_fns:
        fn = torch.compile(_FUSED[name], dynamic=True)
        _compiled_fns[name] = lambda *args: fn(*(a.detach() if isinstance(a, Tensor) else a for a in args))
    return _compiled_fns[name]


def run(name: str, fused: frozenset[str], *args):
    return compiled(name)(*args) if name in fused else _FUSED[name](*args)


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
            q, sc = quantize_rows(want, *form)
            return (got[0].dtype == q.dtype and torch.allclose(got[1], sc, rtol=tol)
                    and (got[0].int() - q.int()).abs().max().item() <= 1)
        return check

    gu = x2.repeat(1, 2)
    i32 = torch.randint(-2**20, 2**20, x2.shape, generator=g, dtype=torch.int32).to(device_type)
    eps = 1e-6
    return {  # name: [(arguments, check of the compiled result), ...]: every form that runs
        "gated_gelu": [((x,), lambda got: close(got, gated_gelu_eager(x))),
                       # an int8 product's, with its token scales applied inside the gelu
                       ((gu, rs), lambda got: close(got, gated_gelu_eager((gu.float() * rs).to(dtype))))],
        # activations: u8 with zero point 128 (oneDNN) or s8 (_int_mm, plain); weights: s8, 8- or 7-bit
        "quantize_rows": [((x2, offset), quantized_as(x2, offset))],
        "quantize_weight": [((x2, 0, 127), quantized_as(x2, 0, 127)), ((x2, 0, 63), quantized_as(x2, 0, 63))],
        # the epilogues, every operand a tensor (`_epilogue`); _int_mm's int32 products too
        "rescale": [((x2, rs, cs, cs, dtype), lambda got: close(got, rescale(x2, rs, cs, cs, dtype)))] + (
            [((i32, rs, cs, cs, dtype), lambda got: close(got, rescale(i32, rs, cs, cs, dtype)))] if offset == 0 else []),
        "rescale_add": [((x2, rs, cs, cs, dtype, x2), lambda got: close(got, rescale(x2, rs, cs, cs, dtype) + x2))],
        "rms_norm_quantize": [((x2, nw, eps, dtype, offset),
                               quantized_as(F.rms_norm(x2.float(), (99,), nw, eps).to(dtype), offset))],
        "layer_norm_quantize": [((x2, nw.to(dtype), cs.to(dtype), eps, offset),
                                 quantized_as(F.layer_norm(x2, (99,), nw.to(dtype), cs.to(dtype), eps), offset))],
        "rescale_gelu_quantize": [((x2, rs, cs, dtype, offset),
                                   quantized_as(F.gelu(rescale(x2, rs, None, cs, dtype), approximate="tanh"), offset))],
        "gated_gelu_quantize": [((gu, rs, offset),
                                 quantized_as(gated_gelu_eager((gu.float() * rs).to(dtype)), offset))],
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
            good = all(ok(compiled(name)(*args)) for args, ok in _fusion_checks(dtype, device_type, offset)[name])
    except Exception as e:  # noqa: BLE001 - any compiler failure means eager ops
        return False, f"torch.compile failed here ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return (True, f"torch.compile'd {label}") if good else (False, f"the compiled {label} disagrees with eager ops here")
