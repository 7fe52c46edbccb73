"""Buckets for the engine's static-shape calls: a call is planned on the host, from its camera and token masks, into
a bucket (batch, cameras, prefix length, steps, image size) and the index tensors that pack its prefix, so that the
device work has one shape per bucket and reads nothing back (what a CUDA graph per bucket replays).

The packing is the dynamic path's (`Pi0Engine.embed_prefix`): each row's valid camera tokens, then its valid
language tokens, at the front; the rest of the bucket's prefix is padding, masked as keys. Rows past the call's
batch repeat its first row and are dropped from the answer; image slots past the call's valid images repeat its
first image, and no token reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from pi0.model.config import Pi0Config
from pi0.model.observation import Observation


@dataclass(frozen=True)
class Bucket:
    """One static shape of a call."""

    batch: int  # rows, the call's batch rounded up (`BucketRules.batch`)
    cameras: int  # valid cameras of the row with the most: batch x cameras images are encoded (masked ones never)
    prefix: int  # prefix tokens a row, the longest row's rounded up (`BucketRules.prefix`)
    steps: int  # denoising steps
    image_size: int  # camera frames, px


@dataclass(frozen=True)
class BucketRules:
    """How a call's sizes round up to a bucket's: batches to a power of two, prefixes to a multiple of
    `prefix_step` tokens (at most prefix_step - 1 padding tokens a row: under 2 % of pi0's 816 with 16)."""

    prefix_step: int = 16

    def __post_init__(self) -> None:
        if self.prefix_step < 1:
            raise ValueError(f"prefix_step must be >= 1, got {self.prefix_step}")

    def batch(self, rows: int) -> int:
        return 1 << max(0, rows - 1).bit_length()

    def prefix(self, tokens: int) -> int:
        return -(-tokens // self.prefix_step) * self.prefix_step


@dataclass
class Plan:
    """A call's bucket and its prefix packing, as host tensors (copied into the bucket's buffers by `fill`)."""

    bucket: Bucket
    rows: int  # the call's own batch
    pairs: list[tuple[int, int]]  # (camera, row) of each valid image, in the order SigLIP sees them
    ids: Tensor  # int64 [batch, prefix]: a language slot's token id (0 elsewhere)
    is_image: Tensor  # bool [batch, prefix]: the slot holds an image token
    image_index: Tensor  # int64 [batch, prefix]: an image slot's row in the encoded images' tokens, flattened
    key_mask: Tensor  # bool [batch, prefix]: the slot holds a token (False: padding)
    n_valid: Tensor  # int64 [batch]: tokens a row (the suffix's first position)


def patches_per_image(config: Pi0Config, image_size: int) -> int:
    g = image_size // config.vision.patch_size
    return g * g


def plan_call(config: Pi0Config, obs: Observation, num_steps: int, rules: BucketRules = BucketRules()) -> Plan:
    """The bucket of a call and its packing, from the observation's masks and token ids (read on the host: they are
    host tensors in every pi0 caller, and reading them here is what keeps the device call free of reads)."""
    rows, size = obs.batch_size, obs.images[0].shape[-1]
    n_patch = patches_per_image(config, size)
    masks = [m.cpu() for m in obs.image_masks]
    tokens, token_masks = obs.tokens.cpu(), obs.token_masks.cpu()
    pairs = [(c, i) for c, m in enumerate(masks) for i in torch.nonzero(m).flatten().tolist()]
    first = {pair: j for j, pair in enumerate(pairs)}
    layouts = []  # per row: (image slots' indices into the flattened image tokens, language ids)
    for i in range(rows):
        image_slots = [first[(c, i)] * n_patch + p
                       for c in range(len(masks)) if (c, i) in first for p in range(n_patch)]
        layouts.append((image_slots, tokens[i][token_masks[i]]))
    longest = max(len(s) + len(t) for s, t in layouts)
    cameras = max(sum(bool(m[i]) for m in masks) for i in range(rows))
    bucket = Bucket(rules.batch(rows), cameras, rules.prefix(max(1, longest)), num_steps, size)
    b, lp = bucket.batch, bucket.prefix
    ids = torch.zeros(b, lp, dtype=torch.int64)
    is_image = torch.zeros(b, lp, dtype=torch.bool)
    image_index = torch.zeros(b, lp, dtype=torch.int64)
    key_mask = torch.zeros(b, lp, dtype=torch.bool)
    n_valid = torch.zeros(b, dtype=torch.int64)
    for i in range(b):
        image_slots, lang = layouts[i if i < rows else 0]
        n_img, n = len(image_slots), len(image_slots) + len(lang)
        image_index[i, :n_img] = torch.tensor(image_slots, dtype=torch.int64)
        is_image[i, :n_img] = True
        ids[i, n_img:n] = lang
        key_mask[i, :n] = True
        n_valid[i] = n
    return Plan(bucket, rows, pairs, ids, is_image, image_index, key_mask, n_valid)


@dataclass
class Buffers:
    """A bucket's static device tensors: the inputs a call is copied into, the KV cache and the answer. Allocated
    once per bucket; every call of the bucket reads and writes these same tensors."""

    images: Tensor  # [batch x cameras, 3, S, S] (the vision dtype)
    ids: Tensor
    is_image: Tensor
    image_index: Tensor
    key_mask: Tensor  # bool [batch, prefix + state token + horizon]
    n_valid: Tensor
    state: Tensor  # fp32 [batch, state_dim]
    noise: Tensor  # fp32 [batch, horizon, action_dim]
    k: list[Tensor] = field(default_factory=list)  # per expert layer [batch, kv heads, total, head_dim]
    v: list[Tensor] = field(default_factory=list)
    out: Tensor | None = None  # fp32 [batch, horizon, action_dim]: the actions, written in place

    @classmethod
    def allocate(cls, config: Pi0Config, bucket: Bucket, dtype: torch.dtype, vision_dtype: torch.dtype,
                 device: torch.device, layers: int) -> "Buffers":
        b, lp, e = bucket.batch, bucket.prefix, config.expert
        total = lp + (0 if config.pi05 else 1) + config.action_horizon
        chunk = (b, config.action_horizon, config.action_dim)

        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        key_mask = torch.ones(b, total, dtype=torch.bool, device=device)
        return cls(
            images=zeros(b * bucket.cameras, 3, bucket.image_size, bucket.image_size, dtype=vision_dtype),
            ids=zeros(b, lp), is_image=zeros(b, lp, dtype=torch.bool), image_index=zeros(b, lp), key_mask=key_mask,
            n_valid=zeros(b), state=zeros(b, config.state_dim, dtype=torch.float32),
            noise=zeros(*chunk, dtype=torch.float32),
            k=[zeros(b, e.num_kv_heads, total, e.head_dim, dtype=dtype) for _ in range(layers)],
            v=[zeros(b, e.num_kv_heads, total, e.head_dim, dtype=dtype) for _ in range(layers)],
            out=zeros(*chunk, dtype=torch.float32))

    def tensors(self) -> list[Tensor]:
        """Every tensor the bucket owns (what a test checks stays the same across calls)."""
        return [self.images, self.ids, self.is_image, self.image_index, self.key_mask, self.n_valid, self.state,
                self.noise, *self.k, *self.v, self.out]

    def fill(self, plan: Plan, obs: Observation, noise: Tensor) -> None:
        """Copy one call's inputs into the buffers (host to device; nothing is allocated on the device)."""
        lp, rows = plan.bucket.prefix, plan.rows
        for j, (c, i) in enumerate(plan.pairs):
            self.images[j].copy_(obs.images[c][i], non_blocking=True)
        if plan.pairs:  # the slots no token reads: a copy of the first image (any finite values would do)
            c, i = plan.pairs[0]
            self.images[len(plan.pairs):].copy_(obs.images[c][i].expand_as(self.images[len(plan.pairs):]),
                                                non_blocking=True)
        for mine, theirs in ((self.ids, plan.ids), (self.is_image, plan.is_image), (self.image_index, plan.image_index),
                             (self.n_valid, plan.n_valid)):
            mine.copy_(theirs, non_blocking=True)
        self.key_mask[:, :lp].copy_(plan.key_mask, non_blocking=True)
        extra = self.state.shape[0] - rows  # the rows past the call's batch repeat its first
        if obs.state is not None:
            self.state[:rows].copy_(obs.state, non_blocking=True)
            self.state[rows:].copy_(obs.state[:1].expand(extra, -1), non_blocking=True)
        self.noise[:rows].copy_(noise, non_blocking=True)
        self.noise[rows:].copy_(noise[:1].expand(extra, -1, -1), non_blocking=True)
