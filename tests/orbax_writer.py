"""Write openpi-style Orbax checkpoints (../shared/spec/openpi_orbax.md) with tensorstore, from canonical
tensors: the JAX parameter tree spelled out leaf by leaf (independently of pi0.checkpoint.orbax's reader), zarr v2
arrays in an OCDBT database, `_METADATA`, bf16 or fp32 leaves, one chunk or several, a pure tree
(released) or one whose leaves end in `value` (training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts
import torch

import pi0


def jax_tree(state: dict[str, torch.Tensor], cfg: pi0.Pi0Config) -> dict[str, torch.Tensor]:
    """Canonical tensors -> openpi's JAX leaves ('/'-joined paths), stacked over layers on axis 0."""
    v, g, e = cfg.vision, cfg.vlm, cfg.expert
    S = state
    out: dict[str, torch.Tensor] = {}

    def stack(fmt: str, fn, n: int) -> torch.Tensor:
        return torch.stack([fn(S[fmt.format(i=i)]) for i in range(n)])

    img = "PaliGemma/img/"
    out[img + "embedding/kernel"] = S["vision.patch_embedding.weight"].permute(2, 3, 1, 0)  # (P, P, 3, W)
    out[img + "embedding/bias"] = S["vision.patch_embedding.bias"]
    out[img + "pos_embedding"] = S["vision.position_embedding.weight"][None]
    blk = img + "Transformer/encoderblock/"
    L = "vision.layers.{i}."
    for ln, ours in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
        out[blk + ln + "/scale"] = stack(L + ours + ".weight", lambda t: t, v.depth)
        out[blk + ln + "/bias"] = stack(L + ours + ".bias", lambda t: t, v.depth)
    for dense, ours in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        out[blk + f"MlpBlock_0/{dense}/kernel"] = stack(L + f"mlp.{ours}.weight", lambda t: t.T, v.depth)
        out[blk + f"MlpBlock_0/{dense}/bias"] = stack(L + f"mlp.{ours}.bias", lambda t: t, v.depth)
    att = blk + "MultiHeadDotProductAttention_0/"
    nh, hd = v.num_heads, v.width // v.num_heads
    for jax_name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out[att + jax_name + "/kernel"] = stack(L + f"self_attn.{ours}.weight", lambda t: t.T.reshape(v.width, nh, hd), v.depth)
        out[att + jax_name + "/bias"] = stack(L + f"self_attn.{ours}.bias", lambda t: t.reshape(nh, hd), v.depth)
    out[att + "out/kernel"] = stack(L + "self_attn.out_proj.weight", lambda t: t.T.reshape(nh, hd, v.width), v.depth)
    out[att + "out/bias"] = stack(L + "self_attn.out_proj.bias", lambda t: t, v.depth)
    out[img + "Transformer/encoder_norm/scale"] = S["vision.post_layernorm.weight"]
    out[img + "Transformer/encoder_norm/bias"] = S["vision.post_layernorm.bias"]
    out[img + "head/kernel"] = S["projector.weight"].T
    out[img + "head/bias"] = S["projector.bias"]
    llm = "PaliGemma/llm/"
    out[llm + "embedder/input_embedding"] = S["vlm.embed_tokens.weight"]
    for ours, sfx, c in (("vlm", "", g), ("expert", "_1", e)):
        L = ours + ".layers.{i}."
        out[llm + f"layers/attn/q_einsum{sfx}/w"] = stack(
            L + "self_attn.q_proj.weight", lambda t: t.reshape(c.num_heads, c.head_dim, c.width).permute(0, 2, 1), c.depth)
        kv = lambda t: t.reshape(c.num_kv_heads, c.head_dim, c.width).permute(0, 2, 1)  # noqa: E731
        out[llm + f"layers/attn/kv_einsum{sfx}/w"] = torch.stack([
            torch.stack([kv(S[L.format(i=i) + "self_attn.k_proj.weight"]), kv(S[L.format(i=i) + "self_attn.v_proj.weight"])])
            for i in range(c.depth)])
        out[llm + f"layers/attn/attn_vec_einsum{sfx}/w"] = stack(
            L + "self_attn.o_proj.weight", lambda t: t.T.reshape(c.num_heads, c.head_dim, c.width), c.depth)
        out[llm + f"layers/mlp{sfx}/gating_einsum"] = torch.stack([
            torch.stack([S[L.format(i=i) + "mlp.gate_proj.weight"].T, S[L.format(i=i) + "mlp.up_proj.weight"].T])
            for i in range(c.depth)])
        out[llm + f"layers/mlp{sfx}/linear"] = stack(L + "mlp.down_proj.weight", lambda t: t.T, c.depth)
        adaptive = ours == "expert" and cfg.pi05
        for jax_name, norm in (("pre_attention_norm", "input_layernorm"), ("pre_ffw_norm", "post_attention_layernorm")):
            if adaptive:
                out[llm + f"layers/{jax_name}{sfx}/Dense_0/kernel"] = stack(L + norm + ".dense.weight", lambda t: t.T, c.depth)
                out[llm + f"layers/{jax_name}{sfx}/Dense_0/bias"] = stack(L + norm + ".dense.bias", lambda t: t, c.depth)
            else:
                out[llm + f"layers/{jax_name}{sfx}/scale"] = stack(L + norm + ".weight", lambda t: t, c.depth)
        if adaptive:
            out[llm + f"final_norm{sfx}/Dense_0/kernel"] = S[f"{ours}.norm.dense.weight"].T
            out[llm + f"final_norm{sfx}/Dense_0/bias"] = S[f"{ours}.norm.dense.bias"]
        else:
            out[llm + f"final_norm{sfx}/scale"] = S[f"{ours}.norm.weight"]
    heads = ["action_in_proj", "action_out_proj"]
    heads += ["time_mlp_in", "time_mlp_out"] if cfg.pi05 else ["state_proj", "action_time_mlp_in", "action_time_mlp_out"]
    for h in heads:
        out[h + "/kernel"] = S[h + ".weight"].T
        out[h + "/bias"] = S[h + ".bias"]
    return out


