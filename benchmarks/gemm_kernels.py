"""The GEMM kernels a CPU offers torch, on pi0's shapes, side by side in one process (GFLOP/s or GOPS, best of
5): fp32 and bf16 through F.linear and through oneDNN-packed weights; int8 through `torch._int_mm` raw and
wrapped the simple way (per-token int8 activations, per-channel int8 weights, fp32 rescale in eager ops),
oneDNN's qlinear raw, and the engine's own int8 linear (quantisation and rescaling included).

    .venv/bin/python benchmarks/gemm_kernels.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python benchmarks/gemm_kernels.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pi0.backends.engine import ops  # noqa: E402
from pi0.backends.engine import int8  # noqa: E402
from pi0.hardware import compute_dtype  # noqa: E402
from pi0.timing import best_seconds  # noqa: E402
from tests.stress import int8_weight  # noqa: E402

SHAPES = {  # name: (rows, in, out)
    "vlm_gate_up (W1 prefix)": (816, 2048, 32768),
    "vlm_qkv (W1 prefix)": (816, 2048, 2560),
    "siglip_fc1 (3 cameras)": (768, 1152, 4304),
    "expert_gate_up (50 actions)": (50, 1024, 8192),
    "expert_qkv (50 actions)": (50, 1024, 2560),
}


def rate(fn, work: float) -> float:
    return work / best_seconds(fn) / 1e9


def int8_eager(x: torch.Tensor, q_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    xs = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127.0
    xq = torch.round(x / xs).clamp_(-127, 127).to(torch.int8)
    return (torch._int_mm(xq, q_t).float() * xs * w_scale).to(x.dtype)


def main() -> None:
    print(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}))
    for name, (m, k, n) in SHAPES.items():
        work = 2.0 * m * k * n
        x, w = torch.randn(m, k), torch.randn(n, k)
        row = {"shape": name}
        for dt in (torch.float32, torch.bfloat16):
            xd, wd = x.to(dt), w.to(dt)
            key = str(dt).replace("torch.", "")
            row[f"{key}_linear"] = rate(lambda: F.linear(xd, wd), work)
            works, _ = ops.packing_works(dt, "cpu")
            if works:
                wp = ops.pack(wd, m, True)
                row[f"{key}_packed"] = rate(lambda: ops.linear(xd, wp), work)
        w_scale = w.abs().amax(dim=1).clamp_min(1e-30) / 127.0
        q_t = torch.round(w / w_scale[:, None]).clamp_(-127, 127).to(torch.int8).t().contiguous()
        xq = torch.round(x / (x.abs().amax() / 127)).to(torch.int8)
        row["int8_int_mm"] = rate(lambda: torch._int_mm(xq, q_t), work)
        row["int8_eager_w8a8"] = rate(lambda: int8_eager(x, q_t, w_scale), work)
        # the engine's int8 products: oneDNN qlinear alone (u8 activations), and its whole W8A8 linear
        # (per-token quantisation and rescaling included) with the kernel and dtype it picks here
        w8 = int8.quantize_weight(w, torch.float32)
        try:
            packed = int8.pack_int8(w8, m, "onednn")
            xu = (xq.int() + 128).to(torch.uint8)
            zp = torch.zeros(n, dtype=torch.long)
            row["int8_onednn_qlinear"] = rate(lambda: torch.ops.onednn.qlinear_pointwise(
                xu, 1.0, 128, packed.q, w8.scale, zp, None, 1.0, 0, torch.bfloat16, "none", [], ""), work)
        except RuntimeError:
            pass
        dt = compute_dtype(torch.int8)
        engine_w = int8_weight(w, m, dt)
        xe = x.to(dt)
        row[f"int8_engine_{engine_w.kernel}"] = rate(lambda: ops.linear(xe, engine_w), work)
        print(json.dumps({k: round(v) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
