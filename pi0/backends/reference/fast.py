"""π0-FAST as the reference writes it: PaliGemma alone, a prefix of images and token ids read in one pass, then greedy
decoding one token at a time against a KV cache (plain fp32 PyTorch, no speed tricks).

The prefix is bidirectional (every valid token sees every valid token: what the big_vision rule gives with no
causal block), its positions skip padding, and its last position must hold a valid token for every row (the
pipelines put one there: LeRobot appends BOS after the right-padded prompt, openpi aligns prompts to the right).
Each decoded token attends to the prefix's valid tokens and every token decoded before it, at the next position.
The head is the token embedding (tied). Rows stop at an end id; the batch stops when all have (LeRobot's rule:
tokens after the batch-wide stop are 0; a row that stopped earlier keeps decoding until then).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pi0.backends.reference.gemma import joint_layer
from pi0.backends.reference.model import PaliGemma
from pi0.model.fast_config import FastConfig, decoding_steps, greedy
from pi0.model.functional import make_attn_mask, positions_from_mask
from pi0.model.observation import Observation
from pi0.timing import StageClock


class Pi0FastReference(PaliGemma):
    """π0-FAST in plain PyTorch: the shared PaliGemma prefix, its head the token embedding. Parameter names are the
    canonical layout's `vision.*`, `projector.*`, `vlm.*`."""

    backend = "reference"
    config: FastConfig

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.weight.dtype

    def embed_prefix_of(self, images: list[Tensor], image_masks: list[Tensor], tokens: Tensor,
                        token_masks: Tensor) -> tuple[Tensor, Tensor]:
        """prefix [B, Lp, W] = [camera 0 .. n, tokens] and its input mask bool [B, Lp] (`PaliGemma.embed_prefix`)."""
        obs = Observation(images, image_masks, tokens, token_masks, None).to(self.projector.weight.device, self.dtype)
        prefix, input_mask, _ = self.embed_prefix(obs)
        return prefix, input_mask

    def logits(self, x: Tensor) -> Tensor:
        """[..., W] after the final norm -> [..., vocab] fp32, through the tied head."""
        return F.linear(x, self.vlm.embed_tokens.weight).float()

    def compute_loss(self, images: list[Tensor], image_masks: list[Tensor], tokens: Tensor, token_masks: Tensor,
                     action_tokens: Tensor, action_masks: Tensor, *, first_from_prefix: bool = False) -> Tensor:
        """The next-token cross-entropy of the action tokens, [B, Ta - 1] fp32 (0 where the target is padding): one
        pass over [images, tokens, action tokens], the action tokens attending to the whole prefix and causally to
        each other; position i predicts action token i + 1 (LeRobot's objective, whose first action token is the BOS
        it appends; its loss is the sum over the valid targets' count). first_from_prefix: [B, Ta], the prefix's
        last position predicting action token 0 as well (openpi's, whose prompts end at the last position)."""
        prefix, prefix_mask = self.embed_prefix_of(images, image_masks, tokens, token_masks)
        actions = self.embed_text(action_tokens)  # [B, Ta, W]
        lp, ta = prefix.shape[1], actions.shape[1]
        x = torch.cat([prefix, actions], dim=1)
        input_mask = torch.cat([prefix_mask, action_masks.bool()], dim=1)
        ar_mask = torch.cat([torch.zeros_like(prefix_mask), torch.ones_like(action_masks, dtype=torch.bool)], dim=1)
        assert x.shape[1] == input_mask.shape[1] == lp + ta, f"sequence {x.shape[1]} != prefix {lp} + actions {ta}"
        mask, positions = make_attn_mask(input_mask, ar_mask), positions_from_mask(input_mask)
        for layer in self.vlm.layers:
            (x,), _ = joint_layer([layer], [x], [None], positions, mask)
        if first_from_prefix:
            if not bool(prefix_mask[:, -1].all()):
                raise ValueError("first_from_prefix needs every row's prompt to end at the last position (align right)")
            logits = self.logits(self.vlm.norm(x[:, lp - 1: -1])[0])  # [B, Ta, vocab]: position i predicts token i
            ce = F.cross_entropy(logits.flatten(0, 1), action_tokens.flatten(), reduction="none")
            return ce.view(-1, ta) * action_masks.float()
        logits = self.logits(self.vlm.norm(x[:, lp:])[0])  # [B, Ta, vocab]
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), action_tokens[:, 1:].flatten(), reduction="none")
        return ce.view(-1, ta - 1) * action_masks[:, 1:].float()

    @torch.no_grad()
    def generate(self, images: list[Tensor], image_masks: list[Tensor], tokens: Tensor, token_masks: Tensor, *,
                 end_ids: list[int], max_steps: int | None = None, stages: dict[str, float] | None = None) -> Tensor:
        """Greedy token ids [B, max_steps] (int64) after the prefix [images, tokens]; 0 after the batch-wide stop.
        stages: if given, filled with the seconds of the prefill (to the first token) and of the decoding."""
        max_steps = decoding_steps(self.config, token_masks, max_steps)
        token_masks = token_masks.bool()
        clock = StageClock(stages)
        prefix, key_mask = self.embed_prefix_of(images, image_masks, tokens, token_masks)
        b = prefix.shape[0]
        cache, x = self.fill_kv_cache(prefix, key_mask, torch.zeros_like(key_mask))
        token = self.logits(x[:, -1]).argmax(-1)  # [B]
        clock.lap("prefill")

        def step(token: Tensor, _: int) -> Tensor:  # the cache and its key mask grow by one valid key a step
            nonlocal key_mask
            key_mask = torch.cat([key_mask, torch.ones(b, 1, dtype=torch.bool, device=prefix.device)], dim=1)
            positions = key_mask.sum(1, keepdim=True) - 1  # [B, 1]: the next position after the valid tokens
            x = self.embed_text(token[:, None])
            for i, layer in enumerate(self.vlm.layers):
                (x,), (k, v) = joint_layer([layer], [x], [None], positions, key_mask[:, None, :], past_kv=cache[i])
                cache[i] = (torch.cat([cache[i][0], k], dim=1), torch.cat([cache[i][1], v], dim=1))
            return self.logits(self.vlm.norm(x)[0][:, -1]).argmax(-1)

        out = greedy(token, step, max_steps, end_ids)
        clock.lap("decode")
        return out
