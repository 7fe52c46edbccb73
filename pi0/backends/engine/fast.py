"""π0-FAST in the engine: greedy decoding against a static KV cache, the `generate` contract of the reference.

The prefix runs as pi0's does (masked cameras never encoded, padding dropped: each row's valid tokens packed to the
front, `Pi0Engine.embed_prefix`), through every VLM layer into per-layer buffers [B, K, Lp + max_steps, D] allocated
once a call (the last layer's attention, o projection and MLP on each row's last valid position alone). Each step
then embeds one token a row, writes its k, v in place at slot Lp + step (RoPE position: the
row's valid count + step) and attends to the row's valid prefix and every token decoded so far; the tied head
(the token embedding) and the argmax stay on the device, and the only host read a step is the stop test. Weights and
products are the engine's: bf16 by default, int8 / packed where the machine has them; the head is the embedding
table in the engine dtype, packed for its one-row product where the engine packs (one pass of it a token: 1.05 GB in
bf16 at full size, beside Gemma-2B's 3.9 GB).
`quantize_decoding()` gives the decoding steps weight-only int8 copies of Gemma's and the head's weights
(`pi0.backends.engine.gemv`: half the bytes a token), the prefill keeping the engine's.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from pi0.backends.engine import ops
from pi0.backends.engine.gemv import RowInt8
from pi0.backends.engine.int8 import Int8Weight
from pi0.backends.engine.model import Pi0Engine
from pi0.model.fast_config import FastConfig, decoding_steps, greedy
from pi0.model.functional import rope_tables
from pi0.model.observation import Observation
from pi0.timing import StageClock


class Pi0FastEngine(Pi0Engine):
    """PaliGemma's packed weights (`pack_weights` on a FastConfig: every VLM layer full, the final norm, the embedding
    as the head) and greedy decoding."""

    backend = "engine"
    config: FastConfig
    decode_layers: list | None = None  # `quantize_decoding`'s weights for the steps (None: the engine's)
    decode_head: object | None = None

    def quantize_decoding(self) -> None:
        """Decoding steps with weight-only int8 copies of every Gemma layer's products and of the head (RowInt8: a
        token reads half the bytes); the prefill keeps the engine's weights. Costs their int8 bytes in memory
        (2.5 GB at full size). Answers may differ from the float engine's where two logits are within the int8
        rounding."""
        if self.decode_layers is not None:
            return

        def int8(w):  # an int8 engine's products are int8 already (its plain head becomes RowInt8); others stay
            if isinstance(w, Tensor):
                return RowInt8.of(w, self.dtype)
            return RowInt8.of_int8(w) if isinstance(w, Int8Weight) else w

        self.decode_layers = [dataclasses.replace(layer, **{name: int8(getattr(layer, name))
                                                            for name in ("qkv_w", "o_w", "gate_up_w", "down_w")})
                              for layer in self.w.vlm_layers]
        self.decode_head = int8(self.w.embed)

    def use_buckets(self, *args, **kwargs):  # noqa: ARG002 - the contract's hook; decoding has no buckets yet
        raise NotImplementedError("π0-FAST decoding runs eagerly; CUDA graphs of its step are not built")

    def _head(self, x: Tensor) -> Tensor:
        """[B, W] hidden states after the last layer -> the greedy next ids [B] (final norm, tied head, argmax)."""
        h = ops.rms_norm(x, self.w.final_norm, self.config.vlm.rms_norm_eps).to(self.dtype)
        head = self.decode_head if self.decode_head is not None else self.w.head if self.w.head is not None else \
            self.w.embed
        return ops.linear(h, head).argmax(-1)

    def _step(self, token: Tensor, positions: Tensor, slot: int, key_mask: Tensor | None, k_buf: list[Tensor],
              v_buf: list[Tensor]) -> Tensor:
        """One token a row [B] at its position [B] into slot `slot` of every layer's buffers -> the next ids [B]."""
        g = self.config.vlm
        x = ops.embedding(self.w.embed, token[:, None]) * self._token_scale()  # [B, 1, W]
        cos, sin = rope_tables(positions[:, None], g.head_dim, g.rope_theta, self.dtype)
        mask = None if key_mask is None else key_mask[:, : slot + 1]
        for i, layer in enumerate(self.decode_layers or self.w.vlm_layers):
            h = ops.rms_norm_for(x, layer.in_norm, g.rms_norm_eps, self.dtype, layer.qkv_w)
            q, k, v = self._qkv(layer, h, cos, sin)
            k_buf[i][:, :, slot: slot + 1] = k
            v_buf[i][:, :, slot: slot + 1] = v
            att = ops.attention(q, k_buf[i][:, :, : slot + 1], v_buf[i][:, :, : slot + 1], mask)
            x = ops.linear(att, layer.o_w, residual=x)
            self._mlp(x.view(-1, x.shape[-1]), layer, g.rms_norm_eps)
        return self._head(x[:, -1])

    @torch.no_grad()
    def generate(self, images: list[Tensor], image_masks: list[Tensor], tokens: Tensor, token_masks: Tensor, *,
                 end_ids: list[int], max_steps: int | None = None, stages: dict[str, float] | None = None) -> Tensor:
        """Greedy token ids [B, max_steps] (int64) after the prefix [images, tokens]; rows stop at an end id, the
        batch when all have (0 after that): the reference's contract (`Pi0FastReference.generate`), stages too."""
        max_steps = decoding_steps(self.config, token_masks, max_steps)
        token_masks = token_masks.bool()
        clock = StageClock(stages)
        obs = Observation(images, image_masks, tokens, token_masks, None).to(self.device, torch.float32)
        prefix, n_valid, key_mask = self.embed_prefix(obs)  # [B, Lp, W], [B], [B, Lp] or None
        b, lp, _ = prefix.shape
        g = self.config.vlm
        total = lp + max_steps
        k_buf = [torch.empty(b, g.num_kv_heads, total, g.head_dim, dtype=self.dtype, device=self.device)
                 for _ in self.w.vlm_layers]
        v_buf = [torch.empty_like(k) for k in k_buf]
        if key_mask is not None:
            key_mask = torch.cat([key_mask, torch.ones(b, max_steps, dtype=torch.bool, device=self.device)], dim=1)
            assert key_mask.shape[1] == total, f"key mask {key_mask.shape[1]} != prefix {lp} + steps {max_steps}"
        x = self.fill_kv_cache(prefix, None if key_mask is None else key_mask[:, :lp], k_buf, v_buf,
                               last=n_valid - 1)  # [B, 1, W]: each row's last valid position
        token = self._head(x[:, -1])
        clock.lap("prefill")
        out = greedy(token, lambda t, step: self._step(t, n_valid + step - 1, lp + step - 1, key_mask, k_buf, v_buf),
                     max_steps, end_ids)
        clock.lap("decode")
        return out
