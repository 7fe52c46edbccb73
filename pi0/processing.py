"""From a robot's observation to model inputs and back (openpi conventions,
../shared/spec/serving_and_processing.md): images, prompt tokens, normalisation, robot presets."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pi0.checkpoint import find_asset_stats
from pi0.errors import BadRequest, MissingKey

log = logging.getLogger("pi0")

# ---------------------------------------------------------------------------------------------
# Images


MIN_IMAGE_SIDE = 8  # px: smaller is no camera image (a 1 x 1 "image" would be blown up to the model's size)
MAX_ASPECT = 16  # longest side over shortest: beyond it the resized image keeps a few rows of pixels


def checked_image(image: Any, name: str = "image", prefer_chw: bool = False) -> np.ndarray:
    """A robot's 3-channel image, HWC or CHW (`prefer_chw` decides a 3 x H x 3 tie), validated: integers
    in [0, 255] or finite floats in [0, 1], at least MIN_IMAGE_SIDE px a side, an aspect ratio up to
    MAX_ASPECT. Returns it HWC, as given otherwise. Raises BadRequest naming the key and the shape."""
    a = np.asarray(image)
    if a.dtype.kind not in "uif":
        raise BadRequest(f"{name} must be a uint8 or float array, got dtype {a.dtype}")
    if a.ndim != 3 or 3 not in (a.shape[0], a.shape[-1]):
        raise BadRequest(f"{name} must be HWC or CHW with 3 channels, got shape {list(a.shape)}")
    if a.shape[0] == 3 and (prefer_chw or a.shape[-1] != 3):
        a = np.transpose(a, (1, 2, 0))
    h, w = a.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE or max(h, w) > MAX_ASPECT * min(h, w):
        raise BadRequest(f"{name} is {h} x {w} px (shape {list(np.asarray(image).shape)}): a camera image needs at "
                         f"least {MIN_IMAGE_SIDE} px a side and an aspect ratio up to {MAX_ASPECT}:1")
    if a.dtype.kind in "ui":  # uint8, or e.g. pixel lists from JSON
        if a.size and (a.min() < 0 or a.max() > 255):
            raise BadRequest(f"{name}: integer pixels must lie in [0, 255], got [{a.min()}, {a.max()}]")
        return a
    if not np.isfinite(a).all():
        raise BadRequest(f"{name} holds NaN or infinite values")
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
        raise BadRequest(f"{name}: float images must be in [0, 1], got [{a.min():.3g}, {a.max():.3g}]")
    return a


def to_uint8_hwc(image: Any, name: str = "image") -> np.ndarray:
    """uint8 (or other integers in [0, 255]), or float in [0, 1] (x255, truncated as openpi does); HWC or CHW
    -> uint8 HWC, 3 channels."""
    a = checked_image(image, name)
    if a.dtype.kind in "ui":
        return np.ascontiguousarray(a.astype(np.uint8, copy=False))
    return np.ascontiguousarray((255 * a).astype(np.uint8))


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """openpi's rule (tf.image.resize_with_pad via PIL): keep the aspect ratio, bilinear, zero padding
    centred. uint8 HWC -> uint8 [height, width, 3]."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    ratio = max(w / width, h / height)
    rh, rw = int(h / ratio), int(w / ratio)
    resized = Image.fromarray(image).resize((rw, rh), resample=Image.BILINEAR)
    out = Image.new(resized.mode, (width, height), 0)
    out.paste(resized, (max(0, int((width - rw) / 2)), max(0, int((height - rh) / 2))))
    return np.asarray(out)


def image_to_model(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HWC (any size) -> float32 CHW [3, size, size] in [-1, 1]."""
    x = resize_with_pad(image, size, size).astype(np.float32) / 255.0 * 2.0 - 1.0
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# Prompt tokens


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


OPENPI_TOKENIZER = "~/.cache/openpi/big_vision/paligemma_tokenizer.model"
TOKENIZER_NAMES = ("paligemma_tokenizer.model", "tokenizer.model")


def find_tokenizer(explicit: str | os.PathLike | None, checkpoint_dir: Path | None) -> Path:
    """--tokenizer PATH, else the checkpoint directory (and its assets/), else openpi's cache."""
    tried: list[str] = []
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit).expanduser())
    if checkpoint_dir is not None:
        for base in (checkpoint_dir, checkpoint_dir / "assets"):
            candidates += [base / n for n in TOKENIZER_NAMES]
    env = os.environ.get("PI0_TOKENIZER")
    if env:
        candidates.append(Path(env).expanduser())
    candidates.append(Path(OPENPI_TOKENIZER).expanduser())
    for c in candidates:
        tried.append(str(c))
        if c.is_file():
            return c
    raise FileNotFoundError(
        "no PaliGemma SentencePiece tokenizer found; looked at: " + ", ".join(tried) + ". Pass --tokenizer PATH "
        f"(the file is gs://big_vision/paligemma_tokenizer.model, ~4 MB; openpi caches it at {OPENPI_TOKENIZER})"
    )


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


# ---------------------------------------------------------------------------------------------
# Normalisation