def write_orbax(params_dir: Path, leaves: dict[str, torch.Tensor], *, training: bool = False,
                dtype_of=lambda name: "bfloat16", chunks: int = 1) -> None:
    """One zarr v2 array per leaf in an OCDBT database at params_dir, plus _METADATA. training: the
    nnx.State tree (every leaf path ends in 'value'); dtype_of(name): 'bfloat16' or 'float32'; chunks > 1
    splits axis 0 of every leaf that is long enough into that many chunks (a multi-device save)."""
    params_dir.mkdir(parents=True, exist_ok=True)
    base = params_dir.resolve().as_uri() + "/"
    ctx = ts.Context()
    tree = {}
    for name, t in leaves.items():
        path = ("params", *name.split("/")) + (("value",) if training else ())
        shape = list(t.shape)
        chunk = list(shape)
        if chunks > 1 and shape and shape[0] >= chunks:
            chunk[0] = math.ceil(shape[0] / chunks)
        dt = dtype_of(name)
        arr = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": ".".join(path)},
                       "metadata": {"shape": shape, "chunks": chunk, "dtype": "bfloat16" if dt == "bfloat16" else "<f4",
                                    "compressor": {"id": "zstd", "level": 1}, "dimension_separator": ".",
                                    "fill_value": None, "filters": None, "order": "C"}},
                      create=True, context=ctx).result()
        a = t.detach().float().numpy()
        arr.write(a.astype(ml_dtypes.bfloat16) if dt == "bfloat16" else a.astype(np.float32)).result()
        tree[str(path)] = {"key_metadata": [{"key": k, "key_type": 2} for k in path],
                           "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": shape}}
    (params_dir / "_METADATA").write_text(json.dumps({
        "tree_metadata": tree, "use_zarr3": False, "store_array_data_equal_to_fill_value": False, "custom_metadata": None}))
