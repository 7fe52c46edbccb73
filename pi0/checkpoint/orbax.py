"""openpi's JAX checkpoints as released (Orbax OCDBT databases of zarr v2 arrays), read with tensorstore
alone: no jax, flax or orbax (../shared/spec/openpi_orbax.md).

Accepted: a released checkpoint directory (`params/` + `assets/`), its `params/` directory, or a training
step directory (`<step>/params`, leaves ending in `value`, bf16 and fp32 leaves mixed). Each canonical
tensor is a slice / transpose / reshape of one stacked JAX leaf (layer index on axis 0); the recipes below
are the inverse of openpi's `convert_jax_model_to_pytorch.py`, with its o_proj and SigLIP reshapes written
in the form that is right for every width. The same recipe applied to a meta tensor gives the shapes
(for config inference, without reading any data).

Needs the `openpi` extra: `pip install 'pi0[openpi]'` (tensorstore + ml_dtypes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pi0.checkpoint.info import (
    CheckpointFiles,
    CheckpointInfo,
    assumptions,
    check_against_config,
)
from pi0.errors import CheckpointError
from pi0.model.fast_config import infer_model_config

Recipe = Callable[[torch.Tensor], torch.Tensor]  # a leaf -> a canonical tensor (transposes, reshapes)


class OrbaxError(ValueError):
    """An Orbax checkpoint that cannot be read; the message names the directory and the leaf."""


def _tensorstore():
    try:
        import tensorstore
    except ImportError as e:
        raise OrbaxError("reading openpi's Orbax checkpoints needs tensorstore: pip install 'pi0[openpi]' "
                         "(tensorstore + ml_dtypes; no JAX)") from e
    return tensorstore


def find_params_dir(p: Path) -> Path | None:
    """The `params/` directory of an Orbax checkpoint given as the checkpoint (or step) directory or as
    `params/` itself; None when `p` is no Orbax checkpoint."""
    if (p / "params").is_dir():
        return p / "params"
    if (p / "_METADATA").is_file() or (p / "manifest.ocdbt").is_file():
        return p
    return None


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]  # JAX tree path without the leading 'params' and trailing 'value'
    key: str  # zarr array path inside the OCDBT database
    shape: tuple[int, ...]
    dtype: str  # numpy name: bfloat16, float32, ...
    chunks: tuple[int, ...]

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def num_chunks(self) -> int:
        return math.prod(-(-s // c) for s, c in zip(self.shape, self.chunks)) if self.shape else 1


class OrbaxParams:
    """The leaves of one `params/` directory: listed from `_METADATA`, metadata from each `.zarray`."""

    def __init__(self, params_dir: Path):
        self.dir = params_dir.resolve()
        ts = _tensorstore()
        meta_file = self.dir / "_METADATA"
        if not meta_file.is_file():
            raise OrbaxError(f"{self.dir} has no _METADATA file: it is not a complete Orbax checkpoint (copy the "
                             "whole params/ directory again)")
        try:
            meta = json.loads(meta_file.read_text())
            entries = meta["tree_metadata"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise OrbaxError(f"{meta_file} is not Orbax metadata (needs 'tree_metadata'): {e}") from e
        if meta.get("use_zarr3"):
            self.driver = "zarr3"
        else:
            self.driver = "zarr"
        paths = []
        for entry in entries.values():
            if entry.get("value_metadata", {}).get("skip_deserialize"):
                continue
            paths.append(tuple(str(k["key"]) for k in entry["key_metadata"]))
        if not paths:
            raise OrbaxError(f"{meta_file} lists no arrays")
        # openpi drops the nnx.State 'value' suffix when (and only when) every leaf has it
        strip_value = all(p[-1] == "value" for p in paths)
        self.training_layout = strip_value
        self.context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self.leaves: dict[str, Leaf] = {}
        for p in paths:
            key = ".".join(p)
            tree = p[1:] if p[0] == "params" else p
            tree = tree[:-1] if strip_value else tree
            arr = self._open(key)
            leaf = Leaf(tree, key, tuple(arr.shape), arr.dtype.numpy_dtype.name,
                        tuple(arr.chunk_layout.read_chunk.shape))
            self.leaves[leaf.name] = leaf

    def _open(self, key: str):
        ts = _tensorstore()
        spec = {"driver": self.driver, "kvstore": {"driver": "ocdbt", "base": self.dir.as_uri() + "/", "path": key}}
        try:
            return ts.open(spec, open=True, read=True, context=self.context).result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError / its own status errors
            raise OrbaxError(f"{self.dir}: cannot open array {key} ({str(e).splitlines()[0]}); the OCDBT database "
                             "may be truncated or corrupt: copy the checkpoint again") from e

    def read(self, leaf: Leaf) -> torch.Tensor:
        """The whole leaf in its stored dtype (bf16 as torch.bfloat16, bit-exact, no conversion copy)."""
        try:
            a = self._open(leaf.key).read().result()
        except OrbaxError:
            raise
        except Exception as e:  # noqa: BLE001
            raise OrbaxError(f"{self.dir}: reading {leaf.key} failed ({str(e).splitlines()[0]}); the checkpoint "
                             "may be truncated or corrupt: copy it again") from e
        if tuple(a.shape) != leaf.shape:
            raise OrbaxError(f"{self.dir}: {leaf.key} read as {list(a.shape)}, its metadata says {list(leaf.shape)}")
        a = np.ascontiguousarray(a)
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(a)


# ---------------------------------------------------------------------------------------------
# JAX tree -> canonical tensors


def _layers(leaf: Leaf) -> int:
    return leaf.shape[0]


def recipes(leaves: dict[str, Leaf], source: str) -> dict[str, tuple[str, Recipe]]:
    """Canonical name -> (leaf name, recipe of the whole leaf): pi0 / pi0.5, or π0-FAST (PaliGemma's leaves alone: no
    `_1` expert leaves, no action heads). Raises OrbaxError for any other tree."""
    def need(name: str) -> Leaf:
        if name not in leaves:
            raise OrbaxError(f"{source} has no leaf {name}; found {len(leaves)} leaves such as {sorted(leaves)[:4]}")
        return leaves[name]

    if not any(n.startswith("PaliGemma/") for n in leaves):
        raise OrbaxError(f"{source} holds no PaliGemma parameters, so it is no pi0 checkpoint "
                         f"(leaves such as {sorted(leaves)[:4]})")
    fast = "PaliGemma/llm/layers/attn/q_einsum_1/w" not in leaves and "action_in_proj/kernel" not in leaves
    out: dict[str, tuple[str, Recipe]] = {}

    def add(name: str, leaf: str, fn: Recipe) -> None:
        need(leaf)
        out[name] = (leaf, fn)

    img = "PaliGemma/img/"
    add("vision.patch_embedding.weight", img + "embedding/kernel", lambda a: a.permute(3, 2, 0, 1))  # (P,P,3,W)
    add("vision.patch_embedding.bias", img + "embedding/bias", lambda a: a)
    add("vision.position_embedding.weight", img + "pos_embedding", lambda a: a.reshape(a.shape[-2], a.shape[-1]))
    blk = img + "Transformer/encoderblock/"
    n_vis = _layers(need(blk + "LayerNorm_0/scale"))
    for i in range(n_vis):
        p = f"vision.layers.{i}."
        for ln, ours in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
            add(p + ours + ".weight", blk + ln + "/scale", lambda a, i=i: a[i])
            add(p + ours + ".bias", blk + ln + "/bias", lambda a, i=i: a[i])
        for dense, ours in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            add(p + f"mlp.{ours}.weight", blk + f"MlpBlock_0/{dense}/kernel", lambda a, i=i: a[i].T)
            add(p + f"mlp.{ours}.bias", blk + f"MlpBlock_0/{dense}/bias", lambda a, i=i: a[i])
        att = blk + "MultiHeadDotProductAttention_0/"
        for jax_name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            # kernel (W, heads, head_dim) -> (W, heads*head_dim) -> transposed
            add(p + f"self_attn.{ours}.weight", att + jax_name + "/kernel", lambda a, i=i: a[i].flatten(1).T)
            add(p + f"self_attn.{ours}.bias", att + jax_name + "/bias", lambda a, i=i: a[i].flatten())
        add(p + "self_attn.out_proj.weight", att + "out/kernel", lambda a, i=i: a[i].flatten(0, 1).T)
        add(p + "self_attn.out_proj.bias", att + "out/bias", lambda a, i=i: a[i])
    add("vision.post_layernorm.weight", img + "Transformer/encoder_norm/scale", lambda a: a)
    add("vision.post_layernorm.bias", img + "Transformer/encoder_norm/bias", lambda a: a)
    add("projector.weight", img + "head/kernel", lambda a: a.T)
    add("projector.bias", img + "head/bias", lambda a: a)

    llm = "PaliGemma/llm/"
    add("vlm.embed_tokens.weight", llm + "embedder/input_embedding", lambda a: a)
    pi05 = llm + "layers/pre_attention_norm_1/Dense_0/kernel" in leaves
    for ours, sfx in (("vlm", ""),) + ((() if fast else (("expert", "_1"),))):
        depth = _layers(need(llm + f"layers/attn/q_einsum{sfx}/w"))
        adaptive = ours == "expert" and pi05
        for i in range(depth):
            p = f"{ours}.layers.{i}."
            # q (heads, width, head_dim) -> (heads*head_dim, width); kv (2, kv_heads, width, head_dim)
            add(p + "self_attn.q_proj.weight", llm + f"layers/attn/q_einsum{sfx}/w",
                lambda a, i=i: a[i].permute(0, 2, 1).flatten(0, 1))
            add(p + "self_attn.k_proj.weight", llm + f"layers/attn/kv_einsum{sfx}/w",
                lambda a, i=i: a[i, 0].permute(0, 2, 1).flatten(0, 1))
            add(p + "self_attn.v_proj.weight", llm + f"layers/attn/kv_einsum{sfx}/w",
                lambda a, i=i: a[i, 1].permute(0, 2, 1).flatten(0, 1))
            # attn_vec (heads, head_dim, width) -> (heads*head_dim, width) -> transposed: right for any width
            add(p + "self_attn.o_proj.weight", llm + f"layers/attn/attn_vec_einsum{sfx}/w",
                lambda a, i=i: a[i].flatten(0, 1).T)
            add(p + "mlp.gate_proj.weight", llm + f"layers/mlp{sfx}/gating_einsum", lambda a, i=i: a[i, 0].T)
            add(p + "mlp.up_proj.weight", llm + f"layers/mlp{sfx}/gating_einsum", lambda a, i=i: a[i, 1].T)
            add(p + "mlp.down_proj.weight", llm + f"layers/mlp{sfx}/linear", lambda a, i=i: a[i].T)
            for jax_name, norm in (("pre_attention_norm", "input_layernorm"), ("pre_ffw_norm", "post_attention_layernorm")):
                if adaptive:
                    add(p + norm + ".dense.weight", llm + f"layers/{jax_name}{sfx}/Dense_0/kernel", lambda a, i=i: a[i].T)
                    add(p + norm + ".dense.bias", llm + f"layers/{jax_name}{sfx}/Dense_0/bias", lambda a, i=i: a[i])
                else:
                    add(p + norm + ".weight", llm + f"layers/{jax_name}{sfx}/scale", lambda a, i=i: a[i])
        if adaptive:
            add(f"{ours}.norm.dense.weight", llm + f"final_norm{sfx}/Dense_0/kernel", lambda a: a.T)
            add(f"{ours}.norm.dense.bias", llm + f"final_norm{sfx}/Dense_0/bias", lambda a: a)
        else:
            add(f"{ours}.norm.weight", llm + f"final_norm{sfx}/scale", lambda a: a)

    heads = () if fast else ("action_in_proj", "action_out_proj") + (
        ("time_mlp_in", "time_mlp_out") if pi05 else ("state_proj", "action_time_mlp_in", "action_time_mlp_out"))
    for h in heads:
        add(h + ".weight", h + "/kernel", lambda a: a.T)
        add(h + ".bias", h + "/bias", lambda a: a)
    used = {leaf for leaf, _ in out.values()}
    unknown = sorted(set(leaves) - used)
    lora = [n for n in unknown if "lora" in n.rsplit("/", 1)[-1]]
    if lora:
        raise OrbaxError(f"{source} is a LoRA fine-tune whose adapters are stored apart ({len(lora)} leaves such as "
                         f"{lora[0]}); pi0 does not merge LoRA adapters yet: merge them into the weights first")
    if unknown:
        raise OrbaxError(f"{source} has {len(unknown)} leaves that are no part of pi0 / pi0.5 / pi0-FAST: "
                         f"{unknown[:5]}")
    return out


def shapes(leaves: dict[str, Leaf], rec: dict[str, tuple[str, Recipe]]) -> dict[str, tuple[int, ...]]:
    """Canonical shapes from the leaves' metadata alone (each recipe applied to a meta tensor)."""
    metas = {name: torch.empty(leaf.shape, device="meta") for name, leaf in leaves.items()}
    out = {}
    for c, (leaf, fn) in rec.items():
        try:
            out[c] = tuple(fn(metas[leaf]).shape)
        except (RuntimeError, IndexError) as e:
            raise OrbaxError(f"leaf {leaf} has shape {list(leaves[leaf].shape)}, which does not give {c} "
                             f"({str(e).splitlines()[0]}); see ../shared/spec/openpi_orbax.md for the expected shapes") from None
    return out