@dataclass
class Stats:
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    @property
    def width(self) -> int:
        """How many dims the stats cover."""
        v = next((x for x in (self.mean, self.q01, self.std, self.q99) if x is not None), None)
        return 0 if v is None else len(v)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Stats":
        def arr(k):
            return None if d.get(k) is None else np.asarray(d[k], dtype=np.float32).reshape(-1)

        return cls(arr("mean"), arr("std"), arr("q01"), arr("q99"))


MODES = ("MEAN_STD", "QUANTILES", "IDENTITY")


@dataclass
class Normalizer:
    """Per feature: MEAN_STD `(x - mean) / (std + eps)` (pi0's default), QUANTILES
    `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1` (pi0.5's default) or IDENTITY. Dims beyond the stats pass
    through unchanged."""

    state: Stats | None
    actions: Stats | None
    state_mode: str = "MEAN_STD"
    action_mode: str = "MEAN_STD"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for m in (self.state_mode, self.action_mode):
            if m not in MODES:
                raise ValueError(f"unknown normalisation mode {m!r}: choose one of {MODES}")

    def _apply(self, x: np.ndarray, st: Stats | None, mode: str, inverse: bool, what: str) -> np.ndarray:
        if st is None or mode == "IDENTITY":
            return x
        x = np.asarray(x, dtype=np.float32).copy()
        if mode == "QUANTILES":
            if st.q01 is None or st.q99 is None:
                raise ValueError(f"quantile normalisation needs q01/q99 stats for {what}; the stats file has none")
            lo, hi = st.q01, st.q99
            n = min(len(lo), x.shape[-1])
            span = hi[:n] - lo[:n] + 1e-6
            if inverse:
                x[..., :n] = (x[..., :n] + 1.0) / 2.0 * span + lo[:n]
            else:
                x[..., :n] = (x[..., :n] - lo[:n]) / span * 2.0 - 1.0
        else:
            if st.mean is None or st.std is None:
                raise ValueError(f"z-score normalisation needs mean/std stats for {what}")
            n = min(len(st.mean), x.shape[-1])
            if inverse:
                x[..., :n] = x[..., :n] * (st.std[:n] + self.eps) + st.mean[:n]
            else:
                x[..., :n] = (x[..., :n] - st.mean[:n]) / (st.std[:n] + self.eps)
        return x

    def state_in(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, self.state, self.state_mode, False, "state")

    def actions_out(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, self.actions, self.action_mode, True, "actions")

    def actions_in(self, x: np.ndarray) -> np.ndarray:
        """Robot actions -> model space (what training targets)."""
        return self._apply(x, self.actions, self.action_mode, False, "actions")


def read_norm_stats(path: Path) -> dict[str, Stats]:
    """openpi's norm_stats.json: {"norm_stats": {"state": {...}, "actions": {...}}} -> Stats per key."""
    d = json.loads(Path(path).read_text())
    d = d.get("norm_stats", d)
    return {k: Stats.from_dict(v) for k, v in d.items() if isinstance(v, dict)}


def load_norm_stats(checkpoint_dir: Path, asset_id: str | None, state_mode: str,
                    action_mode: str) -> tuple[Normalizer | None, str]:
    """openpi `assets/<asset_id>/norm_stats.json`, or LeRobot stats (`*normalizer*.safetensors` /
    `stats.safetensors` with `observation.state.mean`-style keys) stored beside the weights.
    Returns (normalizer or None, where the stats came from)."""
    assets = checkpoint_dir / "assets"
    found = find_asset_stats(checkpoint_dir)
    if asset_id is not None:
        if asset_id.strip("/") not in found:
            raise FileNotFoundError(f"no {assets}/{asset_id}/norm_stats.json (asset ids there: {sorted(found) or 'none'})")
        found = {asset_id: found[asset_id.strip("/")]}
    files = list(found.values())
    if len(files) > 1:
        raise ValueError(f"{assets} holds stats for several robots {sorted(found)}: pass --asset-id (asset_id=)")
    if files:
        stats = read_norm_stats(files[0])
        return Normalizer(stats.get("state"), stats.get("actions"), state_mode, action_mode), str(files[0])
    # LeRobot: policy_preprocessor_*_normalizer_processor.safetensors (state and action stats) and
    # policy_postprocessor_*_unnormalizer_processor.safetensors (action stats), keys 'feature.stat'
    lerobot = sorted(checkpoint_dir.glob("*normalizer*.safetensors"), key=lambda f: ("unnormalizer" in f.name, f.name))
    lerobot += sorted(checkpoint_dir.glob("stats.safetensors"))
    if lerobot:
        from safetensors.numpy import load_file

        t: dict[str, np.ndarray] = {}
        for f in lerobot:
            for k, v in load_file(str(f)).items():
                t.setdefault(k, v)

        def stats(prefix: str) -> Stats | None:
            d = {k[len(prefix) + 1:]: v for k, v in t.items() if k.startswith(prefix + ".")}
            return Stats.from_dict(d) if d else None

        # LeRobot divides by (std + 1e-8)
        return (Normalizer(stats("observation.state"), stats("action"), state_mode, action_mode, eps=1e-8),
                ", ".join(str(f) for f in lerobot))
    return None, "none (inputs are used as given)"


