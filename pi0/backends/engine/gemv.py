"""Weight-only int8 for π0-FAST's decoding steps: a linear weight stored as int8 rows with one scale a row, multiplied
by torch's weight-only int8 kernel (`torch._weight_int8pack_mm`: bf16 activations, the weight widened in registers).

A decoding step multiplies one row a sequence by every weight of Gemma and the head, so it is bound by the bytes it
reads: int8 halves bf16's. Measured on Gemma-2B's shapes (2-core AMD EPYC Zen 4, one row; `docs/pi0_fast.md`): the
gate|up, down and q|k|v products 2.2x, 2.8x and 2.3x faster than bf16 `F.linear`. The kernel reads 16 (AVX-512) or 8
(AVX2) activations a step with aligned loads, so a weight whose input width is not a multiple of 16 stays in float
(`RowInt8.of` returns it unchanged): no shape is special-cased, none crashes the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pi0.backends.engine import ops
from pi0.backends.engine.int8 import Int8Weight

KERNEL_K = 16  # the input width the kernel's aligned loads need a multiple of


@dataclass
class RowInt8:
    """w ~ q * scale[:, None]: q int8 [out, in] (symmetric, per output row), scale bf16 [out]; inputs arrive and
    outputs leave in `dtype` (the engine's), the product runs on bf16 activations."""

    q: Tensor
    scale: Tensor
    dtype: torch.dtype

    @classmethod
    def of(cls, w: Tensor, dtype: torch.dtype) -> "RowInt8 | Tensor":
        """A float weight [out, in] (plain or oneDNN-packed) quantised; a width the kernel cannot read: `w` itself."""
        if not isinstance(w, Tensor):
            raise TypeError(f"weight-only int8 quantises float weights, got {type(w).__name__} (an int8 engine's "
                            "products are int8 already)")
        if w.shape[1] % KERNEL_K:
            return w
        wf = (w.to_dense() if w.is_mkldnn else w).float()
        scale = (wf.abs().amax(1).clamp(min=1e-12) / 127).to(torch.bfloat16)  # rounded first: q is made against it
        q = (wf / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.contiguous(), dtype)

    @classmethod
    def of_int8(cls, w: Int8Weight) -> "RowInt8 | Int8Weight":
        """An int8 engine's weight (`int8.Int8Weight`) in this format where it is plain int8 rows without outlier
        columns (its scales rounded to bf16, the rows requantised against them); else `w` itself."""
        if w.kernel != "plain" or w.outlier_cols is not None or w.q.shape[1] % KERNEL_K:
            return w
        scale = w.scale.float().to(torch.bfloat16)
        q = (w.q.float() * (w.scale.float() / scale.float())[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.contiguous(), w.dtype)

    def linear(self, x: Tensor, b: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(rows, self.q, self.scale).view(*lead, -1).to(self.dtype)
        if b is not None:
            y = y + b
        return y if residual is None else residual + y

    def rms_norm_input(self, x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
        return ops.rms_norm(x, weight, eps).to(dtype)

    def gated_gelu_of(self, x: Tensor, then: object) -> Tensor:  # noqa: ARG002 - `then` prepares nothing here
        return ops.gated_gelu(self.linear(x), False)

    def embedding(self, ids: Tensor) -> Tensor:
        return (self.q[ids].float() * self.scale[ids].float()[..., None]).to(self.dtype)
