"""Model configs for pi0 / pi0.5, and their inference from a checkpoint's tensor shapes.

A config is read off the tensors, never trusted from a guess: widths, depths, head_dim, mlp,
vocab, patch and image size, action and state dims, pi0 vs pi0.5 all come from shapes.
`config.json` is read only for what shapes cannot tell (action horizon, token length, steps,
and head counts where a checkpoint records them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

SIGLIP_SO400M_HEAD_DIM = 72  # So400m/14: 1152 = 16 heads x 72


@dataclass(frozen=True)
class SiglipConfig:
    width: int = 1152
    depth: int = 27
    num_heads: int = 16
    mlp_dim: int = 4304
    patch_size: int = 14
    image_size: int = 224  # the size the position embedding was trained for
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 0  # 0: no embedding table (the action expert)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0


@dataclass(frozen=True)
class Pi0Config:
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    vlm: GemmaConfig = field(
        default_factory=lambda: GemmaConfig(width=2048, depth=18, mlp_dim=16384, vocab_size=257152)
    )
    expert: GemmaConfig = field(default_factory=lambda: GemmaConfig(width=1024, depth=18, mlp_dim=4096))
    pi05: bool = False
    action_dim: int = 32  # model-side action width (robot actions are zero-padded to it)
    state_dim: int = 32  # pi0 only: input width of state_proj
    action_horizon: int = 50
    max_token_len: int = 48
    num_steps: int = 10
    num_cameras: int = 3
    min_period: float = 4e-3
    max_period: float = 4.0

    def __post_init__(self) -> None:
        v, e = self.vlm, self.expert
        if (v.depth, v.num_heads, v.num_kv_heads, v.head_dim) != (e.depth, e.num_heads, e.num_kv_heads, e.head_dim):
            raise ValueError(
                "the VLM and the action expert share attention, so they need the same depth, heads, kv heads "
                f"and head_dim; got VLM {(v.depth, v.num_heads, v.num_kv_heads, v.head_dim)} vs expert "
                f"{(e.depth, e.num_heads, e.num_kv_heads, e.head_dim)}"
            )
        if v.num_heads % v.num_kv_heads:
            raise ValueError(f"num_heads {v.num_heads} is not a multiple of num_kv_heads {v.num_kv_heads}")
        if self.vision.width % self.vision.num_heads:
            raise ValueError(f"SigLIP width {self.vision.width} is not divisible by {self.vision.num_heads} heads")
        if self.expert.width % 2:
            raise ValueError(f"expert width {self.expert.width} must be even (sin/cos time embedding)")

    @property
    def kind(self) -> str:
        return "pi05" if self.pi05 else "pi0"

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Pi0Config":
        d = dict(d)
        vision = SiglipConfig(**d.pop("vision"))
        vlm = GemmaConfig(**d.pop("vlm"))
        expert = GemmaConfig(**d.pop("expert"))
        return cls(vision=vision, vlm=vlm, expert=expert, **d)


SIZES = ("pi0", "pi05", "tiny", "tiny-pi05")


def size_config(name: str) -> Pi0Config:
    """A model size by name: `pi0`, `pi05` (full size) or `tiny` / `tiny-pi05` (seconds on a CPU, for tests and demos);
    or a JSON file holding a Pi0Config (as config.json's "pi0")."""
    p = Path(name)
    if p.suffix == ".json" or p.is_file():
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"size {name}: cannot read a Pi0Config JSON file ({e})") from e
        return Pi0Config.from_dict(d.get("pi0", d))
    if name == "pi0":
        return Pi0Config()
    if name == "pi05":
        return Pi0Config(pi05=True, max_token_len=200)
    if name in ("tiny", "tiny-pi05"):
        pi05 = name == "tiny-pi05"
        return Pi0Config(
            vision=SiglipConfig(width=32, depth=2, num_heads=4, mlp_dim=128, patch_size=14, image_size=28),
            vlm=GemmaConfig(width=64, depth=2, mlp_dim=256, num_heads=8, num_kv_heads=1, head_dim=16, vocab_size=1000),
            expert=GemmaConfig(width=32, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
            pi05=pi05,
            max_token_len=200 if pi05 else 48,
        )
    raise ValueError(f"unknown model size {name!r}: choose one of {', '.join(SIZES)}, or a Pi0Config JSON file")


# ---------------------------------------------------------------------------------------------
# Inference from canonical tensor shapes (see checkpoint.py for the canonical names)


def _count_layers(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in shapes if (m := pat.match(k))}
    if not ids:
        return 0
    if ids != set(range(max(ids) + 1)):
        missing = sorted(set(range(max(ids) + 1)) - ids)
        raise ValueError(f"layers {missing} under '{prefix}' are missing (found {len(ids)} of {max(ids) + 1})")
    return max(ids) + 1


def first_field(meta: Mapping[str, Any], *names: str) -> Any:
    """The value of the first of `names` a config.json (or its part) sets, else None."""
    for n in names:
        if meta.get(n) is not None:
            return meta[n]
    return None


def _shape_of(shapes: Mapping[str, tuple[int, ...]]):
    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise KeyError(name)
        return tuple(shapes[name])

    return shape


def siglip_from_shapes(shapes: Mapping[str, tuple[int, ...]], meta: Mapping[str, Any]) -> SiglipConfig:
    """SigLIP's sizes from the canonical `vision.*` shapes; the head count (visible in no shape) from `meta`, else
    So400m's head width."""
    shape = _shape_of(shapes)
    ours = meta.get("pi0") if isinstance(meta.get("pi0"), dict) else {}
    patch = shape("vision.patch_embedding.weight")  # [width, 3, p, p]
    v_width, _, p, _ = patch
    n_pos = shape("vision.position_embedding.weight")[0]
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"vision position embedding has {n_pos} rows, not a square grid of patches")
    v_mlp = shape("vision.layers.0.mlp.fc1.weight")[0]
    v_depth = _count_layers(shapes, "vision.layers.")
    # Head count is not visible in any SigLIP shape (q/k/v are all [width, width]).
    v_heads = first_field(ours.get("vision", {}), "num_heads") or first_field(meta, "vision_num_heads")
    if v_heads is None:
        if v_width % SIGLIP_SO400M_HEAD_DIM == 0:
            v_heads = v_width // SIGLIP_SO400M_HEAD_DIM  # So400m/14 head width (16 heads at 1152)
        else:
            v_heads = 4
            warnings.warn(
                f"SigLIP width {v_width} records no head count; assuming {v_heads} heads "
                "(set 'vision_num_heads' in config.json to override)",
                stacklevel=3,
            )
    return SiglipConfig(
        width=v_width, depth=v_depth, num_heads=int(v_heads), mlp_dim=v_mlp, patch_size=p, image_size=grid * p
    )


