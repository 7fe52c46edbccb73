"""config.json's robot fields, read into one typed view (`Features`) and written by the same module: the cameras in
slot order with their shapes, the state and action widths (LeRobot's `input_features` / `output_features`), the
normalisation per feature type, whether pi0.5's prompt carries the state, and the robot preset the weights were
trained with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Features:
    """What a checkpoint's config.json says of the robot it was trained for (LeRobot's `input_features` and
    `output_features`, which `pi0 train` writes too): camera keys in slot order with their [C, H, W], the state
    key and width, the action width; the normalisation per feature type (upper case, e.g. {"STATE": "MEAN_STD"});
    pi0.5's discrete state in the prompt; the robot preset of `pi0 train --preset`. None / empty where config.json
    does not say."""

    cameras: tuple[str, ...] = ()
    camera_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    state_key: str | None = None
    state: int | None = None
    action: int | None = None
    normalization: Mapping[str, str] = field(default_factory=dict)
    discrete_state_input: bool = True
    robot_preset: str | None = None


def features(meta: Mapping[str, Any]) -> Features:
    """The robot features of a parsed config.json (see `Features`); malformed entries raise ValueError."""
    inputs = meta.get("input_features") if isinstance(meta.get("input_features"), dict) else {}
    outputs = meta.get("output_features") if isinstance(meta.get("output_features"), dict) else {}

    def kind(key: str, spec: Any) -> str:
        t = str(spec.get("type", "")).upper() if isinstance(spec, dict) else ""
        return t or ("VISUAL" if key.startswith("observation.images.") else "STATE" if key == "observation.state" else "")

    def shape(key: str, spec: Any) -> tuple[int, ...] | None:
        s = spec.get("shape") if isinstance(spec, dict) else None
        if s is None:
            return None
        if not isinstance(s, (list, tuple)) or not all(isinstance(n, int) and n > 0 for n in s):
            raise ValueError(f"config.json: feature {key} has shape {s!r}, expected a list of positive integers")
        return tuple(s)

    cameras = tuple(k for k, v in inputs.items() if kind(k, v) == "VISUAL")
    state_key = next((k for k, v in inputs.items() if kind(k, v) == "STATE"), None)
    state_shape = shape(state_key, inputs[state_key]) if state_key else None
    action = next((v for k, v in outputs.items() if kind(k, v) in ("ACTION", "") and k == "action"), None)
    action_shape = shape("action", action) if action is not None else None
    norm = meta.get("normalization_mapping") if isinstance(meta.get("normalization_mapping"), dict) else {}
    preset = meta.get("robot_preset")
    return Features(cameras, {k: s for k in cameras if (s := shape(k, inputs[k])) is not None}, state_key,
                    state_shape[0] if state_shape else None, action_shape[0] if action_shape else None,
                    {str(k).upper(): str(v).upper() for k, v in norm.items()},
                    bool(meta.get("discrete_state_input", True)), str(preset) if preset else None)


def feature_fields(cameras: Mapping[str, tuple[int, ...]], state: int | None, action: int, norm_mode: str,
                   discrete_state_input: bool, robot_preset: str | None) -> dict[str, Any]:
    """The config.json fields `features` reads back: cameras (key -> [C, H, W], in slot order), the
    `observation.state` width (None: no state), the action width, one normalisation mode for state and actions."""
    inputs: dict[str, Any] = {k: {"type": "VISUAL", "shape": list(s)} for k, s in cameras.items()}
    if state is not None:
        inputs["observation.state"] = {"type": "STATE", "shape": [state]}
    out = {"input_features": inputs, "output_features": {"action": {"type": "ACTION", "shape": [action]}},
           "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": norm_mode, "ACTION": norm_mode},
           "discrete_state_input": bool(discrete_state_input)}
    if robot_preset is not None:
        out["robot_preset"] = robot_preset
    return out
