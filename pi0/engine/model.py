"""The fast runtime: the same `sample_actions` contract as the reference, written for inference.

- Weights packed once: fused QKV, fused gate|up, (1 + w) norm weights in fp32; bf16 by default; with
  dtype int8 the big linear weights arrive as `ops.Int8Weight` (quantised by `int8_quantizer` as they were
  loaded) and run as dynamic W8A8 products.
- Work that cannot change the answer is skipped, not masked: masked cameras are not encoded, padding
  tokens are dropped (each row's valid prefix is packed to the front), the last VLM layer computes only
  its k, v, the pi0 state token runs through the expert once per call (it never sees the actions), and
  only the action tokens run through the expert at each step.
- Everything that depends only on the step schedule is computed once per `num_steps`: the time half of
  `action_time_mlp_in` (pi0), the time MLP and every adaRMS scale/shift/gate (pi0.5).
- One KV buffer per layer, [B, K, Lp + Ls, D], written once for the prefix (and state) and in place for
  the actions at each step; attention is scaled_dot_product_attention with a key mask only when a row
  has padding.
Primitive ops live in `pi0.engine.ops`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pi0.config import Pi0Config
from pi0.engine import ops
from pi0.functional import interpolate_position_embedding, patchify, posemb
from pi0.observation import Observation, sampling_inputs
from pi0.rtc import RTC, make_guide
from pi0.timing import StageClock


INT8_STAGES = ("vision", "prefix", "expert", "embedding")
_INT8_NAMES = {  # the linear weights of each stage that int8 covers; norms, biases, the time path and heads stay
    "vision": r"vision\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight|projector\.weight",
    "prefix": r"vlm\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight",
    "expert": r"expert\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight",
    "embedding": r"vlm\.embed_tokens\.weight",  # one scale per token row; looked up, never multiplied
}


def int8_quantizer(dtype: torch.dtype, stages: tuple[str, ...] | None = None,
                   qmax: int | None = None) -> Callable[[str, Tensor], Tensor | ops.Int8Weight]:
    """(name, tensor) -> an Int8Weight for the big linear weights of `stages`, else the tensor as it is. Applied
    by the loader to each tensor as it is read, so a full-size int8 model never holds its float weights.
    stages: default all of INT8_STAGES, or PI0_INT8_STAGES (comma-separated; e.g. "prefix,expert,embedding"
    keeps SigLIP in the float dtype). qmax: the weights' integer range; default: what this CPU's int8 kernel
    takes without overflow."""
    if stages is None:
        env = os.environ.get("PI0_INT8_STAGES")
        stages = tuple(s.strip() for s in env.split(",") if s.strip()) if env is not None else INT8_STAGES
    if qmax is None:
        qmax = ops.int8_kernel(dtype, "cpu")[1]
    unknown = set(stages) - set(INT8_STAGES)
    if unknown:
        raise ValueError(f"unknown int8 stages {sorted(unknown)} (PI0_INT8_STAGES?): choose from {', '.join(INT8_STAGES)}")
    pattern = re.compile("|".join(f"(?:{_INT8_NAMES[s]})" for s in stages)) if stages else None

    def quantize(name: str, t: Tensor) -> Tensor | ops.Int8Weight:
        return ops.quantize_weight(t, dtype, qmax) if pattern is not None and pattern.fullmatch(name) else t

    return quantize


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


class Pi0Engine:
    backend = "engine"

    def __init__(self, config: Pi0Config, state: dict[str, Tensor], vision_dtype: torch.dtype | None = None,
                 pack: bool = True, fuse: bool = True):
        """Packs canonical tensors (any dtype; the engine computes in theirs; `ops.Int8Weight`s from
        `int8_quantizer` run as int8 products in their float dtype). Consumes `state`.
        vision_dtype: run SigLIP + projector in another dtype (e.g. fp32, as LeRobot does); default: the weights'.
        pack / fuse: allow oneDNN-packed weights / torch.compile'd kernels where they work on this machine
        (probed once; PI0_PACK=0 / PI0_COMPILE=0 turn them off too). `self.kernels` says what was chosen."""
        self.config = config
        self.dtype = state["vlm.embed_tokens.weight"].dtype  # an Int8Weight's is the float dtype it computes in
        self.device = state["projector.bias"].device
        self.vision_dtype = vision_dtype or self.dtype
        dt = self.dtype
        pack = pack and os.environ.get("PI0_PACK", "1") != "0"
        fuse = fuse and os.environ.get("PI0_COMPILE", "1") != "0"
        int8 = sum(isinstance(t, ops.Int8Weight) for t in state.values())
        names = ("gated_gelu", "quantize_rows", "rescale") if int8 else ("gated_gelu",)
        probes = {n: ops.fusion_works(dt, self.device.type, n) if fuse else (False, "compiled kernels off") for n in names}
        self.fused = probes["gated_gelu"][0]
        self._compiled = frozenset(n for n, (ok, _) in probes.items() if ok)  # what the int8 products run compiled
        self._pack = {d: ops.packing_works(d, self.device.type) if pack else (False, "packing off")
                      for d in {dt, self.vision_dtype}}
        self.kernels = {"packed_weights": self._pack[dt][0], "fused_kernels": self.fused,
                        "why": "; ".join([self._pack[dt][1]] + sorted({why for _, why in probes.values()}))}
        self.int8_kernel = None
        if int8:
            self.int8_kernel, _, why_int8 = ops.int8_kernel(dt, self.device.type)
            self.kernels.update(int8_kernel=self.int8_kernel, int8_tensors=int8,
                                why=self.kernels["why"] + "; " + why_int8)

        def take(name: str, dtype: torch.dtype | None = dt) -> Tensor:
            t = state.pop(name)
            if isinstance(t, ops.Int8Weight):
                return t
            return t if dtype is None or t.dtype == dtype else t.to(dtype)

        def f32(name: str) -> Tensor:
            return take(name, torch.float32)

        v = config.vision
        vdt = self.vision_dtype
        img_rows = config.num_cameras * v.num_patches  # GEMM row-count hint for the packed layouts
        self.pos_emb = take("vision.position_embedding.weight", vdt)

        def pack_as(w: Tensor | ops.Int8Weight, rows: int) -> Tensor | ops.Int8Weight:
            if isinstance(w, ops.Int8Weight):
                return ops.pack_int8(w, rows, self.int8_kernel, self._compiled)
            return ops.pack(w, rows, self._pack[w.dtype][0])

        def packed(name: str, rows: int, dtype: torch.dtype = dt) -> Tensor:
            return pack_as(take(name, dtype), rows)

        def packed_2d(name: str, rows: int, dtype: torch.dtype) -> Tensor:
            return pack_as(take(name, dtype).flatten(1), rows)

        self.patch_w = packed_2d("vision.patch_embedding.weight", img_rows, vdt)  # the conv as a linear map
        self.patch_b = take("vision.patch_embedding.bias", vdt)
        self.vision_layers = []
        for i in range(v.depth):
            p = f"vision.layers.{i}."
            self.vision_layers.append(VisionLayer(
                ln1_w=take(p + "layer_norm1.weight", vdt), ln1_b=take(p + "layer_norm1.bias", vdt),
                qkv_w=pack_as(ops.cat_rows([take(p + f"self_attn.{n}_proj.weight", vdt) for n in "qkv"]), img_rows),
                qkv_b=torch.cat([take(p + f"self_attn.{n}_proj.bias", vdt) for n in "qkv"]),
                out_w=packed(p + "self_attn.out_proj.weight", img_rows, vdt), out_b=take(p + "self_attn.out_proj.bias", vdt),
                ln2_w=take(p + "layer_norm2.weight", vdt), ln2_b=take(p + "layer_norm2.bias", vdt),
                fc1_w=packed(p + "mlp.fc1.weight", img_rows, vdt), fc1_b=take(p + "mlp.fc1.bias", vdt),
                fc2_w=packed(p + "mlp.fc2.weight", img_rows, vdt), fc2_b=take(p + "mlp.fc2.bias", vdt),
            ))
        self.post_ln_w, self.post_ln_b = take("vision.post_layernorm.weight", vdt), take("vision.post_layernorm.bias", vdt)
        self.proj_w, self.proj_b = packed("projector.weight", img_rows, vdt), take("projector.bias", vdt)
        self.embed = take("vlm.embed_tokens.weight")

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
                    kv_w = ops.cat_rows([take(p + f"self_attn.{n}_proj.weight") for n in "kv"])
                    layers.append(GemmaLayer(None, pack_as(kv_w, rows), None, None, None,
                                             1 + f32(p + "input_layernorm.weight"), None))
                    continue
                q_w = ops.scale_rows(take(p + "self_attn.q_proj.weight"), head_dim**-0.5)  # scale folded into W_q
                layers.append(GemmaLayer(
                    qkv_w=pack_as(ops.cat_rows([q_w] + [take(p + f"self_attn.{n}_proj.weight") for n in "kv"]), rows),
                    kv_w=None,
                    o_w=packed(p + "self_attn.o_proj.weight", rows),
                    gate_up_w=pack_as(ops.cat_rows([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]), rows),
                    down_w=packed(p + "mlp.down_proj.weight", rows),
                    in_norm=None if adaptive else 1 + f32(p + "input_layernorm.weight"),
                    post_norm=None if adaptive else 1 + f32(p + "post_attention_layernorm.weight"),
                ))
            return layers

        prefix_rows = img_rows + config.max_token_len
        self.vlm_layers = gemma_layers("vlm", config.vlm.depth, False, prefix_rows, kv_only_last=True)
        state.pop("vlm.norm.weight")  # the VLM's final norm never reaches the actions
        self.expert_layers = gemma_layers("expert", config.expert.depth, config.pi05, config.action_horizon, kv_only_last=False)
        if config.pi05:
            # adaRMS dense layers: only ever applied to the schedule's conditioning (in fp32, once per num_steps),
            # so they are stored as loaded (bf16: 0.23 GB instead of 0.45 GB at full size)
            norms = ("input_layernorm", "post_attention_layernorm")
            self.mod_w = [torch.cat([take(f"expert.layers.{i}.{n}.dense.weight") for n in norms]) for i in range(config.expert.depth)]
            self.mod_b = [torch.cat([take(f"expert.layers.{i}.{n}.dense.bias") for n in norms]) for i in range(config.expert.depth)]
            self.final_mod_w, self.final_mod_b = take("expert.norm.dense.weight"), take("expert.norm.dense.bias")
            self.time_in_w, self.time_in_b = f32("time_mlp_in.weight"), f32("time_mlp_in.bias")
            self.time_out_w, self.time_out_b = f32("time_mlp_out.weight"), f32("time_mlp_out.bias")
        else:
            self.final_norm = 1 + f32("expert.norm.weight")
            self.state_w, self.state_b = f32("state_proj.weight"), f32("state_proj.bias")
            w_in = f32("action_time_mlp_in.weight")  # [We, 2We] over concat[action, time]
            ew = config.expert.width
            self.at_in_action_w, self.at_in_time_w = w_in[:, :ew].contiguous(), w_in[:, ew:].contiguous()
            self.at_in_b = f32("action_time_mlp_in.bias")
            self.at_out_w, self.at_out_b = f32("action_time_mlp_out.weight"), f32("action_time_mlp_out.bias")
        self.action_in_w, self.action_in_b = f32("action_in_proj.weight"), f32("action_in_proj.bias")
        self.action_out_w, self.action_out_b = f32("action_out_proj.weight"), f32("action_out_proj.bias")
        if state:
            raise ValueError(f"engine: {len(state)} tensors were not used: {sorted(state)[:5]}")
        self._schedules: dict[int, dict[str, Tensor]] = {}

    # -- schedule ---------------------------------------------------------------------------

    def _schedule(self, num_steps: int) -> dict[str, Tensor]:
        """What depends only on t, once per num_steps: [S, ...] fp32 (S = num_steps)."""
        if num_steps in self._schedules:
            return self._schedules[num_steps]
        cfg = self.config
        dt = -1.0 / num_steps
        t = torch.tensor([1.0 + i * dt for i in range(num_steps)], dtype=torch.float32, device=self.device)
        te = posemb(t, cfg.expert.width, cfg.min_period, cfg.max_period)  # [S, We]
        if cfg.pi05:
            cond = torch.nn.functional.silu(ops.linear(torch.nn.functional.silu(ops.linear(te, self.time_in_w, self.time_in_b)),
                                                       self.time_out_w, self.time_out_b))
            mods = torch.stack([ops.linear(cond, w.float(), b.float()) for w, b in zip(self.mod_w, self.mod_b)], dim=1)  # [S, depth, 6We]
            final = ops.linear(cond, self.final_mod_w.float(), self.final_mod_b.float())  # [S, 3We]
            sched = {"mods": mods, "final": final}
        else:
            sched = {"time_bias": ops.linear(te, self.at_in_time_w, self.at_in_b)}  # [S, We]
        self._schedules[num_steps] = sched
        return sched

    # -- prefix -----------------------------------------------------------------------------

    def embed_images(self, images: Tensor) -> Tensor:
        """[N, 3, S, S] -> [N, (S//p)^2, VLM width] in the engine dtype."""
        v = self.config.vision
        patches, grid = patchify(images.to(self.vision_dtype), v.patch_size)
        x = ops.linear(patches, self.patch_w, self.patch_b)
        x = x + interpolate_position_embedding(self.pos_emb, grid)
        n, l, w = x.shape
        h = v.num_heads
        for layer in self.vision_layers:
            qkv = ops.linear(ops.layer_norm(x, layer.ln1_w, layer.ln1_b, v.layer_norm_eps), layer.qkv_w, layer.qkv_b)
            q, k, vv = qkv.view(n, l, 3, h, w // h).unbind(2)
            x = x + ops.linear(ops.mha(q, k, vv), layer.out_w, layer.out_b)
            hdn = ops.linear(ops.layer_norm(x, layer.ln2_w, layer.ln2_b, v.layer_norm_eps), layer.fc1_w, layer.fc1_b)
            x = x + ops.linear(ops.gelu_tanh(hdn), layer.fc2_w, layer.fc2_b)
        x = ops.layer_norm(x, self.post_ln_w, self.post_ln_b, v.layer_norm_eps)
        return ops.linear(x, self.proj_w, self.proj_b).to(self.dtype)

    def embed_prefix(self, obs: Observation) -> tuple[Tensor, Tensor, Tensor | None]:
        """Packed prefix: each row's valid camera tokens and valid language tokens, in order, moved to
        the front. Returns prefix [B, Lp, W], n_valid int [B], key_mask bool [B, Lp] (None: no padding)."""
        b = obs.batch_size
        # every valid (camera, row) image goes through SigLIP in one batch; masked ones never do
        pairs = [(c, i) for c, m in enumerate(obs.image_masks) for i in torch.nonzero(m).flatten().tolist()]
        feats = self.embed_images(torch.stack([obs.images[c][i] for c, i in pairs])) if pairs else None
        feat_of = {pair: j for j, pair in enumerate(pairs)}
        scale = torch.tensor(math.sqrt(self.config.vlm.width), dtype=torch.float32).to(self.dtype)
        seqs = []
        for i in range(b):
            cams = [feats[feat_of[(c, i)]] for c in range(len(obs.images)) if (c, i) in feat_of]
            lang = ops.embedding(self.embed, obs.tokens[i][obs.token_masks[i]]) * scale
            seqs.append(torch.cat(cams + [lang]))
            want = len(cams) * (feats.shape[1] if pairs else 0) + len(lang)
            assert len(seqs[-1]) == want, f"row {i}: packed prefix {len(seqs[-1])} != {len(cams)} cameras + {len(lang)} tokens"
        n_valid = torch.tensor([len(s) for s in seqs], device=self.device)
        lp = int(n_valid.max())
        if int(n_valid.min()) == lp:
            return torch.stack(seqs), n_valid, None
        prefix = torch.zeros(b, lp, self.config.vlm.width, dtype=self.dtype, device=self.device)
        for i, s in enumerate(seqs):
            prefix[i, : len(s)] = s
        key_mask = torch.arange(lp, device=self.device)[None, :] < n_valid[:, None]
        return prefix, n_valid, key_mask

    def _qkv(self, layer: GemmaLayer, h: Tensor, cos: Tensor, sin: Tensor, kv_only: bool = False):
        """Fused projection + RoPE. h [B, L, W] -> q [B, L, H, D] (or None), k, v [B, K, L, D]."""
        g = self.config.vlm
        b, n, _ = h.shape
        q_rows = g.num_heads * g.head_dim
        out = ops.linear(h, layer.kv_w if kv_only else layer.qkv_w)
        if kv_only:
            q, kv = None, out
        else:
            q, kv = out[..., :q_rows], out[..., q_rows:]
            q = ops.apply_rope(q.view(b, n, g.num_heads, g.head_dim), cos, sin)
        k, v = kv.view(b, n, 2, g.num_kv_heads, g.head_dim).unbind(2)
        k = ops.apply_rope(k, cos, sin)
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def fill_kv_cache(self, prefix: Tensor, key_mask: Tensor | None, k_buf: list[Tensor], v_buf: list[Tensor]) -> None:
        """One pass of the packed prefix through the VLM, writing k, v [B, K, Lp, D] per layer."""
        g = self.config.vlm
        b, lp, _ = prefix.shape
        pos = torch.arange(lp, device=self.device)[None, :].expand(b, lp)
        cos, sin = ops.rope_tables(pos, g.head_dim, g.rope_theta, self.dtype)
        x = prefix
        last = len(self.vlm_layers) - 1
        for i, layer in enumerate(self.vlm_layers):
            h = ops.rms_norm(x, layer.in_norm, g.rms_norm_eps).to(self.dtype)
            q, k, v = self._qkv(layer, h, cos, sin, kv_only=i == last)
            k_buf[i][:, :, :lp] = k
            v_buf[i][:, :, :lp] = v
            if i == last:  # only the last layer's k, v are ever read
                break
            x = x + ops.linear(ops.attention(q, k, v, key_mask), layer.o_w)
            h = ops.rms_norm(x, layer.post_norm, g.rms_norm_eps).to(self.dtype)
            x = x + ops.linear(ops.linear_gated_gelu(h, layer.gate_up_w, self.fused), layer.down_w)

    # -- suffix -----------------------------------------------------------------------------

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        e = self.config.expert
        return ops.rope_tables(positions, e.head_dim, e.rope_theta, self.dtype)

    def _expert_pass(self, x: Tensor, start: int, rope: tuple[Tensor, Tensor], key_mask: Tensor | None,
                     k_buf: list[Tensor], v_buf: list[Tensor], mods: Tensor | None, need_output: bool = True) -> Tensor:
        """Tokens x [B, n, We] at buffer slots start..start+n attend to every key in slots < start+n.
        rope: cos, sin of the tokens' positions; mods [B or 1, depth, 6We] fp32 (pi0.5) or None.
        Returns the last layer's output (pre final norm)."""
        e = self.config.expert
        end = start + x.shape[1]
        cos, sin = rope
        mask = None if key_mask is None else key_mask[:, :end]
        last = len(self.expert_layers) - 1
        for i, layer in enumerate(self.expert_layers):
            if mods is None:
                h = ops.rms_norm(x, layer.in_norm, e.rms_norm_eps).to(self.dtype)
            else:
                scale, shift, gate, scale2, shift2, gate2 = mods[:, i, None, :].chunk(6, dim=-1)
                h = ops.ada_rms_norm(x, scale, shift, e.rms_norm_eps).to(self.dtype)
            q, k, v = self._qkv(layer, h, cos, sin)
            k_buf[i][:, :, start:end] = k
            v_buf[i][:, :, start:end] = v
            if i == last and not need_output:
                break
            y = ops.linear(ops.attention(q, k_buf[i][:, :, :end], v_buf[i][:, :, :end], mask), layer.o_w)
            x = x + (y if mods is None else y * gate.to(self.dtype))
            if mods is None:
                h = ops.rms_norm(x, layer.post_norm, e.rms_norm_eps).to(self.dtype)
            else:
                h = ops.ada_rms_norm(x, scale2, shift2, e.rms_norm_eps).to(self.dtype)
            y = ops.linear(ops.linear_gated_gelu(h, layer.gate_up_w, self.fused), layer.down_w)
            x = x + (y if mods is None else y * gate2.to(self.dtype))
        return x

    @torch.no_grad()
    def sample_actions(self, obs: Observation, *, noise: Tensor | None = None, num_steps: int | None = None,
                       stages: dict[str, float] | None = None, rtc: RTC | list[RTC | None] | None = None) -> Tensor:
        """Same contract as the reference: actions [B, H, action_dim] fp32. rtc: real-time chunking
        (LeRobot's identity-Jacobian guidance: elementwise work only)."""
        cfg = self.config
        num_steps, x_t = sampling_inputs(cfg, obs, noise, num_steps, self.device)
        obs = obs.to(self.device, torch.float32)
        b, horizon = obs.batch_size, cfg.action_horizon
        guide = make_guide(rtc, b, horizon, cfg.action_dim, self.device)
        if guide is not None and guide.exact:
            raise ValueError("rtc jacobian='exact' (a backward pass through the expert) runs on the reference "
                             "backend only; the engine computes LeRobot's identity-Jacobian guidance")
        sched = self._schedule(num_steps)
        clock = StageClock(stages)

        prefix, n_valid, key_mask = self.embed_prefix(obs)
        clock.lap("vision")
        lp = prefix.shape[1]
        n_state = 0 if cfg.pi05 else 1
        total = lp + n_state + horizon
        g = cfg.expert
        k_buf = [torch.empty(b, g.num_kv_heads, total, g.head_dim, dtype=self.dtype, device=self.device)
                 for _ in self.expert_layers]
        v_buf = [torch.empty_like(k) for k in k_buf]
        if key_mask is not None:
            key_mask = torch.cat([key_mask, torch.ones(b, n_state + horizon, dtype=torch.bool, device=self.device)], 1)
            assert key_mask.shape[1] == total, f"key mask {key_mask.shape[1]} != prefix+suffix {total}"
        self.fill_kv_cache(prefix, None if key_mask is None else key_mask[:, :lp], k_buf, v_buf)
        if not cfg.pi05:  # the state token sees the prefix and itself only: its k, v are fixed for the call
            s = ops.linear(obs.state, self.state_w, self.state_b)[:, None, :].to(self.dtype)
            self._expert_pass(s, lp, self._rope(n_valid[:, None]), key_mask, k_buf, v_buf, None, need_output=False)
        clock.lap("prefix")

        act_start = lp + n_state
        rope = self._rope(n_valid[:, None] + n_state + torch.arange(horizon, device=self.device)[None, :])  # same every step
        dt = -1.0 / num_steps
        for step in range(num_steps):
            a = ops.linear(x_t, self.action_in_w, self.action_in_b)  # fp32 [B, H, We]
            if cfg.pi05:
                mods = sched["mods"][step][None]
                scale, shift, _ = sched["final"][step][None, None].chunk(3, dim=-1)
                out = self._expert_pass(a.to(self.dtype), act_start, rope, key_mask, k_buf, v_buf, mods)
                out = ops.ada_rms_norm(out, scale, shift, g.rms_norm_eps)
            else:
                u = torch.nn.functional.silu(ops.linear(a, self.at_in_action_w) + sched["time_bias"][step])
                a = ops.linear(u, self.at_out_w, self.at_out_b).to(self.dtype)
                out = self._expert_pass(a, act_start, rope, key_mask, k_buf, v_buf, None)
                out = ops.rms_norm(out, self.final_norm, g.rms_norm_eps)
            v_t = ops.linear(out, self.action_out_w, self.action_out_b)  # fp32
            if guide is not None:
                v_t = guide.velocity(x_t, v_t, 1.0 + step * dt)
            x_t = x_t + dt * v_t
        clock.lap("denoise")
        return x_t