def gemma_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str, vocab: int,
                      recorded: Mapping[str, Any]) -> GemmaConfig:
    """A Gemma's sizes from its canonical `{prefix}.layers.*` shapes (kv heads from `recorded`, else 1)."""
    shape = _shape_of(shapes)
    q = shape(f"{prefix}.layers.0.self_attn.q_proj.weight")  # [heads*hd, width]
    k = shape(f"{prefix}.layers.0.self_attn.k_proj.weight")  # [kv*hd, width]
    mlp = shape(f"{prefix}.layers.0.mlp.gate_proj.weight")[0]
    kv = int(recorded.get("num_kv_heads") or 1)  # Gemma 2B and 300M are multi-query (1 kv head)
    if k[0] % kv:
        raise ValueError(f"{prefix} k_proj rows {k[0]} not divisible by {kv} kv heads")
    hd = k[0] // kv
    if q[0] % hd:
        raise ValueError(f"{prefix} q_proj rows {q[0]} not a multiple of head_dim {hd}")
    return GemmaConfig(
        width=q[1], depth=_count_layers(shapes, f"{prefix}.layers."), mlp_dim=mlp,
        num_heads=q[0] // hd, num_kv_heads=kv, head_dim=hd, vocab_size=vocab,
    )


def paligemma_from_shapes(shapes: Mapping[str, tuple[int, ...]], meta: Mapping[str, Any]
                          ) -> tuple[SiglipConfig, GemmaConfig]:
    """PaliGemma's sizes (SigLIP and the VLM, pi0's and π0-FAST's alike) from the canonical shapes, the projector
    checked against both widths."""
    ours = meta.get("pi0") if isinstance(meta.get("pi0"), dict) else {}
    vision = siglip_from_shapes(shapes, meta)
    vlm = gemma_from_shapes(shapes, "vlm", _shape_of(shapes)("vlm.embed_tokens.weight")[0], ours.get("vlm", {}))
    proj = _shape_of(shapes)("projector.weight")  # [vlm width, vision width]
    if proj != (vlm.width, vision.width):
        raise ValueError(f"projector.weight is {list(proj)}, expected [{vlm.width}, {vision.width}] (the VLM's and "
                         "SigLIP's widths)")
    return vision, vlm


