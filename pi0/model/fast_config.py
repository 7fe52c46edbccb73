"""π0-FAST's sizes: PaliGemma alone (SigLIP, the projector, Gemma with its tied head), and the decoding limits; which
model family a checkpoint's shapes hold (`infer_model_config`, `model_shapes`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from pi0.model.config import (
    GemmaConfig,
    Pi0Config,
    SiglipConfig,
    canonical_shapes,
    first_field,
    infer_config,
    paligemma_from_shapes,
)


@dataclass(frozen=True)
class FastConfig:
    """vision, vlm: as pi0's (the same canonical tensor names, `vision.*`, `projector.*`, `vlm.*`); no action expert
    and no action, state or time projections: actions are FAST tokens in Gemma's vocabulary. max_decoding_steps:
    tokens generated at most per chunk (openpi and LeRobot: 256)."""

    vision: SiglipConfig = field(default_factory=SiglipConfig)
    vlm: GemmaConfig = field(
        default_factory=lambda: GemmaConfig(width=2048, depth=18, mlp_dim=16384, vocab_size=257152)
    )
    action_dim: int = 32
    action_horizon: int = 32
    max_token_len: int = 250
    max_decoding_steps: int = 256

    @property
    def kind(self) -> str:
        return "pi0_fast"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fast_canonical_shapes(config: FastConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a π0-FAST model: the PaliGemma part of pi0's canonical layout."""
    pi0 = Pi0Config(vision=config.vision, vlm=config.vlm, expert=dataclasses.replace(config.vlm, vocab_size=0))
    return {k: v for k, v in canonical_shapes(pi0).items() if k.startswith(("vision.", "projector.", "vlm."))}


def is_fast(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Canonical tensors of PaliGemma alone (no action expert): a π0-FAST checkpoint."""
    return "vlm.embed_tokens.weight" in shapes and not any(k.startswith("expert.") for k in shapes)


def infer_fast_config(shapes: Mapping[str, tuple[int, ...]], meta: Mapping[str, Any] | None = None) -> FastConfig:
    """Sizes from the canonical shapes; the chunk shape and decoding limit from `meta` (a config.json: openpi's
    action_horizon / action_dim, LeRobot's chunk_size / max_action_dim / max_decoding_steps)."""
    meta = dict(meta or {})
    ours = meta.get("pi0") if isinstance(meta.get("pi0"), dict) else {}
    vision, vlm = paligemma_from_shapes(shapes, meta)

    def first(*names: str, default: int) -> int:  # our own record first, then openpi's / LeRobot's fields
        return int(first_field(ours, *names) or first_field(meta, *names) or default)

    return FastConfig(vision=vision, vlm=vlm, action_dim=first("action_dim", "max_action_dim", default=32),
                      action_horizon=first("action_horizon", "chunk_size", default=32),
                      max_token_len=first("max_token_len", "tokenizer_max_length", default=250),
                      max_decoding_steps=first("max_decoding_steps", "max_action_tokens", default=256))


def infer_model_config(shapes: Mapping[str, tuple[int, ...]], meta: Mapping[str, Any] | None = None
                       ) -> Pi0Config | FastConfig:
    """The model a checkpoint's canonical shapes hold: π0-FAST (PaliGemma alone), else pi0 / pi0.5."""
    return infer_fast_config(shapes, meta) if is_fast(shapes) else infer_config(shapes, meta)


def model_shapes(config: Pi0Config | FastConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every canonical tensor of the model `config` describes."""
    return fast_canonical_shapes(config) if isinstance(config, FastConfig) else canonical_shapes(config)


def refuse_fast(config: Pi0Config | FastConfig, backend: str) -> None:
    """A backend that runs pi0 / pi0.5 only, given a π0-FAST model: ValueError saying which backend runs it."""
    if isinstance(config, FastConfig):
        raise ValueError(f"backend {backend!r} runs pi0 and pi0.5; this is a pi0_fast checkpoint, which runs on "
                         "backend='reference' (--backend reference) so far")


def decoding_steps(config: FastConfig, token_masks: Any, max_steps: int | None) -> int:
    """The tokens to decode at most (None: the config's), checked, and each row's last prompt position checked valid
    (decoding continues from the last position): what both backends' `generate` require of their inputs."""
    max_steps = config.max_decoding_steps if max_steps is None else max_steps
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not bool(token_masks[:, -1].bool().all()):
        raise ValueError("each row's last token must be valid (decoding continues from the last position): "
                         "append a token after the padding, as LeRobot appends BOS, or align prompts right")
    return max_steps


def greedy(first: torch.Tensor, step: Callable[[torch.Tensor, int], torch.Tensor], max_steps: int,
           end_ids: list[int]) -> torch.Tensor:
    """Greedy ids [B, max_steps] (int64): the first token [B], then `step(token, i)` -> token i [B]; rows stop at an
    end id, the loop when every row has (0 after that). The stop test is a step's one host read. Both backends'
    `generate` decode through it, each with its own step."""
    out = torch.zeros(first.shape[0], max_steps, dtype=torch.long, device=first.device)
    out[:, 0] = token = first
    ends = torch.tensor(end_ids, device=first.device)
    finished = torch.isin(token, ends)
    for i in range(1, max_steps):
        if bool(finished.all()):
            break
        token = step(token, i)
        out[:, i] = token
        finished |= torch.isin(token, ends)
    return out
