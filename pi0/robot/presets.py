"""Robot presets (openpi's conventions): how a robot's observation keys map onto the model's camera slots, state
and actions, with the maps between the robot's units and the model's (aloha's joint flips and gripper angles)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pi0.errors import BadRequest, MissingKey

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


def _gripper_from_angular_inverse(x: np.ndarray) -> np.ndarray:
    """Aloha's puppet gripper joint -> pi's gripper space (openpi's `_gripper_from_angular_inv`): training targets."""
    return _unscale(x, -0.6213, 1.4910) - 0.5476


def _identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclass
class RobotPreset:
    """How one robot's observation keys map onto the model's cameras, state and actions, and its units onto the
    model's. The maps take [..., D] arrays (one vector, a chunk, a whole dataset column); `actions_in` is the
    inverse of `actions_out` (what training applies to its targets)."""

    name: str
    cameras: list[tuple[str | None, bool]]  # per model camera: (robot key or None for zeros, required)
    state_keys: list[str]
    action_dim: int | None  # robot action dims (None: from the checkpoint's stats / features)
    state_in: Callable[[np.ndarray], np.ndarray] = _identity  # robot state -> the model's units
    actions_out: Callable[[np.ndarray], np.ndarray] = _identity  # model actions -> the robot's units
    actions_in: Callable[[np.ndarray], np.ndarray] = _identity  # the robot's actions -> the model's units
    description: str = ""
    state_len: int | None = None  # robot state values the preset expects (None: any)
    # openpi's π0-FAST slots where they differ from `cameras` (its policies put the wrist camera last, an empty
    # `base_1` slot between, and mask no slot); None: `cameras`
    fast_cameras: list[tuple[str | None, bool]] | None = None

    @property
    def maps(self) -> bool:
        """Whether the robot's units differ from the model's (then norm stats are computed after the maps)."""
        return any(f is not _identity for f in (self.state_in, self.actions_out, self.actions_in))


_GRIPPERS = [6, 13]


def _aloha_state_in(s: np.ndarray) -> np.ndarray:
    s = ALOHA_JOINT_FLIP * s
    s[..., _GRIPPERS] = _gripper_to_angular(s[..., _GRIPPERS])
    return s


def _aloha_actions_out(a: np.ndarray) -> np.ndarray:
    a = ALOHA_JOINT_FLIP * a
    a[..., _GRIPPERS] = _gripper_from_angular(a[..., _GRIPPERS])
    return a


def _aloha_actions_in(a: np.ndarray) -> np.ndarray:
    a = ALOHA_JOINT_FLIP * a
    a[..., _GRIPPERS] = _gripper_from_angular_inverse(a[..., _GRIPPERS])
    return a


PRESETS: dict[str, RobotPreset] = {
    "libero": RobotPreset(
        "libero", [("observation/image", True), ("observation/wrist_image", True), (None, False)],
        ["observation/state"], 7, state_len=8,
        fast_cameras=[("observation/image", True), (None, False), ("observation/wrist_image", True)],
        description="observation/image, observation/wrist_image (HWC), observation/state (8), prompt -> actions[:, :7]",
    ),
    "droid": RobotPreset(
        "droid", [("observation/exterior_image_1_left", True), ("observation/wrist_image_left", True), (None, False)],
        ["observation/joint_position", "observation/gripper_position"], 8, state_len=8,
        fast_cameras=[("observation/exterior_image_1_left", True), (None, False), ("observation/wrist_image_left", True)],
        description="observation/exterior_image_1_left, observation/wrist_image_left, observation/joint_position (7), "
                    "observation/gripper_position (1), prompt -> actions[:, :8]",
    ),
    "aloha": RobotPreset(
        "aloha", [("images/cam_high", True), ("images/cam_left_wrist", False), ("images/cam_right_wrist", False)],
        ["state"], 14, state_in=_aloha_state_in, actions_out=_aloha_actions_out, actions_in=_aloha_actions_in,
        state_len=14,
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
