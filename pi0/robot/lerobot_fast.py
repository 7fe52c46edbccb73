"""A LeRobot π0-FAST checkpoint's own pipeline, run as LeRobot 0.6.1 runs it (its `pi0_fast` processors and
`PI0FastPolicy`): the state normalised and written as 256 bins into `"Task: {prompt}, State: {bins};\\n"` (the prompt
cleaned but not lowercased), tokenised with a BOS first and padded on the right, then a second BOS appended after the
padding, where decoding starts; greedy decoding until `|`; the answer read as LeRobot reads it (cut at the first `|`,
every `Action: ` removed, the rest mapped to FAST tokens with the text tokenizer's vocabulary) and decoded relaxed
(extra coefficients cut, missing ones zero) into `n_action_steps` rows; the post-processor's unnormaliser.

Where LeRobot answers zeros in silence (an answer not starting with `Action:`, ids that are no FAST tokens) this is a
`FastDecodeError`; a prompt longer than the tokenizer step's `max_length` is refused (LeRobot cuts it, state and all).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pi0.errors import BadRequest
from pi0.model.fast_config import FastConfig
from pi0.model.observation import Observation
from pi0.robot.assets import find_fast_tokenizer
from pi0.robot.fast import FastDecodeError, FastTokenizer
from pi0.robot.fast_pipeline import SKIP_TOKENS, to_vocab
from pi0.robot.lerobot import POST_STEPS, PRE_STEPS, LeRobotPipeline

log = logging.getLogger("pi0")

FAST_PRE_STEPS = PRE_STEPS + ("pi0_fast_prepare_state_tokenizer_processor_step", "action_tokenizer_processor")


class LeRobotFastPipeline(LeRobotPipeline):
    """LeRobot's π0-FAST pre-processor -> the model's prompt; generated ids -> LeRobot's chunk -> its post-processor."""

    pre_steps, post_steps = FAST_PRE_STEPS, POST_STEPS

    def __init__(self, root: Path, config: FastConfig, meta: dict[str, Any], tokenizer_path: str | os.PathLike,
                 fast_tokenizer: str | os.PathLike | None = None, default_prompt: str | None = None):
        super().__init__(root, config, meta, tokenizer_path, default_prompt=default_prompt)
        names = [name for name, _, _ in self.pre]
        if "pi0_fast_prepare_state_tokenizer_processor_step" not in names:
            raise ValueError(f"{root}/policy_preprocessor.json has no pi0_fast_prepare_state_tokenizer_processor_step: "
                             "not a LeRobot π0-FAST pipeline")
        if not self.state_key:
            raise ValueError(f"{root}/config.json lists no STATE input feature: π0-FAST writes the state into its prompt")
        action_step = next((cfg for name, cfg, _ in self.pre if name == "action_tokenizer_processor"), {})
        self.skip_tokens = int(action_step.get("fast_skip_tokens", meta.get("fast_skip_tokens", SKIP_TOKENS)))
        self.max_action_tokens = int(action_step.get("max_action_tokens", meta.get("max_action_tokens", 256)))
        self.horizon = int(meta.get("n_action_steps") or config.action_horizon)  # LeRobot decodes n_action_steps rows
        if self.horizon != config.action_horizon:
            log.warning("%s: LeRobot decodes n_action_steps=%d rows of a chunk_size=%d model, cutting the model's "
                        "coefficients to fit; pi0 does as LeRobot does", root, self.horizon, config.action_horizon)
        self.validate_prefix = bool(meta.get("validate_action_token_prefix", True))
        self.vocab_size = self.sp.get_piece_size()  # LeRobot maps with its text tokenizer's vocabulary
        if self.vocab_size != config.vlm.vocab_size:
            log.warning("%s: the text tokenizer has %d ids, the model %d; FAST tokens are mapped with the tokenizer's, as "
                        "LeRobot does", root, self.vocab_size, config.vlm.vocab_size)
        self.fast_dir = find_fast_tokenizer(fast_tokenizer, root, meta)
        self.fast = FastTokenizer.load(self.fast_dir)
        self.action_start = self.sp.encode("Action: ")
        self.bar = self.sp.piece_to_id("|")
        if self.bar == self.sp.unk_id():
            raise ValueError(f"{self.tokenizer_path} has no '|' token, which ends a π0-FAST answer: not PaliGemma's "
                             "tokenizer")
        self.end_ids = [self.bar]  # LeRobot stops at "|" alone

    @property
    def metadata(self) -> dict[str, Any]:
        return {**super().metadata, "state_in_prompt": True, "fast_tokenizer": str(self.fast_dir)}

    def tokenize(self, text: str, max_length: int, padding_side: str) -> tuple[np.ndarray, np.ndarray]:
        """As LeRobot's tokenizer step, but a prompt it would cut is refused: the cut would drop the state's bins."""
        n = 1 + len(self.sp.encode(text))
        if n > max_length:
            raise BadRequest(f"the prompt and the state take {n} tokens; this checkpoint's tokenizer step reads at most "
                             f"{max_length}: shorten the prompt (LeRobot would cut it, and the state with it)")
        return super().tokenize(text, max_length, padding_side)

    def _model_inputs(self, frame: dict[str, Any], tokens: np.ndarray, mask: np.ndarray) -> Observation:
        """The cameras as LeRobot's policy takes them; the prompt ids with a BOS appended after the padding (LeRobot's
        `sample_actions_fast_kv_cache`); no state tensor (it is in the prompt)."""
        images, masks = self._images(frame)
        tokens = np.concatenate([tokens, [self.sp.bos_id()]])
        mask = np.concatenate([mask, [True]])
        return Observation(images, masks, torch.from_numpy(tokens)[None], torch.from_numpy(mask)[None], None)

    def fast_tokens(self, generated: Sequence[int]) -> list[int]:
        """One row of generated ids -> FAST tokens, as LeRobot's `detokenize_actions` reads them."""
        ids = [int(i) for i in generated]
        pieces = [self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None for i in ids[:2]]
        if self.validate_prefix and pieces != ["Action", ":"]:  # LeRobot's check, on the first two tokens' text
            text = self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])
            raise FastDecodeError(f"the answer does not start with 'Action:' (ids {ids[:6]}, reading {text[:60]!r})")
        if self.bar in ids:
            ids = ids[: ids.index(self.bar)]
        n, i = len(self.action_start), 0
        while i <= len(ids) - n:  # every "Action: " goes, wherever it stands
            if ids[i: i + n] == self.action_start:
                ids = ids[:i] + ids[i + n:]
            else:
                i += 1
        return to_vocab(ids, self.vocab_size, self.skip_tokens)

    def chunk(self, generated: Sequence[int]) -> np.ndarray:
        """One row of generated ids -> the chunk [n_action_steps, action_dim] in the model's space, float32."""
        tokens = self.fast_tokens(generated)
        return self.fast.decode(tokens, self.horizon, self.action_dim, relaxed=True).astype(np.float32)

    def action_tokens(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A normalised chunk [H, action_dim] -> LeRobot's training targets (ids, mask) [max_action_tokens]: BOS,
        "Action: ", the FAST tokens in the model's ids, "|", EOS; cut or padded with 0 to max_action_tokens."""
        fast = self.fast.encode(np.asarray(actions, dtype=np.float64))[0]
        ids = ([self.sp.bos_id()] + self.action_start + to_vocab(fast, self.vocab_size, self.skip_tokens)
               + self.sp.encode("|") + [self.sp.eos_id()])[: self.max_action_tokens]
        tokens = np.zeros(self.max_action_tokens, dtype=np.int64)
        mask = np.zeros(self.max_action_tokens, dtype=bool)
        tokens[: len(ids)], mask[: len(ids)] = ids, True
        return tokens, mask
