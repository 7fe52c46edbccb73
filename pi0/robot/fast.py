"""FAST, π0-FAST's action tokenizer: action chunks to tokens and back, fitted on a dataset's chunks, read and written
in the files Physical Intelligence's processor uses (`tokenizer.json`, `processor_config.json`).

Encode a chunk [T, D] of normalised actions: the orthonormal DCT-II along time per dimension, times `scale`, rounded;
flattened frequency-major (every dimension's lowest frequency first); shifted by -`min_token` into non-negative
integers (below 0 clipped to 0), each one a character; then byte-level BPE (the `tokenizers` library, which reads
the released `tokenizer.json` as it is). Decode is the inverse; a token sequence that does not give exactly T × D
coefficients is a `FastDecodeError` (openpi and LeRobot return zeros without a word: a robot would get a zero
action), and `decode_batch` returns which rows failed beside the chunks. The DCT is scipy's, as the reference
processor's, so that rounding lands on the same integers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pi0.errors import NoActions

log = logging.getLogger("pi0")

TOKENIZER_FILE, CONFIG_FILE = "tokenizer.json", "processor_config.json"


class FastDecodeError(NoActions, ValueError):
    """Tokens that do not decode into a chunk of the expected shape."""


def _libraries():
    try:
        import tokenizers
        from scipy.fft import dct, idct
    except ImportError as e:
        raise ImportError(f"the FAST tokenizer needs tokenizers and scipy ({e}): pip install 'pi0[fast]'") from e
    return tokenizers, dct, idct


@dataclass
class FastTokenizer:
    """The BPE over DCT coefficients and its constants: `scale` (quantisation: a coefficient's step is 1 / scale),
    `min_token` (the smallest quantised coefficient seen when fitted), `vocab_size` (BPE's), and the chunk shape
    decode expects (`horizon` x `action_dim`; None: give it to decode)."""

    bpe: object  # tokenizers.Tokenizer
    scale: float = 10.0
    min_token: int = 0
    vocab_size: int = 1024
    horizon: int | None = None
    action_dim: int | None = None

    # -- files --------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> "FastTokenizer":
        """A tokenizer directory as Physical Intelligence's processor saves it (`tokenizer.json` and
        `processor_config.json`), ours included."""
        tokenizers, _, _ = _libraries()
        d = Path(directory)
        missing = [f for f in (TOKENIZER_FILE, CONFIG_FILE) if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{d} is no FAST tokenizer: {', '.join(missing)} missing (a FAST tokenizer "
                                    f"directory holds {TOKENIZER_FILE} and {CONFIG_FILE})")
        cfg = json.loads((d / CONFIG_FILE).read_text())
        return cls(tokenizers.Tokenizer.from_file(str(d / TOKENIZER_FILE)), scale=float(cfg.get("scale", 10)),
                   min_token=int(cfg.get("min_token", 0)), vocab_size=int(cfg.get("vocab_size", 1024)),
                   horizon=cfg.get("time_horizon"), action_dim=cfg.get("action_dim"))

    def save(self, directory: str | Path) -> Path:
        """`tokenizer.json`, `processor_config.json` (the reference processor's keys) and `tokenizer_config.json`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.bpe.save(str(d / TOKENIZER_FILE))
        cfg = {"processor_class": "UniversalActionProcessor", "scale": self.scale, "min_token": self.min_token,
               "vocab_size": self.vocab_size, "time_horizon": self.horizon, "action_dim": self.action_dim}
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}, indent=2) + "\n")
        return d

    # -- fitting ------------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, chunks: Iterable[np.ndarray], scale: float = 10.0, vocab_size: int = 1024) -> "FastTokenizer":
        """BPE trained on the quantised DCT coefficients of `chunks` (each [T, D], normalised; all one shape), merges
        needing two occurrences. The initial alphabet is every byte the byte-level BPE sees (256 symbols), so that a
        coefficient the fitting chunks never held still encodes (an alphabet of the raw characters seen, as the
        reference processor's, silently drops those: a chunk would no longer decode). Raises ValueError if
        `vocab_size` leaves no room for merges."""
        tokenizers, dct, _ = _libraries()
        chunks = [np.asarray(c, dtype=np.float64) for c in chunks]
        if not chunks:
            raise ValueError("fitting a FAST tokenizer needs at least one action chunk")
        shapes = {c.shape for c in chunks}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"action chunks must all be [horizon, action_dim] of one shape, got {sorted(shapes)}")
        quantised = [np.around(dct(c, axis=0, norm="ortho").flatten() * scale).astype(np.int64) for c in chunks]
        low = int(min(q.min() for q in quantised))
        high = int(max(q.max() for q in quantised))
        alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
        if vocab_size <= len(alphabet):
            raise ValueError(f"vocab_size {vocab_size} leaves no merges: the vocabulary holds the {len(alphabet)} byte "
                             "symbols first; choose more (LeRobot's default: 1024)")
        if high - low > 256:
            log.warning("FAST: the coefficients span %d values (scale %s): each above 127 takes two bytes before "
                        "merges; a lower scale gives shorter answers", high - low + 1, scale)
        bpe = tokenizers.ByteLevelBPETokenizer()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
            initial_alphabet=alphabet, max_token_length=10000)
        bpe._tokenizer.train_from_iterator(("".join(map(chr, q - low)) for q in quantised), trainer=trainer)
        horizon, action_dim = chunks[0].shape
        return cls(bpe._tokenizer, scale=scale, min_token=low, vocab_size=vocab_size, horizon=horizon,
                   action_dim=action_dim)

    # -- encoding and decoding ----------------------------------------------------------------------------------

    def coefficients(self, chunk: np.ndarray) -> np.ndarray:
        """[T, D] -> the quantised DCT coefficients, int64 [T, D] (frequency-major)."""
        _, dct, _ = _libraries()
        return np.around(dct(np.asarray(chunk, dtype=np.float64), axis=0, norm="ortho") * self.scale).astype(np.int64)

    def encode(self, chunks: np.ndarray) -> list[list[int]]:
        """[T, D] or [B, T, D] normalised actions -> one token list per chunk."""
        chunks = np.asarray(chunks)
        if chunks.ndim == 2:
            chunks = chunks[None]
        if chunks.ndim != 3:
            raise ValueError(f"action chunks must be [horizon, action_dim] or [batch, horizon, action_dim], got "
                             f"{list(chunks.shape)}")
        out = []
        for chunk in chunks:
            shifted = np.maximum(self.coefficients(chunk).flatten() - self.min_token, 0)
            ids = self.bpe.encode("".join(map(chr, shifted))).ids
            back = self.bpe.decode(ids, skip_special_tokens=False)
            if len(back) != len(shifted):  # a tokenizer fitted with the reference's alphabet lacks unseen values
                raise ValueError(f"this FAST tokenizer cannot encode the chunk: {len(shifted)} coefficients come back as "
                                 f"{len(back)} (values its vocabulary lacks); refit it (`pi0 fast-tokenizer`)")
            out.append(ids)
        return out

    def decode(self, tokens: Sequence[int], horizon: int | None = None, action_dim: int | None = None, *,
               relaxed: bool = False) -> np.ndarray:
        """Tokens -> the chunk [T, D] (float64). FastDecodeError if they do not give exactly T x D coefficients, or
        hold ids no token has. relaxed: LeRobot's decoding instead, which cuts extra coefficients and pads missing
        ones with zeros (a warning says so)."""
        _, _, idct = _libraries()
        horizon, action_dim = horizon or self.horizon, action_dim or self.action_dim
        if horizon is None or action_dim is None:
            raise ValueError("decode needs the chunk's horizon and action_dim (the tokenizer records none)")
        negative = [int(t) for t in tokens if int(t) < 0]
        if negative:
            raise FastDecodeError(f"{len(negative)} of the {len(tokens)} FAST tokens are negative ({negative[:4]}): "
                                  "the ids they came from are no action tokens")
        text = self.bpe.decode([int(t) for t in tokens], skip_special_tokens=False)  # ids beyond the BPE's: skipped
        values = np.array([ord(c) for c in text], dtype=np.int64) + self.min_token
        if relaxed and values.size != horizon * action_dim:
            log.warning("FAST: %d tokens decode to %d DCT coefficients, not %d x %d: %s as LeRobot does", len(tokens),
                        values.size, horizon, action_dim, "cut" if values.size > horizon * action_dim else "padded")
            values = np.pad(values[: horizon * action_dim], (0, max(0, horizon * action_dim - values.size)))
        if values.size != horizon * action_dim:
            raise FastDecodeError(f"{len(tokens)} FAST tokens decode to {values.size} DCT coefficients, not "
                                  f"{horizon} x {action_dim} = {horizon * action_dim}")
        return idct(values.reshape(horizon, action_dim) / self.scale, axis=0, norm="ortho")

    def decode_batch(self, rows: Sequence[Sequence[int]], horizon: int | None = None,
                     action_dim: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Each row's chunk [B, T, D], whether it decoded (bool [B]; a failed row's chunk is zeros) and why not."""
        horizon, action_dim = horizon or self.horizon, action_dim or self.action_dim
        out = np.zeros((len(rows), horizon, action_dim))
        ok = np.zeros(len(rows), dtype=bool)
        errors = [""] * len(rows)
        for i, tokens in enumerate(rows):
            try:
                out[i], ok[i] = self.decode(tokens, horizon, action_dim), True
            except FastDecodeError as e:
                errors[i] = str(e)
        return out, ok, errors
