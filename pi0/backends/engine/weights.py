"""The engine's weights: made once from the canonical state dict (plain functions, no model), then only read.

- `int8_quantizer`: what the loader applies to each tensor as it is read for dtype int8 (per output channel,
  outlier input channels kept in float).
- `choose_kernels`: which fast paths work on the machine it runs on (oneDNN packing per dtype, compiled kernels, the
  int8 kernel), each probed once.
- `pack_weights`: fused QKV with 1/sqrt(head_dim) folded into W_q, fused gate|up, (1 + w) norm weights in
  fp32, the last VLM layer's k, v only (its other weights dropped), pi0.5's adaRMS dense layers stacked per
  layer, the action/state/time heads in fp32, and every GEMM weight in the layout its kernel wants.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from pi0.backends.engine import fp8, int8, kernels, ops
from pi0.model.backend import Rows
from pi0.model.config import Pi0Config, feeding_norm, norm_gain, norm_param
from pi0.model.fast_config import FastConfig

INT8_STAGES = ("vision", "prefix", "expert", "embedding")
_INT8_NAMES = {  # the linear weights of each stage that int8 covers; norms, biases, the time path and heads stay
    "vision": r"vision\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight|projector\.weight",
    "prefix": r"vlm\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight",
    "expert": r"expert\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight",
    "embedding": r"vlm\.embed_tokens\.weight",  # one scale per token row; looked up, never multiplied
}


OUTLIER_GAIN = 6.0  # an input channel whose norm gain is this many times the median's is computed in float


class Int8Quantizer:
    """(name, tensor) -> an Int8Weight for the big linear weights of `stages`, else the tensor as it is. Applied
    by the loader to each tensor as it is read, so a full-size int8 model never holds its float weights.

    Outlier channels: a linear weight that reads a norm's output (q/k/v, gate|up, fc1, the projector) keeps the
    input channels whose static norm gain (`pi0.model.config.norm_gain`) is over `outlier_gain` x the median channel's
    out of its int8 product: those columns are computed in the float dtype (LLM.int8()'s decomposition, decided
    from the weights alone), so a few channels 100x the rest cannot take every other channel's precision through
    the per-token scale. The norms are read first for this (`first`, which the loaders honour). outlier_gain None
    turns it off."""

    def __init__(self, dtype: torch.dtype, stages: tuple[str, ...] | None = None, qmax: int | None = None,
                 outlier_gain: float | None = OUTLIER_GAIN):
        if stages is None:
            env = os.environ.get("PI0_INT8_STAGES")
            stages = tuple(s.strip() for s in env.split(",") if s.strip()) if env is not None else INT8_STAGES
        unknown = set(stages) - set(INT8_STAGES)
        if unknown:
            raise ValueError(f"unknown int8 stages {sorted(unknown)} (PI0_INT8_STAGES?): choose from {', '.join(INT8_STAGES)}")
        self.dtype, self.outlier_gain = dtype, outlier_gain
        self.qmax = int8.int8_kernel(dtype, "cpu")[1] if qmax is None else qmax
        self.pattern = re.compile("|".join(f"(?:{_INT8_NAMES[s]})" for s in stages)) if stages else None
        self.compile = os.environ.get("PI0_COMPILE", "1") != "0"
        self.norms: dict[str, dict[str, Tensor]] = {}  # norm -> its parameters, as they are read
        self.outliers: dict[str, Tensor] = {}  # norm -> its outlier channels (decided at its first linear)

    def first(self, name: str) -> bool:
        """Tensors to read before all others: the norm parameters the outlier channels are decided from."""
        return self.outlier_gain is not None and norm_param(name) is not None

    def streams(self, name: str) -> bool:
        """The weights the loader may hand over as row blocks (`pi0.model.backend.Rows`) instead of whole
        tensors: those quantised here, so not even one of them is held in float at once."""
        return self.pattern is not None and self.pattern.fullmatch(name) is not None

    def __call__(self, name: str, t: Tensor | Rows) -> Tensor | int8.Int8Weight:
        param = norm_param(name) if self.outlier_gain is not None else None
        if param is not None:
            if param[0] in self.outliers:
                raise RuntimeError(f"int8: {name} was read after a linear weight that reads it (the loader must read "
                                   "the tensors `first` picks first)")
            self.norms.setdefault(param[0], {})[param[1]] = t.detach().float().clone()
        if self.pattern is None or not self.pattern.fullmatch(name):
            return t
        # compiled where its probe passes for the dtype the weight arrives in (the file's when streamed)
        compiled = self.compile and kernels.fusion_works(t.dtype, "cpu", "quantize_weight")[0]
        if isinstance(t, Tensor):
            return int8.quantize_weight(t, self.dtype, self.qmax, self._outlier_cols(name), compiled)
        return int8.quantize_blocks(t, t.shape, self.dtype, self.qmax, self._outlier_cols(name), compiled)

    def _outlier_cols(self, name: str) -> Tensor | None:
        norm = feeding_norm(name) if self.outlier_gain is not None else None
        if norm is None:
            return None
        if norm not in self.outliers:
            gain = norm_gain(norm, self.norms.get(norm, {}))
            self.outliers[norm] = (torch.empty(0, dtype=torch.long) if gain is None else
                                   torch.nonzero(gain > self.outlier_gain * gain.median()).flatten())
        return self.outliers[norm]


def int8_quantizer(dtype: torch.dtype, stages: tuple[str, ...] | None = None, qmax: int | None = None,
                   outlier_gain: float | None = OUTLIER_GAIN) -> Int8Quantizer:
    """The loader's transform for dtype int8 (`Int8Quantizer`). stages: default all of INT8_STAGES, or
    PI0_INT8_STAGES (comma-separated; e.g. "prefix,expert,embedding" keeps SigLIP in the float dtype). qmax: the
    weights' integer range; default: what this CPU's int8 kernel takes without overflow."""
    return Int8Quantizer(dtype, stages, qmax, outlier_gain)


# ---------------------------------------------------------------------------------------------
# Kernels


@dataclass(frozen=True)
class Kernels:
    """The fast paths that work here, probed once when an engine is made (`report` is `engine.kernels`)."""

    fused: bool  # the compiled gated gelu
    compiled: frozenset[str]  # the compiled kernels the int8 products run
    packed: dict[torch.dtype, bool]  # oneDNN-packed weights per dtype
    int8_kernel: str | None
    report: dict


def choose_kernels(dtype: torch.dtype, vision_dtype: torch.dtype, device: torch.device, int8_tensors: int,
                   pack: bool = True, fuse: bool = True) -> Kernels:
    """Each fast path only where its probe passes on the machine (PI0_PACK=0 / PI0_COMPILE=0 turn them off)."""
    pack = pack and os.environ.get("PI0_PACK", "1") != "0"
    fuse = fuse and os.environ.get("PI0_COMPILE", "1") != "0"
    int8_kernel, why_int8 = int8.int8_kernel(dtype, device.type)[::2] if int8_tensors else (None, "")
    names = ("gated_gelu",) + (kernels.INT8_FUSED if int8_tensors else ())
    offset = int8.activation_offset(int8_kernel)  # the int8 kernels' probes use the chosen product's zero point

    def probe(n: str) -> tuple[bool, str]:
        if not fuse:
            return False, "compiled kernels off"
        if n in kernels.INT8_FUSED:
            return kernels.fusion_works(dtype, device.type, n, offset)
        return kernels.fusion_works(dtype, device.type, n)
    probes = {n: probe(n) for n in names}
    packs = {d: ops.packing_works(d, device.type) if pack else (False, "packing off") for d in {dtype, vision_dtype}}
    report = {"packed_weights": packs[dtype][0], "fused_kernels": probes["gated_gelu"][0],
              "why": "; ".join([packs[dtype][1]] + sorted({why for _, why in probes.values()}))}
    if int8_tensors:
        report.update(int8_kernel=int8_kernel, int8_tensors=int8_tensors, why=report["why"] + "; " + why_int8,
                      int8_fused=sorted(n for n in kernels.INT8_FUSED if probes[n][0]))
    return Kernels(probes["gated_gelu"][0], frozenset(n for n, (ok, _) in probes.items() if ok),
                   {d: ok for d, (ok, _) in packs.items()}, int8_kernel, report)


# ---------------------------------------------------------------------------------------------
# Packed weights


@dataclass
class VisionLayer:
    ln1_w: Tensor
    ln1_b: Tensor
    qkv_w: Tensor  # [3W, W]
    qkv_b: Tensor
    out_w: Tensor
    out_b: Tensor
    ln2_w: Tensor
    ln2_b: Tensor
    fc1_w: Tensor
    fc1_b: Tensor
    fc2_w: Tensor
    fc2_b: Tensor


@dataclass
class GemmaLayer:
    """Packed weights of one Gemma layer. The last VLM layer keeps only kv_w and in_norm."""

    qkv_w: Tensor | None  # [(H + 2K) * D, W], q rows pre-scaled by head_dim^-0.5
    kv_w: Tensor | None  # [2K * D, W]: the last VLM layer's k, v projection
    o_w: Tensor | None
    gate_up_w: Tensor | None  # [2 * mlp, W]
    down_w: Tensor | None
    in_norm: Tensor | None  # (1 + w) fp32; None for adaRMS
    post_norm: Tensor | None


@dataclass
class EngineWeights:
    pos_emb: Tensor
    patch_w: Tensor  # SigLIP's patch convolution as a linear map of the flattened patches
    patch_b: Tensor
    vision_layers: list[VisionLayer]
    post_ln_w: Tensor
    post_ln_b: Tensor
    proj_w: Tensor
    proj_b: Tensor
    embed: Tensor
    vlm_layers: list[GemmaLayer]
    expert_layers: list[GemmaLayer]  # π0-FAST: none
    action_in_w: Tensor | None = None  # the action heads, fp32 (π0-FAST: none)
    action_in_b: Tensor | None = None
    action_out_w: Tensor | None = None
    action_out_b: Tensor | None = None
    # pi0: the state token, the action-time MLP (its time half applied once per schedule), the final norm (π0-FAST:
    # the VLM's)
    final_norm: Tensor | None = None
    head: Tensor | None = None  # π0-FAST's tied head packed for one-row products where packing is on (None: `embed`)
    state_w: Tensor | None = None
    state_b: Tensor | None = None
    at_in_action_w: Tensor | None = None
    at_in_time_w: Tensor | None = None
    at_in_b: Tensor | None = None
    at_out_w: Tensor | None = None
    at_out_b: Tensor | None = None
    # pi0.5: the time MLP and the adaRMS dense layers (only ever applied to the schedule, once per num_steps)
    mod_w: list[Tensor] | None = None
    mod_b: list[Tensor] | None = None
    final_mod_w: Tensor | None = None
    final_mod_b: Tensor | None = None
    time_in_w: Tensor | None = None
    time_in_b: Tensor | None = None
    time_out_w: Tensor | None = None
    time_out_b: Tensor | None = None


def pack_weights(config: Pi0Config | FastConfig, state: dict[str, Tensor], kernels: Kernels, dtype: torch.dtype,
                 vision_dtype: torch.dtype) -> EngineWeights:
    """The engine's weights from canonical tensors (any dtype, `int8.Int8Weight`s from `int8_quantizer` kept
    as int8), consuming `state` tensor by tensor. Raises if a tensor is left unused."""
    dt, vdt = dtype, vision_dtype

    def take(name: str, dtype: torch.dtype | None = dt) -> Tensor:
        t = state.pop(name)
        if isinstance(t, (int8.Int8Weight, fp8.Fp8Weight)):
            return t
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def f32(name: str) -> Tensor:
        return take(name, torch.float32)

    def pack_as(w: Tensor | int8.Int8Weight, rows: int) -> Tensor | int8.Int8Weight:
        if isinstance(w, int8.Int8Weight):
            return int8.pack_int8(w, rows, kernels.int8_kernel, kernels.compiled)
        if isinstance(w, fp8.Fp8Weight):
            return fp8.pack_fp8(w, w.q.device)
        return ops.pack(w, rows, kernels.packed[w.dtype])

    def packed(name: str, rows: int, dtype: torch.dtype = dt) -> Tensor:
        return pack_as(take(name, dtype), rows)

    v = config.vision
    img_rows = getattr(config, "num_cameras", 3) * v.num_patches  # GEMM row-count hint for the packed layouts
    pos_emb = take("vision.position_embedding.weight", vdt)
    patch_w = pack_as(take("vision.patch_embedding.weight", vdt).flatten(1), img_rows)  # the conv as a linear map
    patch_b = take("vision.patch_embedding.bias", vdt)
    vision_layers = []
    for i in range(v.depth):
        p = f"vision.layers.{i}."
        vision_layers.append(VisionLayer(
            ln1_w=take(p + "layer_norm1.weight", vdt), ln1_b=take(p + "layer_norm1.bias", vdt),
            qkv_w=pack_as(cat_rows([take(p + f"self_attn.{n}_proj.weight", vdt) for n in "qkv"]), img_rows),
            qkv_b=torch.cat([take(p + f"self_attn.{n}_proj.bias", vdt) for n in "qkv"]),
            out_w=packed(p + "self_attn.out_proj.weight", img_rows, vdt), out_b=take(p + "self_attn.out_proj.bias", vdt),
            ln2_w=take(p + "layer_norm2.weight", vdt), ln2_b=take(p + "layer_norm2.bias", vdt),
            fc1_w=packed(p + "mlp.fc1.weight", img_rows, vdt), fc1_b=take(p + "mlp.fc1.bias", vdt),
            fc2_w=packed(p + "mlp.fc2.weight", img_rows, vdt), fc2_b=take(p + "mlp.fc2.bias", vdt),
        ))
    post_ln = take("vision.post_layernorm.weight", vdt), take("vision.post_layernorm.bias", vdt)
    proj = packed("projector.weight", img_rows, vdt), take("projector.bias", vdt)
    embed = take("vlm.embed_tokens.weight")
    head_dim = config.vlm.head_dim

    def gemma_layers(prefix: str, depth: int, adaptive: bool, rows: int, kv_only_last: bool) -> list[GemmaLayer]:
        layers = []
        for i in range(depth):
            p = f"{prefix}.layers.{i}."
            if kv_only_last and i == depth - 1:
                # only this layer's k, v are ever read: its other weights are dropped at load
                for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                          "post_attention_layernorm"):
                    state.pop(p + n + ".weight")
                kv_w = cat_rows([take(p + f"self_attn.{n}_proj.weight") for n in "kv"])
                layers.append(GemmaLayer(None, pack_as(kv_w, rows), None, None, None,
                                         1 + f32(p + "input_layernorm.weight"), None))
                continue
            q_w = scale_rows(take(p + "self_attn.q_proj.weight"), head_dim**-0.5)  # scale folded into W_q
            layers.append(GemmaLayer(
                qkv_w=pack_as(cat_rows([q_w] + [take(p + f"self_attn.{n}_proj.weight") for n in "kv"]), rows),
                kv_w=None,
                o_w=packed(p + "self_attn.o_proj.weight", rows),
                gate_up_w=pack_as(cat_rows([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]), rows),
                down_w=packed(p + "mlp.down_proj.weight", rows),
                in_norm=None if adaptive else 1 + f32(p + "input_layernorm.weight"),
                post_norm=None if adaptive else 1 + f32(p + "post_attention_layernorm.weight"),
            ))
        return layers

    if isinstance(config, FastConfig):  # PaliGemma alone: every VLM layer, its final norm, the tied head (embed)
        vlm_layers = gemma_layers("vlm", config.vlm.depth, False, 1, kv_only_last=False)  # decoding: one row a step
        # the head read once a token: oneDNN's layout reads it at ~24 GB/s against F.linear's ~15 (1.05 GB in bf16 at
        # full size, a second copy beside the table the lookups gather from)
        head = ops.pack(embed, 1, True) if isinstance(embed, Tensor) and kernels.packed[embed.dtype] else None
        w = EngineWeights(pos_emb, patch_w, patch_b, vision_layers, *post_ln, *proj, embed, vlm_layers, [],
                          final_norm=1 + f32("vlm.norm.weight"), head=head)
        if state:
            raise ValueError(f"engine: {len(state)} tensors were not used: {sorted(state)[:5]}")
        return w
    vlm_layers = gemma_layers("vlm", config.vlm.depth, False, img_rows + config.max_token_len, kv_only_last=True)
    state.pop("vlm.norm.weight")  # the VLM's final norm never reaches the actions
    expert_layers = gemma_layers("expert", config.expert.depth, config.pi05, config.action_horizon, kv_only_last=False)
    w = EngineWeights(pos_emb, patch_w, patch_b, vision_layers, *post_ln, *proj, embed, vlm_layers, expert_layers,
                      f32("action_in_proj.weight"), f32("action_in_proj.bias"),
                      f32("action_out_proj.weight"), f32("action_out_proj.bias"))
    if config.pi05:
        # adaRMS dense layers: only ever applied to the schedule's conditioning (in fp32, once per num_steps),
        # so they are stored as loaded (bf16: 0.23 GB instead of 0.45 GB at full size)
        norms = ("input_layernorm", "post_attention_layernorm")
        w.mod_w = [torch.cat([take(f"expert.layers.{i}.{n}.dense.weight") for n in norms]) for i in range(config.expert.depth)]
        w.mod_b = [torch.cat([take(f"expert.layers.{i}.{n}.dense.bias") for n in norms]) for i in range(config.expert.depth)]
        w.final_mod_w, w.final_mod_b = take("expert.norm.dense.weight"), take("expert.norm.dense.bias")
        w.time_in_w, w.time_in_b = f32("time_mlp_in.weight"), f32("time_mlp_in.bias")
        w.time_out_w, w.time_out_b = f32("time_mlp_out.weight"), f32("time_mlp_out.bias")
    else:
        w.final_norm = 1 + f32("expert.norm.weight")
        w.state_w, w.state_b = f32("state_proj.weight"), f32("state_proj.bias")
        w_in = f32("action_time_mlp_in.weight")  # [We, 2We] over concat[action, time]
        ew = config.expert.width
        w.at_in_action_w, w.at_in_time_w = w_in[:, :ew].contiguous(), w_in[:, ew:].contiguous()
        w.at_in_b = f32("action_time_mlp_in.bias")
        w.at_out_w, w.at_out_b = f32("action_time_mlp_out.weight"), f32("action_time_mlp_out.bias")
    if state:
        raise ValueError(f"engine: {len(state)} tensors were not used: {sorted(state)[:5]}")
    return w


def cat_rows(ws: list) -> Tensor | int8.Int8Weight:
    """Weights stacked along their output rows (fused QKV, gate|up): per-row scales (int8, fp8) make quantising the
    parts and then stacking them the same as quantising the stack."""
    if all(isinstance(w, Tensor) for w in ws):
        return torch.cat(ws)
    if all(isinstance(w, fp8.Fp8Weight) and w.kernel == "emulated" for w in ws):
        return fp8.Fp8Weight(torch.cat([w.q for w in ws]), torch.cat([w.scale for w in ws]), ws[0].dtype)
    if not all(isinstance(w, int8.Int8Weight) and w.kernel == "plain" for w in ws):
        raise TypeError("cat_rows: mixed float / int8 (or already packed) weights")
    cols = ws[0].outlier_cols
    if not all(w.outlier_cols is None if cols is None else w.outlier_cols is not None and torch.equal(w.outlier_cols, cols)
               for w in ws):
        raise ValueError("cat_rows: weights that read the same input have different outlier channels")
    outlier_w = None if cols is None else torch.cat([w.outlier_w for w in ws])
    return int8.Int8Weight(torch.cat([w.q for w in ws]), torch.cat([w.scale for w in ws]), ws[0].dtype,
                      outlier_cols=cols, outlier_w=outlier_w)


def scale_rows(w: Tensor | int8.Int8Weight, c: float) -> Tensor | int8.Int8Weight:
    """c * w (the attention scale folded into W_q): for int8 and fp8, into the per-row scales (and outlier columns)."""
    if isinstance(w, int8.Int8Weight):
        outlier_w = None if w.outlier_w is None else (w.outlier_w.float() * c).to(w.outlier_w.dtype)
        return dataclasses.replace(w, scale=w.scale * c, outlier_w=outlier_w)
    if isinstance(w, fp8.Fp8Weight):
        return dataclasses.replace(w, scale=w.scale * c)
    return (w.float() * c).to(w.dtype)
