"""Weight-only int8 for π0-FAST's decoding (`pi0.backends.engine.gemv`): products within the int8 rounding of the
float weight's, any number of rows and output widths, and a width the kernel cannot read left in float."""

from __future__ import annotations

import pytest
import torch

from pi0.backends.engine.gemv import KERNEL_K, RowInt8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out,width,rows", [(37, 64, 1), (130, 2 * KERNEL_K, 3), (5, 160, 6)])
def test_products_are_the_float_weights_within_the_int8_rounding(dtype, out, width, rows):
    g = torch.Generator().manual_seed(out)
    w = torch.randn(out, width, generator=g).to(dtype)
    x = torch.randn(2, rows, width, generator=g).to(dtype)
    b, residual = torch.randn(out, generator=g).to(dtype), torch.randn(2, rows, out, generator=g).to(dtype)
    q = RowInt8.of(w, dtype)
    assert isinstance(q, RowInt8) and q.q.dtype == torch.int8 and q.q.shape == (out, width)
    dequantised = q.q.float() * q.scale.float()[:, None]
    assert (dequantised - w.float()).abs().max() <= w.float().abs().amax() / 127  # half a step, plus the scale's bf16
    y = q.linear(x, b, residual)
    assert y.dtype == dtype and y.shape == (2, rows, out)
    want = residual.float() + b.float() + x.bfloat16().float() @ dequantised.T
    assert (y.float() - want).abs().max() <= 2e-2 * want.abs().max()
    ids = torch.tensor([[0, out - 1]])
    assert torch.allclose(q.embedding(ids).float(), dequantised[ids[0]][None], rtol=1e-2, atol=1e-2)


def test_a_width_the_kernel_cannot_read_stays_float_and_int8_weights_are_refused():
    w = torch.randn(8, KERNEL_K + 8)
    assert RowInt8.of(w, torch.float32) is w
    with pytest.raises(TypeError, match="float weights"):
        RowInt8.of(RowInt8.of(torch.randn(8, KERNEL_K), torch.float32), torch.float32)