def head_counts(leaves: dict[str, Leaf]) -> dict:
    """What the JAX shapes tell and the converted safetensors do not: SigLIP's heads, Gemma's kv heads."""
    q = leaves["PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"].shape
    kv = leaves["PaliGemma/llm/layers/attn/kv_einsum/w"].shape  # (L, 2, K, D, H)
    out = {"vision": {"num_heads": q[2]}, "vlm": {"num_kv_heads": kv[2]}}
    kv1 = leaves.get("PaliGemma/llm/layers/attn/kv_einsum_1/w")  # absent in π0-FAST
    return out if kv1 is None else {**out, "expert": {"num_kv_heads": kv1.shape[2]}}


def load(params: OrbaxParams, rec: dict[str, tuple[str, Recipe]], dtype: torch.dtype,
         progress: Callable[[float], None] | None = None,
         hook: Callable[[str, torch.Tensor], Any] | None = None) -> dict[str, Any]:
    """Every canonical tensor in `dtype`. Leaves are read one at a time, largest first (so the one
    transient leaf coincides with a small state), each sliced straight into its target tensors (one copy)
    and then freed. hook(name, tensor), if given, is applied to each tensor as soon as it is made (those its
    optional `streams(name)` picks in the leaf's stored dtype); the leaves holding tensors its optional
    `first(name)` picks are read before all others."""
    by_leaf: dict[str, list[tuple[str, Recipe]]] = {}
    for c, (leaf, fn) in rec.items():
        by_leaf.setdefault(leaf, []).append((c, fn))
    first, streams = getattr(hook, "first", None), getattr(hook, "streams", None)
    early = {n for n, cs in by_leaf.items() if first and any(first(c) for c, _ in cs)}
    order = sorted(by_leaf, key=lambda n: (n not in early, -math.prod(params.leaves[n].shape)))
    total = sum(math.prod(params.leaves[n].shape) for n in order)
    done = 0
    out: dict[str, Any] = {}
    for name in order:
        leaf = params.leaves[name]
        a = params.read(leaf)
        for c, fn in by_leaf[name]:
            view = fn(a)
            if streams is not None and view.ndim >= 2 and streams(c):  # in the stored dtype, as the file loaders do
                out[c] = hook(c, view.contiguous())
                continue
            if view.data_ptr() == a.data_ptr() and view.is_contiguous() and view.shape == a.shape and a.dtype == dtype:
                out[c] = a  # the whole leaf as it is (the embedding, 1-D leaves)
            else:
                out[c] = torch.empty(view.shape, dtype=dtype).copy_(view)
            if hook is not None:
                out[c] = hook(c, out[c])
        del a, view  # the last slice would keep the whole leaf alive

        done += math.prod(leaf.shape)
        if progress is not None:
            progress(done / total)
    return out


