"""The fast runtime: the same `sample_actions` contract as the reference, written for inference.

- Weights packed once: fused QKV, fused gate|up, (1 + w) norm weights in fp32; bf16 by default; with
  dtype int8 the big linear weights arrive as `int8.Int8Weight` (quantised by `int8_quantizer` as they were
  loaded) and run as dynamic W8A8 products; with dtype fp8 as `fp8.Fp8Weight` (e4m3, `Fp8Quantizer`).
- Work that cannot change the answer is skipped, not masked: masked cameras are not encoded, padding
  tokens are dropped (each row's valid prefix is packed to the front), the last VLM layer computes only
  its k, v, the pi0 state token runs through the expert once per call (it never sees the actions), and
  only the action tokens run through the expert at each step.
- Everything that depends only on the step schedule is computed once per `num_steps`: the time half of
  `action_time_mlp_in` (pi0), the time MLP and every adaRMS scale/shift/gate (pi0.5).
- One KV buffer per layer, [B, K, Lp + Ls, D], written once for the prefix (and state) and in place for
  the actions at each step; attention is scaled_dot_product_attention with a key mask only when a row
  has padding.
Primitive ops live in `pi0.backends.engine.ops`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pi0.backends.engine import ops
from pi0.backends.engine.buckets import Bucket, BucketRules, Buffers
from pi0.backends.engine.fp8 import Fp8Weight, fp8_kernel
from pi0.backends.engine.int8 import Int8Weight
from pi0.backends.engine.weights import GemmaLayer, choose_kernels, pack_weights
from pi0.model.config import Pi0Config
from pi0.model.functional import interpolate_position_embedding, patchify, posemb, rope_tables
from pi0.model.observation import Observation, sampling_inputs
from pi0.model.rtc import RTC, make_guide
from pi0.timing import StageClock

MLP_BLOCK_BYTES = 32 << 20  # the prefix's MLP runs on blocks of tokens whose gate|up product (fp32) is this size


class Pi0Engine:
    backend = "engine"

    def __init__(self, config: Pi0Config, state: dict[str, Tensor], vision_dtype: torch.dtype | None = None,
                 pack: bool = True, fuse: bool = True):
        """Packs canonical tensors (any dtype; the engine computes in theirs; `int8.Int8Weight`s from
        `int8_quantizer` run as int8 products in their float dtype). Consumes `state`.
        vision_dtype: run SigLIP + projector in another dtype (e.g. fp32, as LeRobot does); default: the weights'.
        pack / fuse: allow oneDNN-packed weights / torch.compile'd kernels where they work on the machine
        (probed once; PI0_PACK=0 / PI0_COMPILE=0 turn them off too). `self.kernels` says what was chosen."""
        self.config = config
        self.dtype = state["vlm.embed_tokens.weight"].dtype  # an Int8Weight's is the float dtype it computes in
        self.device = state["projector.bias"].device
        self.vision_dtype = vision_dtype or self.dtype
        quantized = [t for t in state.values() if isinstance(t, Int8Weight)]  # int8 weights (`int8_quantizer`)
        fp8_weights = [t for t in state.values() if isinstance(t, Fp8Weight)]  # (`Fp8Quantizer`)
        chosen = choose_kernels(self.dtype, self.vision_dtype, self.device, len(quantized), pack, fuse)
        self.fused, self.kernels = chosen.fused, chosen.report
        if fp8_weights:
            self.kernels["fp8_kernel"], why = fp8_kernel(self.device.type, self.device.index)
            self.kernels.update(fp8_tensors=len(fp8_weights), why=self.kernels["why"] + "; " + why)
        if quantized:  # input channels computed in float next to the int8 products, summed over weights
            self.kernels["int8_outlier_columns"] = sum(t.outlier_cols.numel() for t in quantized
                                                       if t.outlier_cols is not None)
        weights = pack_weights(config, state, chosen, self.dtype, self.vision_dtype)
        self.w = weights  # the packed weights (self.w.vlm_layers, ...)
        self._schedules: dict[int, dict[str, Tensor]] = {}
        self.runner = None  # `use_buckets`: calls planned into buckets and run on static buffers

    def use_buckets(self, rules: BucketRules | None = None, capture: bool | None = None, compile: bool = False):
        """Run every call (but real-time chunked ones) as a bucket's static call (`pi0.backends.engine.graphs`):
        on CUDA replayed from a graph captured per bucket. Returns the runner (`runner.warmup(buckets)`)."""
        from pi0.backends.engine.graphs import GraphRunner

        self.runner = GraphRunner(self, rules, capture, compile)
        return self.runner

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
            cond = torch.nn.functional.silu(ops.linear(torch.nn.functional.silu(ops.linear(te, self.w.time_in_w, self.w.time_in_b)),
                                                       self.w.time_out_w, self.w.time_out_b))
            mods = torch.stack([ops.linear(cond, w.float(), b.float()) for w, b in zip(self.w.mod_w, self.w.mod_b)], dim=1)  # [S, depth, 6We]
            final = ops.linear(cond, self.w.final_mod_w.float(), self.w.final_mod_b.float())  # [S, 3We]
            sched = {"mods": mods, "final": final}
        else:
            sched = {"time_bias": ops.linear(te, self.w.at_in_time_w, self.w.at_in_b)}  # [S, We]
        self._schedules[num_steps] = sched
        return sched

    # -- prefix -----------------------------------------------------------------------------

    def embed_images(self, images: Tensor) -> Tensor:
        """[N, 3, S, S] -> [N, (S//p)^2, VLM width] in the engine dtype."""
        v = self.config.vision
        patches, grid = patchify(images.to(self.vision_dtype), v.patch_size)
        x = ops.linear(patches, self.w.patch_w, self.w.patch_b)
        x = x + interpolate_position_embedding(self.w.pos_emb, grid)
        n, l, w = x.shape
        h = v.num_heads
        for layer in self.w.vision_layers:  # each norm / gelu quantises its output for an int8 consumer itself
            qkv = ops.linear(ops.layer_norm_for(x, layer.ln1_w, layer.ln1_b, v.layer_norm_eps, layer.qkv_w),
                             layer.qkv_w, layer.qkv_b)
            q, k, vv = qkv.view(n, l, 3, h, w // h).unbind(2)
            x = ops.linear(ops.mha(q, k, vv), layer.out_w, layer.out_b, residual=x)
            hdn = ops.linear_gelu(ops.layer_norm_for(x, layer.ln2_w, layer.ln2_b, v.layer_norm_eps, layer.fc1_w),
                                  layer.fc1_w, layer.fc1_b, then=layer.fc2_w)
            x = ops.linear(hdn, layer.fc2_w, layer.fc2_b, residual=x)
        x = ops.layer_norm(x, self.w.post_ln_w, self.w.post_ln_b, v.layer_norm_eps)
        return ops.linear(x, self.w.proj_w, self.w.proj_b).to(self.dtype)

    def embed_prefix(self, obs: Observation) -> tuple[Tensor, Tensor, Tensor | None]:
        """Packed prefix: each row's valid camera tokens and valid language tokens, in order, moved to
        the front. Returns prefix [B, Lp, W], n_valid int [B], key_mask bool [B, Lp] (None: no padding)."""
        b = obs.batch_size
        # every valid (camera, row) image goes through SigLIP in one batch; masked ones never do
        pairs = [(c, i) for c, m in enumerate(obs.image_masks) for i in torch.nonzero(m).flatten().tolist()]
        feats = self.embed_images(torch.stack([obs.images[c][i] for c, i in pairs])) if pairs else None
        feat_of = {pair: j for j, pair in enumerate(pairs)}
        scale = self._token_scale()
        seqs = []
        for i in range(b):
            cams = [feats[feat_of[(c, i)]] for c in range(len(obs.images)) if (c, i) in feat_of]
            lang = ops.embedding(self.w.embed, obs.tokens[i][obs.token_masks[i]]) * scale
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
        """Fused projection + RoPE. h [B, L, W] (or quantised for the projection: `int8.Quantized`) -> q [B, L, H, D]
        (or None), k, v [B, K, L, D]."""
        g = self.config.vlm
        q_rows = g.num_heads * g.head_dim
        out = ops.linear(h, layer.kv_w if kv_only else layer.qkv_w)
        b, n, _ = out.shape
        if kv_only:
            q, kv = None, out
        else:
            q, kv = out[..., :q_rows], out[..., q_rows:]
            q = ops.apply_rope(q.view(b, n, g.num_heads, g.head_dim), cos, sin)
        k, v = kv.view(b, n, 2, g.num_kv_heads, g.head_dim).unbind(2)
        k = ops.apply_rope(k, cos, sin)
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def fill_kv_cache(self, prefix: Tensor, key_mask: Tensor | None, k_buf: list[Tensor], v_buf: list[Tensor],
                      last: Tensor | None = None) -> Tensor:
        """One pass of the packed prefix through the VLM, writing k, v [B, K, Lp, D] per layer. Returns the hidden
        states after the last full layer (π0-FAST's, whose layers are all full; pi0's last one computes k, v only).
        last: each row's one position wanted from the last layer ([B], π0-FAST's last valid token): that layer's
        attention, o projection and MLP run on it alone (every position's k, v are still written), and the result
        is [B, 1, W]."""
        g = self.config.vlm
        b, lp, _ = prefix.shape
        pos = torch.arange(lp, device=self.device)[None, :].expand(b, lp)
        cos, sin = rope_tables(pos, g.head_dim, g.rope_theta, self.dtype)
        x = prefix
        for i, layer in enumerate(self.w.vlm_layers):
            kv_only = layer.qkv_w is None  # pi0's last layer: only its k, v are ever read
            h = ops.rms_norm_for(x, layer.in_norm, g.rms_norm_eps, self.dtype, layer.kv_w if kv_only else layer.qkv_w)
            q, k, v = self._qkv(layer, h, cos, sin, kv_only=kv_only)
            k_buf[i][:, :, :lp] = k
            v_buf[i][:, :, :lp] = v
            if kv_only:
                break
            if last is not None and i == len(self.w.vlm_layers) - 1:  # only these rows feed what comes next
                rows = torch.arange(b, device=self.device)
                q, x = q[rows, last][:, None], x[rows, last][:, None]
            x = ops.linear(ops.attention(q, k, v, key_mask), layer.o_w, residual=x)
            self._mlp(x.view(-1, x.shape[-1]), layer, g.rms_norm_eps)
        return x

    def _mlp(self, x: Tensor, layer: GemmaLayer, eps: float) -> None:
        """x [N, W] += MLP(post_norm(x)), in place, a block of rows at a time: every op is per token, and the
        gate|up product is the prefix's widest activation (2 x mlp_dim a token: 107 MB for 816 tokens of Gemma-2B
        in fp32, with the kernel's own buffers as much again), so blocks of MLP_BLOCK_BYTES of it bound the peak
        memory whatever the prefix's length, at the same products."""
        rows = max(1, MLP_BLOCK_BYTES // (2 * self.config.vlm.mlp_dim * 4))  # fp32 bytes a token
        for r in range(0, x.shape[0], rows):
            xb = x[r:r + rows]
            h = ops.rms_norm_for(xb, layer.post_norm, eps, self.dtype, layer.gate_up_w)
            xb.copy_(ops.linear(ops.linear_gated_gelu(h, layer.gate_up_w, self.fused, then=layer.down_w),
                                layer.down_w, residual=xb))

    # -- suffix -----------------------------------------------------------------------------

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        e = self.config.expert
        return rope_tables(positions, e.head_dim, e.rope_theta, self.dtype)

    def _expert_pass(self, x: Tensor, start: int, rope: tuple[Tensor, Tensor], key_mask: Tensor | None,
                     k_buf: list[Tensor], v_buf: list[Tensor], mods: Tensor | None, need_output: bool = True) -> Tensor:
        """Tokens x [B, n, We] at buffer slots start..start+n attend to every key in slots < start+n.
        rope: cos, sin of the tokens' positions; mods [B or 1, depth, 6We] fp32 (pi0.5) or None.
        Returns the last layer's output (pre final norm)."""
        e = self.config.expert
        end = start + x.shape[1]
        cos, sin = rope
        mask = None if key_mask is None else key_mask[:, :end]
        last = len(self.w.expert_layers) - 1
        for i, layer in enumerate(self.w.expert_layers):
            if mods is None:
                h = ops.rms_norm_for(x, layer.in_norm, e.rms_norm_eps, self.dtype, layer.qkv_w)
            else:
                scale, shift, gate, scale2, shift2, gate2 = mods[:, i, None, :].chunk(6, dim=-1)
                h = ops.ada_rms_norm(x, scale, shift, e.rms_norm_eps).to(self.dtype)
            q, k, v = self._qkv(layer, h, cos, sin)
            k_buf[i][:, :, start:end] = k
            v_buf[i][:, :, start:end] = v
            if i == last and not need_output:
                break
            attn = ops.attention(q, k_buf[i][:, :, :end], v_buf[i][:, :, :end], mask)
            if mods is None:
                x = ops.linear(attn, layer.o_w, residual=x)
                h = ops.rms_norm_for(x, layer.post_norm, e.rms_norm_eps, self.dtype, layer.gate_up_w)
            else:  # pi0.5: the gated residuals and adaptive norms of its time conditioning
                x = x + ops.linear(attn, layer.o_w) * gate.to(self.dtype)
                h = ops.ada_rms_norm(x, scale2, shift2, e.rms_norm_eps).to(self.dtype)
            y = ops.linear_gated_gelu(h, layer.gate_up_w, self.fused, then=layer.down_w)
            if mods is None:
                x = ops.linear(y, layer.down_w, residual=x)
            else:
                x = x + ops.linear(y, layer.down_w) * gate2.to(self.dtype)
        return x

    def _token_scale(self) -> Tensor:
        """Gemma's embedding scale, sqrt(width), rounded to the engine dtype as the reference rounds it."""
        return torch.tensor(math.sqrt(self.config.vlm.width), dtype=torch.float32).to(self.dtype)

    def _state_token(self, state: Tensor | None, lp: int, n_valid: Tensor, key_mask: Tensor | None,
                     k_buf: list[Tensor], v_buf: list[Tensor]) -> tuple[int, tuple[Tensor, Tensor]]:
        """pi0's state token into the KV buffers at slot lp (it sees the prefix and itself only, so its k, v are fixed
        for the call), and where the action tokens follow: (their first slot, their RoPE tables, the same every
        step). pi0.5 has no state token."""
        n_state = 0 if self.config.pi05 else 1
        if n_state:
            s = ops.linear(state, self.w.state_w, self.w.state_b)[:, None, :].to(self.dtype)
            self._expert_pass(s, lp, self._rope(n_valid[:, None]), key_mask, k_buf, v_buf, None, need_output=False)
        steps = torch.arange(self.config.action_horizon, device=self.device)[None, :]
        return lp + n_state, self._rope(n_valid[:, None] + n_state + steps)

    def conditions(self, sched: dict[str, Tensor], step: int) -> tuple[Tensor, ...]:
        """What `velocity` takes of the schedule at one step, as tensors (so a compiled step sees one graph for
        every step): pi0 (time_bias [We],), pi0.5 (mods [depth, 6We], final [3We])."""
        if self.config.pi05:
            return sched["mods"][step], sched["final"][step]
        return (sched["time_bias"][step],)

    def velocity(self, x_t: Tensor, cond: tuple[Tensor, ...], act_start: int, rope: tuple[Tensor, Tensor],
                 key_mask: Tensor | None, k_buf: list[Tensor], v_buf: list[Tensor]) -> Tensor:
        """v_t [B, H, action_dim] fp32 at x_t: the action tokens through the expert against the cached prefix."""
        cfg, g = self.config, self.config.expert
        a = ops.linear(x_t, self.w.action_in_w, self.w.action_in_b)  # fp32 [B, H, We]
        if cfg.pi05:
            mods, final = cond
            scale, shift, _ = final[None, None].chunk(3, dim=-1)
            out = self._expert_pass(a.to(self.dtype), act_start, rope, key_mask, k_buf, v_buf, mods[None])
            out = ops.ada_rms_norm(out, scale, shift, g.rms_norm_eps)
        else:
            u = torch.nn.functional.silu(ops.linear(a, self.w.at_in_action_w) + cond[0])
            a = ops.linear(u, self.w.at_out_w, self.w.at_out_b).to(self.dtype)
            out = self._expert_pass(a, act_start, rope, key_mask, k_buf, v_buf, None)
            out = ops.rms_norm(out, self.w.final_norm, g.rms_norm_eps)
        return ops.linear(out, self.w.action_out_w, self.w.action_out_b)  # fp32

    def euler_step(self, x_t: Tensor, cond: tuple[Tensor, ...], dt: float, act_start: int,
                   rope: tuple[Tensor, Tensor], key_mask: Tensor | None, k_buf: list[Tensor],
                   v_buf: list[Tensor]) -> Tensor:
        """One denoising step, x_t + dt * v_t: the unit `pi0.backends.engine.graphs.compiled_step` compiles."""
        return x_t + dt * self.velocity(x_t, cond, act_start, rope, key_mask, k_buf, v_buf)

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
        if self.runner is not None and guide is None:  # a bucket's static call (replayed as a graph on CUDA)
            actions = self.runner(obs, x_t, num_steps)
            clock.lap("graph")
            return actions

        prefix, n_valid, key_mask = self.embed_prefix(obs)
        clock.lap("vision")
        lp = prefix.shape[1]
        n_state = 0 if cfg.pi05 else 1
        total = lp + n_state + horizon
        g = cfg.expert
        k_buf = [torch.empty(b, g.num_kv_heads, total, g.head_dim, dtype=self.dtype, device=self.device)
                 for _ in self.w.expert_layers]
        v_buf = [torch.empty_like(k) for k in k_buf]
        if key_mask is not None:
            key_mask = torch.cat([key_mask, torch.ones(b, n_state + horizon, dtype=torch.bool, device=self.device)], 1)
            assert key_mask.shape[1] == total, f"key mask {key_mask.shape[1]} != prefix+suffix {total}"
        self.fill_kv_cache(prefix, None if key_mask is None else key_mask[:, :lp], k_buf, v_buf)
        act_start, rope = self._state_token(obs.state, lp, n_valid, key_mask, k_buf, v_buf)
        clock.lap("prefix")

        dt = -1.0 / num_steps
        for step in range(num_steps):
            v_t = self.velocity(x_t, self.conditions(sched, step), act_start, rope, key_mask, k_buf, v_buf)
            if guide is not None:
                v_t = guide.velocity(x_t, v_t, 1.0 + step * dt)
            x_t = x_t + dt * v_t
        clock.lap("denoise")
        return x_t

    @torch.no_grad()
    def sample_bucket(self, buf: Buffers, bucket: Bucket, step: Callable[..., Tensor] | None = None) -> None:
        """One call on a bucket's static buffers (`pi0.backends.engine.buckets`): `sample_actions`' work with every
        shape the bucket's and nothing read back to the host, so that a CUDA graph can replay it. Writes buf.out.
        step: the denoising step to run (default `euler_step`; `graphs.compiled_step` compiles it)."""
        lp = bucket.prefix
        prefix = ops.embedding(self.w.embed, buf.ids) * self._token_scale()  # [B, Lp, W]
        if bucket.cameras:
            feats = self.embed_images(buf.images)  # [N, P, W]
            tokens = feats.reshape(-1, feats.shape[-1])[buf.image_index]  # [B, Lp, W]
            prefix = torch.where(buf.is_image[..., None], tokens, prefix)
        key_mask = buf.key_mask  # [B, Lp + n_state + H]
        self.fill_kv_cache(prefix, key_mask[:, :lp], buf.k, buf.v)
        act_start, rope = self._state_token(buf.state, lp, buf.n_valid, key_mask, buf.k, buf.v)
        sched, dt = self._schedule(bucket.steps), -1.0 / bucket.steps
        step = step or self.euler_step
        x_t = buf.noise
        for i in range(bucket.steps):
            x_t = step(x_t, self.conditions(sched, i), dt, act_start, rope, key_mask, buf.k, buf.v)
        buf.out.copy_(x_t)