def infer_config(shapes: Mapping[str, tuple[int, ...]], meta: Mapping[str, Any] | None = None) -> Pi0Config:
    """Derive every size from canonical tensor shapes; `meta` (a parsed config.json) only fills in
    what shapes cannot tell: action horizon, token length, steps, and head counts if recorded."""
    meta = dict(meta or {})
    ours = meta.get("pi0") if isinstance(meta.get("pi0"), dict) else {}
    shape = _shape_of(shapes)
    pi05 = any(k.startswith("expert.") and ".dense." in k for k in shapes) or "time_mlp_in.weight" in shapes
    vision, vlm = paligemma_from_shapes(shapes, meta)
    expert = gemma_from_shapes(shapes, "expert", 0, ours.get("expert", {}))

    action_dim = shape("action_in_proj.weight")[1]
    state_dim = action_dim if pi05 else shape("state_proj.weight")[1]

    horizon = first_field(ours, "action_horizon") or first_field(meta, "action_horizon", "chunk_size") or 50
    tok_len = first_field(ours, "max_token_len") or first_field(meta, "max_token_len", "tokenizer_max_length")
    steps = first_field(ours, "num_steps") or first_field(meta, "num_inference_steps", "num_steps") or 10
    return Pi0Config(
        vision=vision, vlm=vlm, expert=expert, pi05=pi05, action_dim=action_dim, state_dim=state_dim,
        action_horizon=int(horizon), max_token_len=int(tok_len or (200 if pi05 else 48)), num_steps=int(steps),
    )


def read_config_json(path) -> dict[str, Any]:
    """Parse a checkpoint's config.json (openpi's five fields or LeRobot's many); unknown fields are kept
    but never required."""
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(d).__name__}")
    return d


# ---------------------------------------------------------------------------------------------
# The canonical layout (checkpoint.py maps every file layout onto these names)