# ---------------------------------------------------------------------------------------------
# Robot presets

ALOHA_JOINT_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], dtype=np.float32)


def _scale(x, lo, hi):
    return (x - lo) / (hi - lo)


def _unscale(x, lo, hi):
    return x * (hi - lo) + lo


def _gripper_to_angular(x: np.ndarray) -> np.ndarray:
    """Aloha's linear gripper position -> pi's angular space (openpi adapt_to_pi)."""
    pos = _unscale(x, 0.01844, 0.05800)  # puppet gripper position closed / open (m)
    arm, horn = 0.036, 0.022  # Interbotix linkage
    angle = np.arcsin(np.clip((horn**2 + pos**2 - arm**2) / (2 * horn * pos), -1.0, 1.0))
    return _scale(angle, 0.5476, 1.6296)


def _gripper_from_angular(x: np.ndarray) -> np.ndarray:
    """pi's gripper output -> Aloha's puppet gripper joint range."""
    return _scale(x + 0.5476, -0.6213, 1.4910)


@dataclass
class RobotPreset:
    """How one robot's observation keys map onto the model's cameras, state and actions."""

    name: str
    cameras: list[tuple[str | None, bool]]  # per model camera: (robot key or None for zeros, required)
    state_keys: list[str]
    action_dim: int | None  # robot action dims (None: from the checkpoint's stats / features)
    state_in: Callable[[np.ndarray], np.ndarray] = lambda s: s
    actions_out: Callable[[np.ndarray], np.ndarray] = lambda a: a
    description: str = ""
    state_len: int | None = None  # robot state values the preset expects (None: any)


def _aloha_state_in(s: np.ndarray) -> np.ndarray:
    s = ALOHA_JOINT_FLIP * s
    s[[6, 13]] = _gripper_to_angular(s[[6, 13]])
    return s


def _aloha_actions_out(a: np.ndarray) -> np.ndarray:
    a = ALOHA_JOINT_FLIP * a
    a[:, [6, 13]] = _gripper_from_angular(a[:, [6, 13]])
    return a


PRESETS: dict[str, RobotPreset] = {
    "libero": RobotPreset(
        "libero", [("observation/image", True), ("observation/wrist_image", True), (None, False)],
        ["observation/state"], 7, state_len=8,
        description="observation/image, observation/wrist_image (HWC), observation/state (8), prompt -> actions[:, :7]",
    ),
    "droid": RobotPreset(
        "droid", [("observation/exterior_image_1_left", True), ("observation/wrist_image_left", True), (None, False)],
        ["observation/joint_position", "observation/gripper_position"], 8, state_len=8,
        description="observation/exterior_image_1_left, observation/wrist_image_left, observation/joint_position (7), "
                    "observation/gripper_position (1), prompt -> actions[:, :8]",
    ),
    "aloha": RobotPreset(
        "aloha", [("images/cam_high", True), ("images/cam_left_wrist", False), ("images/cam_right_wrist", False)],
        ["state"], 14, state_in=_aloha_state_in, actions_out=_aloha_actions_out, state_len=14,
        description="state (14), images: {cam_high, cam_left_wrist, cam_right_wrist} (CHW), prompt -> actions[:, :14]; "
                    "joint flips and gripper maps as openpi's adapt_to_pi",
    ),
    "metaworld": RobotPreset(
        "metaworld", [("observation/image", True), ("observation/wrist_image", False)], ["observation/state"], 4,
        state_len=4,
        description="observation/image, observation/wrist_image (optional), observation/state (hand xyz, gripper), "
                    "prompt -> actions[:, :4] (pi0.sim.metaworld)",
    ),
}


def generic_preset(camera_keys: tuple[str, ...] | list[str], action_dim: int | None,
                   state_len: int | None = None) -> RobotPreset:
    """Described by the checkpoint's features: its cameras in slot order (each may be left out, at least one sent,
    as LeRobot's policies take them), `observation.state` of its width, the action width."""
    cams = [(k, False) for k in camera_keys] or [("observation.image", True)]
    state = f"observation.state ({state_len})" if state_len else "observation.state"
    return RobotPreset("generic", cams, ["observation.state"], action_dim, state_len=state_len,
                       description=f"cameras {list(camera_keys)} (at least one), {state}, prompt")


def lookup(obs: dict[str, Any], key: str) -> Any:
    """`a/b` looks in obs["a/b"], then in nested dicts obs["a"]["b"]."""
    if key in obs:
        return obs[key]
    cur: Any = obs
    for part in key.split("/"):
        if not isinstance(cur, dict) or part not in cur:
            raise MissingKey(f"observation is missing '{key}'")
        cur = cur[part]
    return cur


def finite_vector(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "uif":
        raise BadRequest(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float32).reshape(-1)
    if not np.isfinite(a).all():
        raise BadRequest(f"{name} holds NaN or infinite values: {a.tolist()[:8]}")
    return a