# ---------------------------------------------------------------------------------------------
# The container reader (pi0.checkpoint.info.Reader)


def locate(p: Path) -> CheckpointFiles | None:
    """An Orbax checkpoint given as its directory, a training step or `params/`: its files (None: not one)."""
    if not p.is_dir() or (params := find_params_dir(p)) is None:
        return None
    root = params.parent if params.name == "params" else params
    cfg = root / "config.json"
    return CheckpointFiles(root, [params], cfg if cfg.exists() else None)


def claims(files: CheckpointFiles) -> bool:
    return len(files.shards) == 1 and files.shards[0].is_dir()


def describe(info: CheckpointInfo) -> dict[str, Any]:
    """How the arrays are stored: chunking, and whether it is a training step's layout."""
    params = info.handle[0]
    leaves = params.leaves.values()
    return {"chunking": {"arrays": len(leaves), "several_chunks": sum(x.num_chunks > 1 for x in leaves),
                         "max_chunks": max(x.num_chunks for x in leaves), "training_layout": params.training_layout}}


def inspect(files: CheckpointFiles, meta: dict[str, Any]) -> CheckpointInfo:
    """The params tree's metadata: leaves, shapes, head counts (no tensor data)."""
    params_dir = files.shards[0]
    try:
        params = OrbaxParams(params_dir)
        rec = recipes(params.leaves, str(params_dir))
        tensor_shapes = shapes(params.leaves, rec)
        # the JAX shapes tell the head counts the converted safetensors cannot
        ours = {**head_counts(params.leaves), **(meta.get("pi0") or {})}
        config = infer_model_config(tensor_shapes, {**meta, "pi0": ours})
    except OrbaxError as e:
        raise CheckpointError(str(e)) from None
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{params_dir} (openpi_orbax layout): {e}") from None
    dtypes: dict[str, int] = {}
    for leaf in params.leaves.values():
        dtypes[leaf.dtype] = dtypes.get(leaf.dtype, 0) + 1
    info = CheckpointInfo(
        files, "openpi_orbax", config, meta, len(params.leaves), sum(math.prod(x.shape) for x in params.leaves.values()),
        dtypes, {c: (params_dir, params.leaves[leaf].key) for c, (leaf, _) in rec.items()}, tensor_shapes,
        assumed=assumptions(config, meta), handle=(params, rec))
    check_against_config(info, params_dir)
    return info


def read(info: CheckpointInfo, dtype: torch.dtype, progress: Callable[[float], None] | None = None,
         hook: Callable[[str, torch.Tensor], Any] | None = None) -> Iterator[tuple[str, Any]]:
    try:
        yield from load(*info.handle, dtype, progress, hook).items()
    except OrbaxError as e:
        raise CheckpointError(str(e)) from None