def canonical_shapes(config: Pi0Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a pi0 / pi0.5 model of `config` has, in the canonical layout
    (the parameter names of the reference model)."""
    v, ew = config.vision, config.expert.width
    out: dict[str, tuple[int, ...]] = {
        "vision.patch_embedding.weight": (v.width, 3, v.patch_size, v.patch_size),
        "vision.patch_embedding.bias": (v.width,),
        "vision.position_embedding.weight": (v.num_patches, v.width),
    }
    for i in range(v.depth):
        p = f"vision.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            out[p + n + ".weight"] = out[p + n + ".bias"] = (v.width,)
        for n in "qkv":
            out[p + f"self_attn.{n}_proj.weight"], out[p + f"self_attn.{n}_proj.bias"] = (v.width, v.width), (v.width,)
        out[p + "self_attn.out_proj.weight"], out[p + "self_attn.out_proj.bias"] = (v.width, v.width), (v.width,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (v.mlp_dim, v.width), (v.mlp_dim,)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (v.width, v.mlp_dim), (v.width,)
    out["vision.post_layernorm.weight"] = out["vision.post_layernorm.bias"] = (v.width,)
    out["projector.weight"], out["projector.bias"] = (config.vlm.width, v.width), (config.vlm.width,)

    def gemma(prefix: str, g: GemmaConfig, adaptive: bool) -> None:
        def norm(name: str) -> None:
            if adaptive:  # pi0.5 adaRMS: scale, shift, gate from the time conditioning
                out[name + ".dense.weight"], out[name + ".dense.bias"] = (3 * g.width, ew), (3 * g.width,)
            else:
                out[name + ".weight"] = (g.width,)

        if g.vocab_size:
            out[prefix + ".embed_tokens.weight"] = (g.vocab_size, g.width)
        for i in range(g.depth):
            p = f"{prefix}.layers.{i}."
            norm(p + "input_layernorm")
            out[p + "self_attn.q_proj.weight"] = (g.num_heads * g.head_dim, g.width)
            out[p + "self_attn.k_proj.weight"] = (g.num_kv_heads * g.head_dim, g.width)
            out[p + "self_attn.v_proj.weight"] = (g.num_kv_heads * g.head_dim, g.width)
            out[p + "self_attn.o_proj.weight"] = (g.width, g.num_heads * g.head_dim)
            norm(p + "post_attention_layernorm")
            out[p + "mlp.gate_proj.weight"] = out[p + "mlp.up_proj.weight"] = (g.mlp_dim, g.width)
            out[p + "mlp.down_proj.weight"] = (g.width, g.mlp_dim)
        norm(prefix + ".norm")

    gemma("vlm", config.vlm, False)
    gemma("expert", config.expert, config.pi05)

    def linear(name: str, n_in: int, n_out: int) -> None:
        out[name + ".weight"], out[name + ".bias"] = (n_out, n_in), (n_out,)

    linear("action_in_proj", config.action_dim, ew)
    linear("action_out_proj", ew, config.action_dim)
    if config.pi05:
        linear("time_mlp_in", ew, ew)
        linear("time_mlp_out", ew, ew)
    else:
        linear("state_proj", config.state_dim, ew)
        linear("action_time_mlp_in", 2 * ew, ew)
        linear("action_time_mlp_out", ew, ew)
    return out


# Which norm's output each canonical linear weight reads: (weight pattern, the norm's name from the match). The
# weight's input channels are that norm's channels, each scaled by the norm's static gain (SigLIP's LayerNorm: w
# and b; Gemma's RMSNorm: 1 + w). pi0.5's adaptive norms have no static gain (`norm_gain` returns None there).
_NORM_FED = (
    (re.compile(r"(vision\.layers\.\d+)\.self_attn\.[qkv]_proj\.weight"), r"\1.layer_norm1"),
    (re.compile(r"(vision\.layers\.\d+)\.mlp\.fc1\.weight"), r"\1.layer_norm2"),
    (re.compile(r"projector\.weight"), "vision.post_layernorm"),
    (re.compile(r"((?:vlm|expert)\.layers\.\d+)\.self_attn\.[qkv]_proj\.weight"), r"\1.input_layernorm"),
    (re.compile(r"((?:vlm|expert)\.layers\.\d+)\.mlp\.(?:gate|up)_proj\.weight"), r"\1.post_attention_layernorm"),
)
_NORM_PARAM = re.compile(r"(vision\.layers\.\d+\.layer_norm[12]|vision\.post_layernorm"
                         r"|(?:vlm|expert)\.layers\.\d+\.(?:input|post_attention)_layernorm)\.(weight|bias)")


def feeding_norm(weight_name: str) -> str | None:
    """The norm (canonical name without .weight) whose output the linear weight `weight_name` reads, or None."""
    for pattern, norm in _NORM_FED:
        m = pattern.fullmatch(weight_name)
        if m:
            return m.expand(norm)
    return None


def norm_param(name: str) -> tuple[str, str] | None:
    """(norm, "weight" | "bias") for a static norm parameter that feeds linear weights, else None."""
    m = _NORM_PARAM.fullmatch(name)
    return (m.group(1), m.group(2)) if m else None


def norm_gain(norm: str, params: Mapping[str, Any]) -> Any:
    """A norm's static per-channel gain |output| / |normalised input| bound, from its parameters ({"weight": w,
    "bias": b} tensors): |w| + |b| for SigLIP's LayerNorm, |1 + w| for Gemma's RMSNorm; None if it has none."""
    w = params.get("weight")
    if w is None:
        return None
    if norm.startswith("vision"):
        b = params.get("bias")
        return w.float().abs() + (0 if b is None else b.float().abs())
    return (1 + w.float()).abs()
