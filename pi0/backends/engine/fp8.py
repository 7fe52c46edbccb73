"""fp8 in the engine: e4m3 linear weights with one scale per output channel and activations with a dynamic scale per
token (the rowwise form of `torch._scaled_mm`, as FlashRT runs pi0), as the weight format `Fp8Weight` with its ops.
On a GPU with fp8 tensor cores the product is `torch._scaled_mm`; elsewhere it is emulated (quantise, then the
product of the dequantised values in fp32), which gives the same numbers up to the order of the fp32 sums and is how
a CPU checks fp8's numerics. `pi0.hardware.resolve_dtype` refuses dtype fp8 where there are no fp8 tensor cores."""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3 value
_TINY = torch.finfo(torch.float32).tiny
FP8_KERNELS = ("scaled_mm", "emulated")
# the linear weights fp8 covers (every big product; the embedding is looked up, the heads and time path are small)
FP8_NAMES = re.compile(r"vision\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight|projector\.weight"
                       r"|(vlm|expert)\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


@dataclass
class Fp8Weight:
    """A linear weight w [out, in] as w ~ q * scale[:, None]: e4m3 values with one fp32 scale per output channel
    (max|w_row| / 448). `dtype`: the float dtype of the layer's inputs and outputs. `kernel`: how its products run
    (`FP8_KERNELS`)."""

    q: Tensor  # e4m3 [out, in]
    scale: Tensor  # fp32 [out]
    dtype: torch.dtype
    kernel: str = "emulated"

    # -- the ops on an fp8 weight (what pi0.backends.engine.ops hands a weight that is not a float tensor) --------

    def linear(self, x: Tensor, b: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        return fp8_linear(x, self, b, residual)

    def embedding(self, ids: Tensor) -> Tensor:
        return (self.q[ids].float() * self.scale[ids, None]).to(self.dtype)

    def gated_gelu_of(self, x: Tensor, then: object | None) -> Tensor:
        from pi0.backends.engine.ops import gated_gelu

        return gated_gelu(self.linear(x), False)

    def gelu_of(self, x: Tensor, b: Tensor, then: object | None) -> Tensor:
        return F.gelu(self.linear(x, b), approximate="tanh")

    def rms_norm_input(self, x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(dtype)

    def layer_norm_input(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row e4m3: x [M, K] -> (x / s as e4m3, s = max|x_row| / 448 fp32 [M, 1]). Computed in fp32."""
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(_TINY)
    return (xf / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), s


def quantize_weight(w: Tensor, dtype: torch.dtype) -> Fp8Weight:
    """[out, in] float -> Fp8Weight (a block of rows at a time: per-row scales make any split the same)."""
    step = max(1, (1 << 22) // max(1, w.shape[1]))
    q = torch.empty(w.shape, dtype=E4M3, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], step):
        q[r:r + step], s = quantize_rows(w[r:r + step])
        scale[r:r + step] = s[:, 0]
    return Fp8Weight(q, scale, dtype)


def fp8_linear(x: Tensor, w: Fp8Weight, b: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """x [..., K] quantised per token, times the e4m3 weight, both scales applied to the fp32 sums, then bias and
    residual; [..., N] in w.dtype."""
    lead, n = x.shape[:-1], w.q.shape[0]
    xq, s = quantize_rows(x.reshape(-1, x.shape[-1]))
    if w.kernel == "scaled_mm":
        y = torch._scaled_mm(xq, w.q.t(), scale_a=s, scale_b=w.scale[None, :], out_dtype=torch.float32)
    else:
        y = F.linear(xq.float(), w.q.float()) * s * w.scale
    if b is not None:
        y = y + b.float()
    if residual is not None:
        y = y + residual.reshape(-1, n).float()
    return y.to(w.dtype).view(*lead, n)


@functools.cache
def fp8_kernel(device_type: str, index: int | None = None) -> tuple[str, str]:
    """(kernel, why) for fp8 products on a device: `torch._scaled_mm` where it runs and agrees with the emulation
    (checked once on a small product), else the emulation."""
    if device_type != "cuda":
        return "emulated", f"no fp8 tensor cores on {device_type}: products emulated in fp32"
    dev = torch.device("cuda", index or 0)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 64, generator=g).to(dev), quantize_weight(torch.randn(48, 64, generator=g), torch.bfloat16)
    w = dataclasses.replace(w, q=w.q.to(dev), scale=w.scale.to(dev))
    try:
        got = fp8_linear(x, dataclasses.replace(w, kernel="scaled_mm"))
    except (RuntimeError, NotImplementedError) as e:
        return "emulated", f"torch._scaled_mm does not run here ({str(e).splitlines()[0][:120]}): products emulated"
    want = fp8_linear(x, w)
    if not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
        return "emulated", "torch._scaled_mm disagrees with the emulation here: products emulated"
    return "scaled_mm", "fp8 products by torch._scaled_mm (rowwise scales)"


def pack_fp8(w: Fp8Weight, device: torch.device) -> Fp8Weight:
    """The weight with the device's kernel; `torch._scaled_mm` takes both sizes in multiples of 16, so other shapes
    (tiny models) are emulated."""
    kernel = fp8_kernel(device.type, device.index)[0]
    if kernel == "scaled_mm" and any(d % 16 for d in w.q.shape):
        kernel = "emulated"
    return dataclasses.replace(w, kernel=kernel)


class Fp8Quantizer:
    """The loader's transform for dtype fp8: the linear weights fp8 covers (`FP8_NAMES`) -> Fp8Weight, every other
    tensor as it is (in the float dtype the loader reads it in)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, name: str, t: Tensor) -> Tensor | Fp8Weight:
        return t if FP8_NAMES.fullmatch(name) is None else quantize_weight(t, self.dtype)
