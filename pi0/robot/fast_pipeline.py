"""π0-FAST's robot pipeline in openpi's conventions: the observation as openpi's FAST policies take it (their camera
slots, the state as 256 bins in the prompt), and the generated token ids back to an action chunk in robot units.

The text is openpi's `FASTTokenizer`'s: `BOS "Task: {prompt, lowercased}, State: {bins};\\n"`, aligned right (the
padding first, so decoding continues from the last position; positions skip padding, so this equals openpi's
left-to-right alignment); the model answers `"Action: " {action tokens} "|" EOS`. The chunk is read from the ids
themselves (after the first `Action: ` ids, up to `|` or EOS), where openpi decodes the ids to text and encodes the
text again: the same tokens wherever that round trip is exact, and no re-tokenisation where it is not. Anything else
(no `Action: `, ids outside the action range, a token count that does not decode into the chunk) is a
`FastDecodeError` naming what the ids held, never a zero action.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pi0.checkpoint.info import CheckpointInfo
from pi0.errors import BadRequest
from pi0.model.fast_config import FastConfig
from pi0.model.features import features
from pi0.model.observation import Observation
from pi0.robot.assets import find_fast_tokenizer, load_norm_stats
from pi0.robot.fast import FastDecodeError, FastTokenizer
from pi0.robot.normalize import MODES, Normalizer
from pi0.robot.openpi import OpenpiPipeline, agreed_widths, resolve_preset
from pi0.robot.pipeline import Frame
from pi0.robot.presets import RobotPreset
from pi0.robot.tokenizer import PromptTokenizer

log = logging.getLogger("pi0")

SKIP_TOKENS = 128  # PaliGemma's last ids that FAST tokens skip (openpi's and LeRobot's `fast_skip_tokens`)
DEFAULT_NORM = "QUANTILES"  # openpi's for every model but pi0, and the FAST paper's


class FastText:
    """openpi's π0-FAST text over PaliGemma's SentencePiece: the prefix ids of a prompt and a state, the postfix ids of
    an action chunk's FAST tokens (training), the ids that end a chunk, and the FAST tokens inside generated ids."""

    def __init__(self, sp_path: str | os.PathLike, max_len: int, vocab_size: int, fast_vocab: int):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
        self.max_len, self.vocab_size, self.fast_vocab = max_len, vocab_size, fast_vocab
        if self.sp.get_piece_size() > vocab_size - SKIP_TOKENS - fast_vocab:
            log.warning("FAST: the text tokenizer's %d ids overlap the %d action ids below the model's last %d",
                        self.sp.get_piece_size(), fast_vocab, SKIP_TOKENS)
        self.action_start = self.sp.encode("Action: ")
        self.action_end = self.sp.encode("|")
        self.eos = self.sp.eos_id()
        self.end_ids = [self.eos] + (self.action_end if len(self.action_end) == 1 else [])

    def prefix(self, prompt: str, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids [max_len], mask [max_len]): BOS + "Task: ..., State: ...;\\n", the padding first."""
        text = prompt.lower().strip().replace("_", " ")
        bins = " ".join(map(str, PromptTokenizer.discretize(state)))
        ids = self.sp.encode(f"Task: {text}, State: {bins};\n", add_bos=True)
        if len(ids) > self.max_len:
            raise BadRequest(f"the prompt and the state take {len(ids)} tokens; this checkpoint reads at most "
                             f"{self.max_len} (max_token_len): shorten the prompt (a cut prompt would decode garbage)")
        tokens = np.zeros(self.max_len, dtype=np.int64)
        mask = np.zeros(self.max_len, dtype=bool)
        tokens[self.max_len - len(ids):], mask[self.max_len - len(ids):] = ids, True
        return tokens, mask

    def to_vocab(self, fast_tokens: Sequence[int]) -> list[int]:
        """FAST tokens -> the model's ids (`vocab - 1 - 128 - t`); the map is its own inverse."""
        return to_vocab(fast_tokens, self.vocab_size)

    def postfix(self, fast_tokens: Sequence[int]) -> list[int]:
        """What the model learns to answer: "Action: " ids, the chunk's tokens in the model's ids, "|", EOS."""
        return self.action_start + self.to_vocab(fast_tokens) + self.action_end + [self.eos]

    def fast_tokens(self, generated: Sequence[int]) -> list[int]:
        """The FAST tokens of one row of generated ids; FastDecodeError saying what the ids held instead."""
        ids = [int(i) for i in generated]
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        start = _find(ids, self.action_start)
        if start < 0:
            text = self.sp.decode([i for i in ids if 0 <= i < self.sp.get_piece_size()])
            raise FastDecodeError(f"the model's {len(ids)} tokens hold no 'Action: ' (ids {ids[:8]}, the text ones "
                                  f"read {text[:60]!r})")
        ids = ids[start + len(self.action_start):]
        end = _find(ids, self.action_end)
        ids = ids[:end] if end >= 0 else ids
        low, high = self.vocab_size - SKIP_TOKENS - self.fast_vocab, self.vocab_size - 1 - SKIP_TOKENS
        outside = [i for i in ids if not low <= i <= high]
        if outside:
            raise FastDecodeError(f"{len(outside)} of the {len(ids)} ids after 'Action: ' are no action tokens (they "
                                  f"lie outside [{low}, {high}]), e.g. {outside[:4]}")
        return self.to_vocab(ids)


