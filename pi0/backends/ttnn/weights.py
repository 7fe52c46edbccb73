"""The TTNN model's weights: which number format each canonical tensor takes on the device (`FORMATS`, stated per
tensor, readable without ttnn), and their conversion, once, from the canonical state dict with `from_torch`.

Device formats (a bf16 or "auto" model): bfloat8_b for the MLP weights of SigLIP, the VLM and the action expert (71 %
of pi0's parameters, 69 % of pi0.5's; tt-metal's Gemma and Llama models keep MLP weights in bfloat8_b), bf16 for
everything else: attention projections (the logits are where errors grow), embeddings, norms, biases, the projector
and the action / state / time paths (small). An fp32 model keeps every tensor in float32, to check the logic exactly.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from pi0.model.config import Pi0Config

# (pattern over canonical names, device format, why), first match wins
FORMATS: tuple[tuple[re.Pattern, str, str], ...] = (
    (re.compile(r"(vlm|expert)\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight"), "bfloat8_b", "Gemma MLP weight"),
    (re.compile(r"vision\.layers\.\d+\.mlp\.fc[12]\.weight"), "bfloat8_b", "SigLIP MLP weight"),
    (re.compile(r"vlm\.embed_tokens\.weight"), "bfloat16", "embedding table (row-major, read by ttnn.embedding)"),
    (re.compile(r".*"), "bfloat16", "attention, norm, bias or small projection"),
)


def device_format(name: str, exact: bool) -> tuple[str, str]:
    """(ttnn dtype name, why) of canonical tensor `name`; exact (an fp32 model): float32 for every tensor."""
    if exact:
        return "float32", "fp32 model: the logic checked exactly"
    for pattern, fmt, why in FORMATS:
        if pattern.fullmatch(name):
            return fmt, why
    raise AssertionError("the last rule matches every name")


def format_table(shapes: dict[str, tuple[int, ...]], exact: bool = False) -> dict[str, dict[str, int]]:
    """"format: why" -> {"tensors": count, "params": count} over `shapes` (name -> shape), as `pi0 inspect` shows it."""
    out: dict[str, dict[str, int]] = {}
    for name, shape in shapes.items():
        row = out.setdefault(": ".join(device_format(name, exact)), {"tensors": 0, "params": 0})
        row["tensors"] += 1
        row["params"] += int(torch.Size(shape).numel())
    return out


def _is_gemma_norm(name: str) -> bool:
    return bool(re.fullmatch(r"(vlm|expert)\.(layers\.\d+\.(input|post_attention)_layernorm|norm)\.weight", name))


def device_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """The canonical tensor rearranged as the TTNN model reads it: linear weights [out, in] -> [in, out]
    (`ttnn.linear(x, w)`), SigLIP's patch kernel flattened to [3 p p, width], Gemma's RMSNorm w -> 1 + w, vectors
    (biases, norm parameters) -> [1, n]."""
    if name == "vision.patch_embedding.weight":
        return t.flatten(1).t()
    if t.ndim == 2 and name.endswith(".weight") and "embed" not in name:
        return t.t()
    if _is_gemma_norm(name):
        return (1.0 + t.float())[None, :]
    return t[None, :] if t.ndim == 1 else t


def convert(state: dict[str, torch.Tensor], config: Pi0Config, tt: Any, exact: bool) -> dict[str, Any]:
    """Every canonical tensor on the device, in its format, in tile layout (the embedding table row-major). Consumes
    (empties) `state` as it goes, so the canonical tensors are not held twice."""
    out = {}
    for name in list(state):
        t = device_tensor(name, state.pop(name))
        fmt = device_format(name, exact)[0]
        layout = tt.ROW_MAJOR_LAYOUT if name == "vlm.embed_tokens.weight" else tt.TILE_LAYOUT
        if name == "vision.position_embedding.weight":
            out[name] = t  # resampled on the host for each image size (`Pi0TTNN.position_embedding`), then placed
            continue
        out[name] = tt.from_torch(t, dtype=getattr(tt, fmt), layout=layout)
    return out
