"""The numeric specification of pi0 / pi0.5: plain fp32 PyTorch, op for op the openpi math
(../shared/spec/pi0_math.md). Readable first; no speed tricks.

Shapes: B batch, Lp prefix length, Ls suffix length, H heads, K kv heads, D head_dim, W width.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from pi0.backends.reference.gemma import Gemma, joint_layer
from pi0.backends.reference.siglip import SiglipVision, checkpointed
from pi0.model.config import Pi0Config
from pi0.model.fast_config import FastConfig
from pi0.model.functional import make_attn_mask, posemb, positions_from_mask, sample_time, suffix_ar_mask, suffix_rows
from pi0.model.observation import Observation, sampling_inputs
from pi0.model.rtc import RTC, Guide, make_guide
from pi0.timing import StageClock

# ---------------------------------------------------------------------------------------------
# SigLIP vision tower


# ---------------------------------------------------------------------------------------------
# Gemma (the VLM and the action expert share one attention per layer)



# ---------------------------------------------------------------------------------------------
# pi0 / pi0.5


def cat_checked(parts: list[Tensor], dim: int, what: str, expected: int | None = None) -> Tensor:
    """torch.cat that names the parts' lengths (and the expected total) when they disagree."""
    out = torch.cat(parts, dim=dim)
    if expected is not None:
        lens = [p.shape[dim] for p in parts]
        assert out.shape[dim] == expected, f"{what}: parts {lens} sum to {out.shape[dim]}, expected {expected}"
    return out