def to_vocab(tokens: Sequence[int], vocab_size: int, skip: int = SKIP_TOKENS) -> list[int]:
    """FAST tokens <-> a vocabulary's ids (`vocab_size - 1 - skip - t`; its own inverse): openpi's and LeRobot's map,
    which puts action tokens just below the vocabulary's last `skip` ids."""
    return [vocab_size - 1 - skip - int(t) for t in tokens]


def _find(ids: list[int], part: list[int]) -> int:
    """The first index of the sub-sequence `part` in `ids`, or -1."""
    n = len(part)
    return next((i for i in range(len(ids) - n + 1) if ids[i: i + n] == part), -1)


class OpenpiFastPipeline(OpenpiPipeline):
    """Robot preset (openpi's FAST camera slots) -> state map -> normalise -> images -> the FAST prompt; generated ids
    -> FAST tokens -> the chunk [H, D] -> unnormalise -> the preset's action map. `action_dim` is the chunk's width
    too (openpi decodes with its model's action_dim, which its FAST configs set to the robot's)."""

    def __init__(self, config: FastConfig, preset: RobotPreset, normalizer: Normalizer | None, text: FastText,
                 fast: FastTokenizer, *, norm: str, default_prompt: str | None = None, state_len: int | None = None,
                 action_dim: int | None = None, stats_source: str = "none (inputs are used as given)",
                 fast_source: str = ""):
        self.config, self.preset, self.normalizer, self.text, self.fast = config, preset, normalizer, text, fast
        self.norm, self.default_prompt = norm, default_prompt
        self.stats_source, self.fast_source = stats_source, fast_source
        self.state_len = state_len if state_len is not None else preset.state_len
        self.action_dim = action_dim or preset.action_dim or config.action_dim
        self.slots = preset.fast_cameras or preset.cameras
        self.cameras = [key for key, _ in self.slots]
        self.max_state = None  # the state is text: any width
        self.state_in_prompt = True
        self.end_ids = text.end_ids

    @classmethod
    def for_checkpoint(cls, info: CheckpointInfo, *, preset: str | None, tokenizer: Path,  # type: ignore[override]
                       fast_tokenizer: str | os.PathLike | None = None, asset_id: str | None = None,
                       norm: str | None = None, default_prompt: str | None = None) -> "OpenpiFastPipeline":
        """The pipeline of a π0-FAST checkpoint: its preset, its FAST tokenizer, its stats in the normalisation it
        was trained with (config.json's normalization_mapping; else `norm`; else quantiles). A `norm` that
        contradicts the checkpoint's record is refused: the state's bins and the decoded actions would shift."""
        cfg, feats = info.config, features(info.meta)
        assert isinstance(cfg, FastConfig), type(cfg)
        mode = checked_norm(norm, feats.normalization, info.files.root)
        robot = resolve_preset(preset, info.meta)
        normalizer, source = load_norm_stats(info.files.root, asset_id, mode, mode)
        if normalizer is not None:
            for what, stats in (("state", normalizer.state), ("actions", normalizer.actions)):
                need = ("q01", "q99") if mode == "QUANTILES" else ("mean", "std") if mode == "MEAN_STD" else ()
                if stats is not None and any(getattr(stats, k) is None for k in need):
                    raise ValueError(f"{source}: {mode} normalisation needs the {what}'s {' and '.join(need)}; the "
                                     "stats hold none (--norm the mode the checkpoint was trained with)")
        state_len, action_dim = agreed_widths(None, cfg.action_dim, robot, feats, normalizer, source)
        fast_dir = find_fast_tokenizer(fast_tokenizer, info.files.root, info.meta)
        fast = FastTokenizer.load(fast_dir)
        text = FastText(tokenizer, cfg.max_token_len, cfg.vlm.vocab_size, fast.vocab_size)
        return cls(cfg, robot, normalizer, text, fast, norm=mode, default_prompt=default_prompt, state_len=state_len,
                   action_dim=action_dim, stats_source=source, fast_source=str(fast_dir))

    @property
    def metadata(self) -> dict[str, Any]:
        return {"preset": self.preset.name, "cameras": [c for c in self.cameras if c is not None],
                "state_keys": self.preset.state_keys, "state_in_prompt": True, "normalization": self.norm,
                "fast_tokenizer": self.fast_source}

    def frame_inputs(self, frame: Frame) -> Observation:
        """Checked values -> the model's inputs: the preset's state map, normalisation, images (an empty slot is a
        black image the model sees, as openpi's FAST policies give it), the FAST prompt."""
        state, images = self.state_and_images(frame)
        seen = [img is not None or key is None for img, key in zip(frame.images, self.cameras)]
        tokens, token_mask = self.text.prefix(frame.prompt, state)
        return Observation(images=[torch.from_numpy(im)[None] for im in images],
                           image_masks=[torch.tensor([s]) for s in seen],
                           tokens=torch.from_numpy(tokens)[None], token_masks=torch.from_numpy(token_mask)[None],
                           state=None)

    def chunk(self, generated: Sequence[int]) -> np.ndarray:
        """One row of generated ids -> the chunk [H, action_dim] in the model's (normalised) space, float32;
        FastDecodeError when the ids hold none."""
        tokens = self.text.fast_tokens(generated)
        return self.fast.decode(tokens, self.config.action_horizon, self.action_dim).astype(np.float32)

    def action_tokens(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A chunk [H, action_dim] in the model's space -> the answer the model learns (ids, mask)
        [max_decoding_steps]: "Action: ", its FAST tokens, "|", EOS, padded with 0; an answer longer than the model may
        generate is cut (a warning says so: raise max_decoding_steps or fit a coarser tokenizer)."""
        ids = self.text.postfix(self.fast.encode(np.asarray(actions, dtype=np.float64))[0])
        n = self.config.max_decoding_steps
        if len(ids) > n:
            log.warning("FAST: a chunk's answer takes %d tokens; the model generates at most %d: cut", len(ids), n)
            ids = ids[:n]
        tokens, mask = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
        tokens[: len(ids)], mask[: len(ids)] = ids, True
        return tokens, mask


def checked_norm(asked: str | None, recorded: dict[str, str], root: Path) -> str:
    """The normalisation mode to run: the checkpoint's record (config.json normalization_mapping: STATE and ACTION
    must agree), else `asked`, else quantiles. `asked` contradicting the record is refused with the reason."""
    if asked is not None and asked.upper() not in MODES:
        raise ValueError(f"unknown normalisation mode {asked!r}: choose one of {', '.join(MODES)}")
    modes = {recorded[k].upper() for k in ("STATE", "ACTION") if k in recorded}
    if len(modes) > 1:
        raise ValueError(f"{root}/config.json normalises STATE with {recorded.get('STATE')} and ACTION with "
                         f"{recorded.get('ACTION')}; π0-FAST runs one mode for both")
    record = modes.pop() if modes else None
    if asked is not None and record is not None and asked.upper() != record:
        raise ValueError(f"{root} was trained with {record} normalisation (its config.json normalization_mapping); "
                         f"running it with {asked.upper()} would shift the state's bins and the decoded actions: leave "
                         "--norm out")
    return (record or (asked.upper() if asked else None) or DEFAULT_NORM)
