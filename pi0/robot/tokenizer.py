"""Prompts as token ids: openpi's PaliGemma formats, finding the SentencePiece model, and training a small one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from pi0.errors import BadRequest, MissingKey

log = logging.getLogger("pi0")


def prompt_text(value: Any, key: str, hint: str = "") -> str:
    """An observation's instruction as a str: a str, bytes (msgpack from other languages) or a 0-d numpy
    string. Missing: KeyError naming the key (and `hint`); another type: ValueError."""
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if value is None:
        raise MissingKey(f"observation is missing '{key}' (a str instruction{'; ' + hint if hint else ''})")
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a str, got {type(value).__name__}")
    return value


class PromptTokenizer:
    """openpi's PaligemmaTokenizer formats. pi0: BOS + text + "\\n"; pi0.5 with state:
    BOS + "Task: {text}, State: {s0 s1 ...};\\nAction: " (state discretised into 256 bins over [-1, 1]).
    Right-padded with 0 to max_len (mask False on padding); longer prompts are truncated with a warning."""

    def __init__(self, model_path: str | os.PathLike, max_len: int):
        import sentencepiece

        self.path = Path(model_path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.max_len = max_len

    @staticmethod
    def clean(text: str) -> str:
        return text.strip().replace("_", " ").replace("\n", " ")

    @staticmethod
    def discretize(state: np.ndarray) -> np.ndarray:
        return np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1

    def __call__(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        text = self.clean(prompt)
        if state is not None:
            state_str = " ".join(map(str, self.discretize(np.asarray(state))))
            ids = self.sp.encode(f"Task: {text}, State: {state_str};\nAction: ", add_bos=True)
        else:
            ids = self.sp.encode(text, add_bos=True) + self.sp.encode("\n")
        if len(ids) > self.max_len:
            log.warning("prompt is %d tokens, truncated to %d", len(ids), self.max_len)
            ids = ids[: self.max_len]
        tokens = np.zeros(self.max_len, dtype=np.int64)
        mask = np.zeros(self.max_len, dtype=bool)
        tokens[: len(ids)] = ids
        mask[: len(ids)] = True
        return tokens, mask


def train_tokenizer(texts: list[str], model_prefix: str | os.PathLike, vocab_size: int = 256) -> Path:
    """A small SentencePiece model over `texts` with PaliGemma's special ids (pad 0, eos 1, bos 2, unk 3) and
    the symbols pi0's prompts use, for models trained from scratch on a few instructions (the real PaliGemma
    tokenizer has 257 152 ids: an embedding table far larger than a small model). Every digit and letter is
    kept, so pi0.5's "State: 12 250 ..." strings and unseen words still tokenize. PaliGemma's settings too
    (BPE, identity normaliser, no dummy prefix, "\n" a piece of its own), so that Hugging Face's
    GemmaTokenizer made from it (LeRobot's tokenizer step, `pi0 convert --layout lerobot`) gives the same ids.
    Returns the .model path."""
    import sentencepiece as spm

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    # each instruction many times over, so that its words become pieces of their own (a handful of sentences
    # seen once leave SentencePiece with single letters)
    corpus = [t for t in texts for _ in range(50)] + [" ".join(str(n) for n in range(i, 256, 7)) for i in range(7)]
    corpus += [chars] + [f"Task: {t}, State: 0 128 255;\nAction: " for t in texts]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(model_prefix), vocab_size=vocab_size, pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["\n", ":", ",", ";"], character_coverage=1.0, minloglevel=2, hard_vocab_limit=False,
        model_type="bpe", normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False,
    )
    return Path(str(model_prefix) + ".model")