class PaliGemma(nn.Module):
    """SigLIP, the projector and the VLM: the prefix pi0, pi0.5 and π0-FAST share (cameras and prompt, read in one
    pass). `config` has `vision` and `vlm`."""

    def __init__(self, config: Pi0Config | FastConfig):
        super().__init__()
        self.config = config
        self.vision = SiglipVision(config.vision)
        self.projector = nn.Linear(config.vision.width, config.vlm.width)
        self.vlm = Gemma(config.vlm)

    # -- prefix -----------------------------------------------------------------------------

    def embed_image(self, image: Tensor) -> Tensor:
        """[B, 3, S, S] in [-1, 1] -> [B, (S//p)^2, VLM width]. Image tokens are not scaled."""
        return self.projector(self.vision(image))

    def embed_text(self, tokens: Tensor) -> Tensor:
        """int [B, L] -> [B, L, W], scaled by sqrt(W) (in the embedding's dtype) as Gemma embeds text."""
        emb = self.vlm.embed_tokens(tokens)
        return emb * torch.tensor(math.sqrt(self.config.vlm.width), dtype=torch.float32).to(emb.dtype)

    def embed_prefix(self, obs: Observation, image_embs: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """prefix [B, Lp, W] = [cam_0 .. cam_n, language]; input_mask bool [B, Lp]; ar_mask bool [B, Lp] (all False).
        image_embs: the cameras' embed_image outputs, if already computed."""
        if image_embs is None:
            image_embs = [self.embed_image(image) for image in obs.images]
        embs, masks = [], []
        for emb, image_mask in zip(image_embs, obs.image_masks, strict=True):
            embs.append(emb)
            masks.append(image_mask[:, None].expand(-1, emb.shape[1]))
        lang = self.embed_text(obs.tokens)
        embs.append(lang)
        masks.append(obs.token_masks)
        n_img = sum(e.shape[1] for e in embs[:-1])
        prefix = cat_checked(embs, 1, "prefix (images + language)", n_img + obs.tokens.shape[1])
        input_mask = cat_checked(masks, 1, "prefix input_mask", prefix.shape[1])
        ar_mask = torch.zeros_like(input_mask)
        return prefix, input_mask, ar_mask

    def fill_kv_cache(self, prefix: Tensor, input_mask: Tensor, ar_mask: Tensor) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """One pass of the prefix through the VLM. Returns the per-layer post-RoPE (k, v) and the prefix output after
        the VLM's final norm (π0-FAST's first logits read its last token; pi0's actions never read it)."""
        mask = make_attn_mask(input_mask, ar_mask)
        positions = positions_from_mask(input_mask)
        cache, x = [], prefix
        for layer in self.vlm.layers:
            (x,), kv = joint_layer([layer], [x], [None], positions, mask)
            cache.append(kv)
        return cache, self.vlm.norm(x)[0]


class Pi0Reference(PaliGemma):
    """pi0 / pi0.5 in plain PyTorch. Parameter names are the canonical checkpoint layout."""

    backend = "reference"

    def __init__(self, config: Pi0Config):
        super().__init__(config)
        ew = config.expert.width
        self.expert = Gemma(config.expert, cond_dim=ew if config.pi05 else None)
        self.action_in_proj = nn.Linear(config.action_dim, ew)
        self.action_out_proj = nn.Linear(ew, config.action_dim)
        if config.pi05:
            self.time_mlp_in = nn.Linear(ew, ew)
            self.time_mlp_out = nn.Linear(ew, ew)
        else:
            self.state_proj = nn.Linear(config.state_dim, ew)
            self.action_time_mlp_in = nn.Linear(2 * ew, ew)
            self.action_time_mlp_out = nn.Linear(ew, ew)

    @property
    def dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    # -- suffix -----------------------------------------------------------------------------

    def embed_suffix(self, state: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """pi0: [state token, H action tokens]; pi0.5: H action tokens and the adaRMS condition.
        Returns suffix [B, Ls, We], ar_mask bool [B, Ls], cond [B, We] or None."""
        cfg = self.config
        b, horizon, _ = x_t.shape
        te = posemb(t, cfg.expert.width, cfg.min_period, cfg.max_period).to(self.dtype)  # [B, We]
        a = self.action_in_proj(x_t.to(self.dtype))  # [B, H, We]
        ar_mask = suffix_ar_mask(b, horizon, cfg.pi05, x_t.device)
        if cfg.pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(te))))
            return a, ar_mask, cond
        s = self.state_proj(state.to(self.dtype))[:, None, :]  # [B, 1, We]
        at = cat_checked([a, te[:, None, :].expand_as(a)], 2, "action+time features", 2 * cfg.expert.width)
        a = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(at)))
        suffix = cat_checked([s, a], 1, "suffix (state + actions)", 1 + horizon)
        return suffix, ar_mask, None

    def denoise_step(self, state: Tensor, prefix_mask: Tensor, prefix_ar: Tensor,
                     kv_cache: list[tuple[Tensor, Tensor]], x_t: Tensor, t: Tensor) -> Tensor:
        """v_t [B, H, action_dim] (fp32) from the suffix against the cached prefix k, v."""
        suffix, suffix_ar, cond = self.embed_suffix(state, x_t, t)
        mask, positions = suffix_rows(prefix_mask, prefix_ar, suffix_ar)  # [B, Ls, Lp + Ls], [B, Ls]
        x = suffix
        for layer, kv in zip(self.expert.layers, kv_cache, strict=True):
            (x,), _ = joint_layer([layer], [x], [cond], positions, mask, past_kv=kv)
        x = self.expert.norm(x, cond)[0]
        return self.action_out_proj(x[:, -self.config.action_horizon :]).float()

    def forward_uncached(self, obs: Observation, x_t: Tensor, t: Tensor) -> Tensor:
        """v_t from one joint pass over prefix + suffix (no cache): what training differentiates, and the
        check on the cached path. With `gradient_checkpointing` set, each layer's activations are recomputed
        in the backward pass instead of being kept (same numbers, less memory)."""
        obs = obs.to(self.device, self.dtype)
        prefix, prefix_mask, prefix_ar = self.embed_prefix(obs)
        suffix, suffix_ar, cond = self.embed_suffix(obs.state, x_t, t)
        lp, ls = prefix.shape[1], suffix.shape[1]
        input_mask = cat_checked([prefix_mask, torch.ones_like(suffix_ar)], 1, "prefix+suffix input_mask", lp + ls)
        ar_mask = cat_checked([prefix_ar, suffix_ar], 1, "prefix+suffix ar_mask", lp + ls)
        mask, positions = make_attn_mask(input_mask, ar_mask), positions_from_mask(input_mask)
        xs = [prefix, suffix]
        for vlm_layer, expert_layer in zip(self.vlm.layers, self.expert.layers, strict=True):
            xs, _ = checkpointed(self.gradient_checkpointing, joint_layer, [vlm_layer, expert_layer], xs, [None, cond],
                                 positions, mask)
        x = self.expert.norm(xs[1], cond)[0]
        return self.action_out_proj(x[:, -self.config.action_horizon :]).float()

    # -- training ---------------------------------------------------------------------------

    gradient_checkpointing = False

    def gradient_checkpointing_(self, enabled: bool = True) -> "Pi0Reference":
        """Recompute each SigLIP and joint Gemma layer in the backward pass instead of keeping its activations."""
        self.gradient_checkpointing = self.vision.gradient_checkpointing = enabled
        return self

    def compute_loss(self, obs: Observation, actions: Tensor, *, noise: Tensor | None = None,
                     time: Tensor | None = None) -> Tensor:
        """The flow-matching training loss per element, [B, H, action_dim] fp32 (unreduced, as LeRobot's
        PI0Pytorch.forward): x_t = t * noise + (1 - t) * actions, u_t = noise - actions, (v_t - u_t)^2 with
        v_t from one joint pass of prefix and suffix. actions: [B, H, action_dim] in model space (normalised,
        zero-padded to action_dim). noise ~ N(0, 1) and time ~ Beta(1.5, 1) * 0.999 + 0.001 when not given."""
        cfg = self.config
        obs.validate(cfg)
        b = obs.batch_size
        shape = (b, cfg.action_horizon, cfg.action_dim)
        if tuple(actions.shape) != shape:
            raise ValueError(f"actions must be {list(shape)} (batch, action_horizon, action_dim: normalised and "
                             f"zero-padded), got {list(actions.shape)}")
        actions = actions.to(self.device, torch.float32)
        noise = torch.randn(shape, device=self.device) if noise is None else noise.to(self.device, torch.float32)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must be {list(shape)}, got {list(noise.shape)}")
        if time is None:  # seeded from torch's generator, so torch.manual_seed reproduces noise and time alike
            time = sample_time(b, np.random.default_rng(int(torch.randint(2**62, (1,))))).to(self.device)
        time = time.to(self.device, torch.float32)
        if tuple(time.shape) != (b,):
            raise ValueError(f"time must be [{b}] (one flow time per row), got {list(time.shape)}")
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        u_t = noise - actions
        v_t = self.forward_uncached(obs, x_t, time)
        return F.mse_loss(u_t, v_t, reduction="none")

    # -- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def sample_actions(self, obs: Observation, *, noise: Tensor | None = None, num_steps: int | None = None,
                       stages: dict[str, float] | None = None, rtc: RTC | list[RTC | None] | None = None) -> Tensor:
        """Flow matching with Euler steps from t=1 (noise) to t=0. Returns actions [B, H, action_dim] fp32.
        stages: if given, filled with seconds spent in vision, prefix (KV cache) and denoise.
        rtc: real-time chunking guidance toward a previous chunk (pi0.model.rtc); None is plain sampling."""
        cfg = self.config
        num_steps, x_t = sampling_inputs(cfg, obs, noise, num_steps, self.device)
        obs = obs.to(self.device, self.dtype)
        b = obs.batch_size
        guide = make_guide(rtc, b, cfg.action_horizon, cfg.action_dim, self.device)
        clock = StageClock(stages)
        image_embs = [self.embed_image(image) for image in obs.images]
        clock.lap("vision")
        prefix, prefix_mask, prefix_ar = self.embed_prefix(obs, image_embs)
        kv_cache, _ = self.fill_kv_cache(prefix, prefix_mask, prefix_ar)
        clock.lap("prefix")
        dt = -1.0 / num_steps
        for step in range(num_steps):
            time = 1.0 + step * dt
            t = torch.full((b,), time, dtype=torch.float32, device=self.device)
            if guide is not None and guide.exact:
                v_t = self._exact_guided_velocity(guide, obs.state, prefix_mask, prefix_ar, kv_cache, x_t, t, time)
            else:
                v_t = self.denoise_step(obs.state, prefix_mask, prefix_ar, kv_cache, x_t, t)
                if guide is not None:
                    v_t = guide.velocity(x_t, v_t, time)
            x_t = x_t + dt * v_t
        clock.lap("denoise")
        return x_t

    def _exact_guided_velocity(self, guide: Guide, state: Tensor, prefix_mask: Tensor, prefix_ar: Tensor,
                               kv_cache: list[tuple[Tensor, Tensor]], x_t: Tensor, t: Tensor, time: float) -> Tensor:
        """The paper's RTC correction: the vector-Jacobian product of x1_hat = x_t - time * v_t(x_t) with
        the weighted error, one backward pass through the action expert (the prefix cache is a constant)."""
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            v_t = self.denoise_step(state, prefix_mask, prefix_ar, kv_cache, x, t)
            x1_hat = x - time * v_t
            err = guide.error(x1_hat).detach()
            (correction,) = torch.autograd.grad(x1_hat, x, grad_outputs=err)
        return guide.velocity(x_t, v_t.detach(), time, correction)
