"""pi0 / pi0.5 written in ttnn ops, as it runs on a Tenstorrent card: SigLIP, the Gemma prefix filling its KV cache,
the action expert's denoising steps against that cache, the state, time and action paths.

Inputs and masks are made on the host (patches, token ids, the attention masks as additive biases, RoPE's cos / sin,
the flow time's sinusoid in fp64), then every op runs through `self.tt`: ttnn on an open card, or the host executor
(`pi0.backends.ttnn.host`), which the model cannot tell apart. Shapes are static per call; every concatenation asserts
both lengths (the port this project began from failed on prefix + suffix keys, 1490 vs 1541).

Shapes: B batch, Lp prefix length, Ls suffix length, H heads, K kv heads, D head_dim, W width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pi0.backends.ttnn.weights import convert
from pi0.model.config import GemmaConfig, Pi0Config
from pi0.model.functional import (
    MASK_VALUE,
    interpolate_position_embedding,
    make_attn_mask,
    patchify,
    posemb,
    positions_from_mask,
    rope_tables,
    suffix_ar_mask,
    suffix_rows,
)
from pi0.model.observation import Observation, sampling_inputs
from pi0.model.rtc import RTC, guidance_weight, make_guide
from pi0.timing import StageClock


class Pi0TTNN:
    """pi0 / pi0.5 over ttnn tensors. `tt` is ttnn on a card or the host executor; `exact` (an fp32 model) keeps
    every tensor in float32, else activations are bf16 and the weights take `weights.FORMATS`."""

    backend = "ttnn"

    def __init__(self, config: Pi0Config, state: dict[str, Tensor], tt: Any):
        self.config, self.tt = config, tt
        self.exact = next(iter(state.values())).dtype == torch.float32
        self.w = convert(state, config, tt, self.exact)
        self.act = tt.float32 if self.exact else tt.bfloat16  # activations
        self._positions: dict[int, Any] = {}

    @property
    def kernels(self) -> dict[str, Any]:
        """What `pi0 bench` reports of how the model runs."""
        return {"packed_weights": False, "fused_kernels": False, "emulated": self.tt.emulated,
                "why": self.tt.describe()}

    @property
    def ops(self) -> dict[str, Any]:
        """The last call's ttnn op calls per stage, and (emulated) the host's seconds in them."""
        return {"stages": {stage: dict(c) for stage, c in self.tt.counts.items() if stage != "setup"},
                "host_s": {stage: s for stage, s in self.tt.seconds.items() if stage != "setup"},
                "emulated": self.tt.emulated}

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.exact else torch.bfloat16

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where actions come back

    def _put(self, t: Tensor, dtype: Any = None) -> Any:
        return self.tt.from_torch(t, dtype=dtype or self.act, layout=self.tt.TILE_LAYOUT)

    def _cat(self, parts: list[Any], dim: int, what: str, expected: int) -> Any:
        lens = [p.shape[dim] for p in parts]
        assert sum(lens) == expected, f"{what}: parts {lens} sum to {sum(lens)}, expected {expected}"
        out = self.tt.concat(parts, dim)
        assert out.shape[dim] == expected, f"{what}: concat gave {out.shape[dim]}, expected {expected}"
        return out

    def _linear(self, x: Any, name: str, bias: bool = True, dtype: Any = None) -> Any:
        b = self.w[name + ".bias"] if bias else None
        return self.tt.linear(x, self.w[name + ".weight"], bias=b, dtype=dtype or self.act)

    # -- SigLIP -----------------------------------------------------------------------------------------------

    def position_embedding(self, grid: int) -> Any:
        """The learned positions resampled (bicubic, on the host) to a grid x grid image, placed once per grid."""
        if grid not in self._positions:
            pos = self.w["vision.position_embedding.weight"]
            self._positions[grid] = self._put(interpolate_position_embedding(pos.float(), grid)[None])
        return self._positions[grid]

    def embed_image(self, image: Tensor) -> Any:
        """[B, 3, S, S] in [-1, 1] -> [B, (S/p)^2, VLM width]."""
        tt, v = self.tt, self.config.vision
        patches, grid = patchify(image.float(), v.patch_size)  # [B, N, 3 p p]: the stride-p convolution as a GEMM
        x = self._linear(self._put(patches), "vision.patch_embedding")
        x = tt.add(x, self.position_embedding(grid))
        b, n, width = x.shape
        heads, d = v.num_heads, v.head_dim
        for i in range(v.depth):
            p = f"vision.layers.{i}."
            h = tt.layer_norm(x, epsilon=v.layer_norm_eps, weight=self.w[p + "layer_norm1.weight"],
                              bias=self.w[p + "layer_norm1.bias"])
            q, k, val = (tt.permute(tt.reshape(self._linear(h, p + f"self_attn.{proj}_proj"), (b, n, heads, d)),
                                    (0, 2, 1, 3)) for proj in "qkv")  # each [B, heads, N, d]
            logits = tt.multiply(tt.matmul(q, k, transpose_b=True), d**-0.5)  # [B, heads, N, N]
            out = tt.matmul(tt.softmax(logits, -1), val)
            out = tt.reshape(tt.permute(out, (0, 2, 1, 3)), (b, n, width))
            x = tt.add(x, self._linear(out, p + "self_attn.out_proj"))
            h = tt.layer_norm(x, epsilon=v.layer_norm_eps, weight=self.w[p + "layer_norm2.weight"],
                              bias=self.w[p + "layer_norm2.bias"])
            h = tt.gelu(self._linear(h, p + "mlp.fc1"), variant=tt.GeluVariant.Tanh)
            x = tt.add(x, self._linear(h, p + "mlp.fc2"))
        x = tt.layer_norm(x, epsilon=v.layer_norm_eps, weight=self.w["vision.post_layernorm.weight"],
                          bias=self.w["vision.post_layernorm.bias"])
        return self._linear(x, "projector")

    # -- Gemma ------------------------------------------------------------------------------------------------

    def _rope_tables(self, positions: Tensor, g: GemmaConfig) -> tuple[Any, Any]:
        """cos, sin [B, L, 1, D] of rotate-half RoPE at integer `positions` [B, L], made on the host in fp32."""
        return tuple(self._put(t) for t in rope_tables(positions, g.head_dim, g.rope_theta, torch.float32))

    def _rope(self, x: Any, cos: Any, sin: Any) -> Any:
        """x [B, L, heads, D] rotated: x cos + [-x2, x1] sin."""
        tt = self.tt
        b, n, heads, d = x.shape
        x1 = tt.slice(x, [0, 0, 0, 0], [b, n, heads, d // 2])
        x2 = tt.slice(x, [0, 0, 0, d // 2], [b, n, heads, d])
        rotated = self._cat([tt.neg(x2), x1], 3, "rotate-half", d)
        return tt.add(tt.multiply(x, cos), tt.multiply(rotated, sin))

    def _norm(self, x: Any, name: str, g: GemmaConfig, cond: Any) -> tuple[Any, Any]:
        """Gemma's RMSNorm, x * rsqrt(mean(x^2) + eps) * (1 + w); pi0.5's expert: adaptive, (1 + scale) and + shift
        from dense(cond), and the gate for the residual. Returns (normed, gate or None)."""
        tt = self.tt
        if cond is None:
            return tt.rms_norm(x, epsilon=g.rms_norm_eps, weight=self.w[name + ".weight"]), None
        ssg = self._linear(cond, name + ".dense")  # [B, 1, 3 W]
        b, _, three_w = ssg.shape
        width = three_w // 3
        scale, shift, gate = (tt.slice(ssg, [0, 0, i * width], [b, 1, (i + 1) * width]) for i in range(3))
        normed = tt.rms_norm(x, epsilon=g.rms_norm_eps)
        return tt.add(tt.multiply(normed, tt.add(scale, 1.0)), shift), gate

    def _residual(self, x: Any, y: Any, gate: Any) -> Any:
        return self.tt.add(x, y if gate is None else self.tt.multiply(y, gate))

    def _layer(self, prefix: str, g: GemmaConfig, x: Any, cond: Any, rope: tuple[Any, Any], bias: Any,
               past: tuple[Any, Any] | None) -> tuple[Any, tuple[Any, Any]]:
        """One Gemma layer over x [B, L, W]; its queries attend to `past` (k, v [B, K, Lc, D], the cached prefix)
        followed by its own keys, under the additive mask `bias` [B, 1, L, Lc + L]. Returns x and its (k, v)."""
        tt = self.tt
        b, n, _ = x.shape
        h, gate = self._norm(x, prefix + "input_layernorm", g, cond)

        def heads(name: str, count: int) -> Any:
            return tt.reshape(self._linear(h, prefix + f"self_attn.{name}_proj", bias=False), (b, n, count, g.head_dim))

        q = tt.permute(self._rope(heads("q", g.num_heads), *rope), (0, 2, 1, 3))  # [B, H, L, D]
        k = tt.permute(self._rope(heads("k", g.num_kv_heads), *rope), (0, 2, 1, 3))  # [B, K, L, D]
        v = tt.permute(heads("v", g.num_kv_heads), (0, 2, 1, 3))
        keys, values = k, v
        if past is not None:
            lc = past[0].shape[2]
            keys = self._cat([past[0], k], 2, "cached prefix + suffix keys", lc + n)
            values = self._cat([past[1], v], 2, "cached prefix + suffix values", lc + n)
        assert keys.shape[2] == bias.shape[3], f"keys {keys.shape[2]} != mask columns {bias.shape[3]}"
        assert n == bias.shape[2], f"queries {n} != mask rows {bias.shape[2]}"
        groups = g.num_heads // g.num_kv_heads
        if groups > 1:  # kv head j serves q heads j*groups .. (j+1)*groups-1
            keys, values = tt.repeat_interleave(keys, groups, 1), tt.repeat_interleave(values, groups, 1)
        logits = tt.add(tt.multiply(tt.matmul(q, keys, transpose_b=True), g.head_dim**-0.5), bias)  # [B, H, L, Lk]
        out = tt.matmul(tt.softmax(logits, -1), values)  # [B, H, L, D]
        out = tt.reshape(tt.permute(out, (0, 2, 1, 3)), (b, n, g.num_heads * g.head_dim))
        x = self._residual(x, self._linear(out, prefix + "self_attn.o_proj", bias=False), gate)
        h, gate = self._norm(x, prefix + "post_attention_layernorm", g, cond)
        mlp = prefix + "mlp."
        up = tt.multiply(tt.gelu(self._linear(h, mlp + "gate_proj", bias=False), variant=tt.GeluVariant.Tanh),
                         self._linear(h, mlp + "up_proj", bias=False))
        return self._residual(x, self._linear(up, mlp + "down_proj", bias=False), gate), (k, v)

    def _bias(self, mask: Tensor) -> Any:
        """bool [B, Lq, Lk] -> the additive mask [B, 1, Lq, Lk]: 0 where visible, big_vision's finite minus infinity
        elsewhere (a fully masked row softmaxes to uniform, as with a select)."""
        return self._put(torch.where(mask, 0.0, MASK_VALUE)[:, None].float())

    # -- prefix -----------------------------------------------------------------------------------------------

    def prefix(self, obs: Observation, clock: StageClock | None = None) -> tuple[list[tuple[Any, Any]], Tensor]:
        """The VLM's pass over [cameras, language]: the per-layer post-RoPE (k, v) [B, K, Lp, D] and the prefix's
        input mask bool [B, Lp] (host)."""
        tt, cfg = self.tt, self.config
        tt.stage = "vision"
        embs = [self.embed_image(image) for image in obs.images]
        if clock is not None:
            clock.lap("vision")
        tt.stage = "prefix"
        tokens = tt.from_torch(obs.tokens.to(torch.int32), dtype=tt.uint32, layout=tt.ROW_MAJOR_LAYOUT)
        lang = tt.multiply(tt.embedding(tokens, self.w["vlm.embed_tokens.weight"], layout=tt.TILE_LAYOUT,
                                        dtype=self.act), math.sqrt(cfg.vlm.width))
        n_img = sum(e.shape[1] for e in embs)
        x = self._cat([*embs, lang], 1, "prefix (images + language)", n_img + obs.tokens.shape[1])
        masks = [m[:, None].expand(-1, e.shape[1]) for m, e in zip(obs.image_masks, embs, strict=True)]
        input_mask = torch.cat([*masks, obs.token_masks], dim=1)
        assert input_mask.shape[1] == x.shape[1], f"prefix mask {input_mask.shape[1]} != prefix {x.shape[1]}"
        bias = self._bias(make_attn_mask(input_mask, torch.zeros_like(input_mask)))
        rope = self._rope_tables(positions_from_mask(input_mask), cfg.vlm)
        cache = []
        for i in range(cfg.vlm.depth):
            x, kv = self._layer(f"vlm.layers.{i}.", cfg.vlm, x, None, rope, bias, None)
            cache.append(kv)
        if clock is not None:
            clock.lap("prefix")
        return cache, input_mask

    # -- suffix -----------------------------------------------------------------------------------------------

    def _time(self, t: Tensor) -> Any:
        """The flow time's sinusoid [B, 1, We], made on the host in fp64 (its top frequency reaches ~1571 rad, far
        past what a bf16 sine could resolve)."""
        cfg = self.config
        return self._put(posemb(t, cfg.expert.width, cfg.min_period, cfg.max_period)[:, None, :])

    def embed_suffix(self, state: Any, x_t: Any, t: Tensor) -> tuple[Any, Any]:
        """pi0: [state token, H action tokens]; pi0.5: H action tokens, and the adaRMS condition [B, 1, We]."""
        tt, cfg = self.tt, self.config
        horizon, ew = cfg.action_horizon, cfg.expert.width
        a = self._linear(tt.typecast(x_t, self.act), "action_in_proj")  # [B, H, We]
        te = self._time(t)
        if cfg.pi05:
            cond = tt.silu(self._linear(tt.silu(self._linear(te, "time_mlp_in")), "time_mlp_out"))
            return a, cond
        b = a.shape[0]
        te = tt.repeat_interleave(te, horizon, 1)  # [B, H, We]
        at = self._cat([a, te], 2, "action + time features", 2 * ew)
        a = self._linear(tt.silu(self._linear(at, "action_time_mlp_in")), "action_time_mlp_out")
        s = self._linear(state, "state_proj")  # [B, 1, We]
        assert s.shape[0] == b, f"state batch {s.shape[0]} != actions batch {b}"
        return self._cat([s, a], 1, "suffix (state + actions)", 1 + horizon), None

    def suffix_inputs(self, prefix_mask: Tensor) -> tuple[Any, tuple[Any, Any]]:
        """The suffix's rows of the joint [prefix + suffix] mask as a bias [B, 1, Ls, Lp + Ls], and its RoPE tables."""
        cfg = self.config
        ar = suffix_ar_mask(prefix_mask.shape[0], cfg.action_horizon, cfg.pi05)
        mask, positions = suffix_rows(prefix_mask, torch.zeros_like(prefix_mask), ar)  # [B, Ls, Lp + Ls], [B, Ls]
        return self._bias(mask), self._rope_tables(positions, cfg.expert)

    def velocity(self, cache: list[tuple[Any, Any]], state: Any, suffix: tuple[Any, tuple[Any, Any]], x_t: Any,
                 t: Tensor) -> Any:
        """v_t [B, H, action_dim] (float32) of the expert over the suffix, against the cached prefix."""
        cfg = self.config
        x, cond = self.embed_suffix(state, x_t, t)
        bias, rope = suffix
        for i, kv in enumerate(cache):
            x, _ = self._layer(f"expert.layers.{i}.", cfg.expert, x, cond, rope, bias, kv)
        x, _ = self._norm(x, "expert.norm", cfg.expert, cond)
        b, ls, ew = x.shape
        x = self.tt.slice(x, [0, ls - cfg.action_horizon, 0], [b, ls, ew])
        return self._linear(x, "action_out_proj", dtype=self.tt.float32)

    # -- sampling ---------------------------------------------------------------------------------------------

    def sample_actions(self, obs: Observation, *, noise: Tensor | None = None, num_steps: int | None = None,
                       rtc: RTC | list[RTC | None] | None = None, stages: dict[str, float] | None = None) -> Tensor:
        """Flow matching with Euler steps from t=1 (noise) to t=0, the flow state x_t kept in float32 on the device.
        Returns actions [B, H, action_dim] fp32 on the host. rtc: LeRobot's guidance (the identity Jacobian), in
        ttnn ops on the device."""
        tt, cfg = self.tt, self.config
        num_steps, noise = sampling_inputs(cfg, obs, noise, num_steps, "cpu")
        b = obs.batch_size
        guide = make_guide(rtc, b, cfg.action_horizon, cfg.action_dim, "cpu")
        if guide is not None and guide.exact:
            raise ValueError("rtc jacobian='exact' (a backward pass through the expert) runs on the reference backend; "
                             "the TTNN model guides with LeRobot's identity Jacobian (jacobian='identity')")
        clock = StageClock(stages)
        tt.counts.clear()
        tt.seconds.clear()
        cache, prefix_mask = self.prefix(obs, clock)
        tt.stage = "denoise"
        state = None if cfg.pi05 else self._put(obs.state.float()[:, None, :])
        suffix = self.suffix_inputs(prefix_mask)
        x_t = self._put(noise, tt.float32)
        if guide is not None:
            target, weights = self._put(guide.target, tt.float32), self._put(guide.weights, tt.float32)
        dt = -1.0 / num_steps
        for step in range(num_steps):
            time = 1.0 + step * dt
            v_t = self.velocity(cache, state, suffix, x_t, torch.full((b,), time, dtype=torch.float32))
            if guide is not None:  # v_t - g * (target - (x_t - time v_t)) * weights
                g = torch.stack([guidance_weight(time, beta) for beta in guide.betas])[:, None, None]
                x1_hat = tt.subtract(x_t, tt.multiply(v_t, time))
                error = tt.multiply(tt.subtract(target, x1_hat), weights)
                v_t = tt.subtract(v_t, tt.multiply(error, self._put(g, tt.float32)))
            x_t = tt.add(x_t, tt.multiply(v_t, dt))
        actions = tt.to_torch(x_t).float()
        clock.lap("denoise")
        tt.stage = "setup"
        return actions
