"""Model-level inputs (after preprocessing), as in ../shared/spec/pi0_math.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pi0.model.config import Pi0Config


@dataclass
class Observation:
    """images: one [B,3,S,S] float tensor in [-1,1] per camera; image_masks: one bool [B] per camera;
    tokens: int [B,L] right-padded with 0; token_masks: bool [B,L]; state: float [B,state_dim]
    (pi0.5 may pass None)."""

    images: list[torch.Tensor]
    image_masks: list[torch.Tensor]
    tokens: torch.Tensor
    token_masks: torch.Tensor
    state: torch.Tensor | None  # None only for pi0.5, which reads the state from the prompt

    def __post_init__(self) -> None:
        # masks given as 0/1 integers or floats (LeRobot's attention_mask, say) become bool
        self.token_masks = _as_bool(self.token_masks, "token_masks")
        self.image_masks = [_as_bool(m, f"image_masks[{i}]") for i, m in enumerate(self.image_masks)]

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def validate(self, config: Pi0Config) -> None:
        """Raise ValueError naming the first field whose shape or dtype is wrong, and what it should be."""
        if not isinstance(self.images, (list, tuple)) or not self.images:
            raise ValueError("Observation.images must be a non-empty list of [B,3,S,S] tensors, one per camera")
        if len(self.image_masks) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.image_masks)} image_masks: give one mask per camera")
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {list(self.tokens.shape)}")
        if self.tokens.dtype.is_floating_point or self.tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor, got {self.tokens.dtype}")
        b = self.tokens.shape[0]
        if self.token_masks.shape != self.tokens.shape or self.token_masks.dtype != torch.bool:
            raise ValueError(
                f"token_masks must be bool {list(self.tokens.shape)} like tokens, got "
                f"{self.token_masks.dtype} {list(self.token_masks.shape)}"
            )
        if self.tokens.numel() and (int(self.tokens.min()) < 0 or int(self.tokens.max()) >= config.vlm.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {config.vlm.vocab_size}), got [{int(self.tokens.min())}, {int(self.tokens.max())}]"
            )
        p = config.vision.patch_size
        for i, (img, m) in enumerate(zip(self.images, self.image_masks)):
            if img.ndim != 4 or img.shape[0] != b or img.shape[1] != 3 or img.shape[2] != img.shape[3]:
                raise ValueError(f"images[{i}] must be [{b}, 3, S, S], got {list(img.shape)}")
            if not img.dtype.is_floating_point:
                raise ValueError(f"images[{i}] must be float in [-1, 1], got {img.dtype} (uint8 x/255*2-1)")
            if img.shape[2] < p:
                raise ValueError(f"images[{i}] is {img.shape[2]} px, smaller than one {p} px patch")
            if m.shape != (b,) or m.dtype != torch.bool:
                raise ValueError(f"image_masks[{i}] must be bool [{b}], got {m.dtype} {list(m.shape)}")
        if len({img.shape[2] for img in self.images}) != 1:
            raise ValueError(f"all cameras need one image size, got {[img.shape[2] for img in self.images]}")
        if self.state is None and config.pi05:
            return  # pi0.5 takes the state through the prompt, not as an input of the model
        if self.state is None:
            raise ValueError(f"pi0 needs a state [{b}, {config.state_dim}] (zero-padded)")
        want = config.state_dim
        if self.state.ndim != 2 or self.state.shape != (b, want):
            raise ValueError(f"state must be [{b}, {want}] (zero-padded), got {list(self.state.shape)}")
        if not self.state.dtype.is_floating_point:
            raise ValueError(f"state must be float, got {self.state.dtype}")

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "Observation":
        """Images and state in `dtype` on `device`; ids and masks keep their dtypes."""
        return Observation(
            images=[im.to(device=device, dtype=dtype) for im in self.images],
            image_masks=[m.to(device) for m in self.image_masks],
            tokens=self.tokens.to(device),
            token_masks=self.token_masks.to(device),
            state=None if self.state is None else self.state.to(device=device, dtype=dtype),
        )


def concat_observations(rows: list[Observation]) -> Observation:
    """Observations of the same cameras and prompt length stacked along the batch."""
    first = rows[0]
    for i, r in enumerate(rows):
        assert len(r.images) == len(first.images), f"row {i}: {len(r.images)} cameras != {len(first.images)}"
        assert r.tokens.shape[1] == first.tokens.shape[1], f"row {i}: {r.tokens.shape[1]} tokens != {first.tokens.shape[1]}"
    state = None if any(r.state is None for r in rows) else torch.cat([r.state for r in rows])
    return Observation(
        images=[torch.cat([r.images[c] for r in rows]) for c in range(len(first.images))],
        image_masks=[torch.cat([r.image_masks[c] for r in rows]) for c in range(len(first.images))],
        tokens=torch.cat([r.tokens for r in rows]), token_masks=torch.cat([r.token_masks for r in rows]), state=state)


def _as_bool(m, name: str) -> torch.Tensor:
    m = torch.as_tensor(m)
    if m.dtype == torch.bool:
        return m
    if m.numel() and not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{name} must be bool (or 0/1), got values other than 0 and 1")
    return m != 0


def sample_observation(config: Pi0Config, batch_size: int = 1, num_valid_tokens: int = 12, seed: int = 0,
                       image_size: int | None = None, num_cameras: int | None = None, masked_cameras: int = 0,
                       token_len: int | None = None) -> Observation:
    """A deterministic synthetic observation (random images, BOS + random prompt ids, random state):
    what `pi0 demo` and `pi0 bench` feed when no robot is attached. The last `masked_cameras` cameras
    are masked; prompts are `token_len` long (default: the config's) with `num_valid_tokens` valid."""
    cams = config.num_cameras if num_cameras is None else num_cameras
    L = config.max_token_len if token_len is None else token_len
    if cams < 1 or not 0 <= masked_cameras <= cams:
        raise ValueError(f"need 1 <= cameras and 0 <= masked <= cameras, got cameras={cams} masked={masked_cameras}")
    if not 1 <= num_valid_tokens <= L:
        raise ValueError(f"need 1 <= valid tokens <= prompt length, got {num_valid_tokens} of {L}")
    g = torch.Generator().manual_seed(seed)
    s = image_size or config.vision.image_size
    images = [torch.rand(batch_size, 3, s, s, generator=g) * 2 - 1 for _ in range(cams)]
    masks = [torch.full((batch_size,), c < cams - masked_cameras) for c in range(cams)]
    tokens = torch.zeros(batch_size, L, dtype=torch.long)
    tokens[:, 0] = 2  # <bos>
    tokens[:, 1:num_valid_tokens] = torch.randint(3, config.vlm.vocab_size, (batch_size, num_valid_tokens - 1), generator=g)
    token_masks = torch.zeros(batch_size, L, dtype=torch.bool)
    token_masks[:, :num_valid_tokens] = True
    state = torch.randn(batch_size, config.state_dim, generator=g)
    return Observation(images, masks, tokens, token_masks, state)


def sampling_inputs(config: Pi0Config, obs: Observation, noise: torch.Tensor | None, num_steps: int | None,
                    device: torch.device | str) -> tuple[int, torch.Tensor]:
    """The checks every backend's sample_actions makes: a valid observation, num_steps >= 1 (default:
    the config's), noise of shape [B, horizon, action_dim] (drawn from N(0, 1) when not given).
    Returns (num_steps, fp32 noise on `device`)."""
    num_steps = config.num_steps if num_steps is None else num_steps
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    obs.validate(config)
    shape = (obs.batch_size, config.action_horizon, config.action_dim)
    if noise is None:
        noise = torch.randn(shape, dtype=torch.float32, device=device)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {list(shape)} (batch, action_horizon, action_dim), got {list(noise.shape)}")
    return num_steps, noise.to(device=device, dtype=torch.float32)
