"""LeRobot v3 datasets written by LeRobot 0.6.1 itself, and what LeRobot's own loader reads from them.

Run by hand, never by CI, inside the oracle venv (../shared/oracles/lerobot/setup.sh):

    /tmp/lerobot-oracle/bin/python tools/make_dataset_fixtures.py     # writes tests/fixtures/datasets/

Two tiny datasets (3 episodes of 7, 12 and 5 frames at 10 fps, two tasks, a 6-dim state and action):

    videos/    two cameras as AV1 mp4 (LeRobot's default encoder), one 24 x 32, one 32 x 32 (a wrist camera);
               every episode appended to one file per camera (from_timestamp > 0 for later episodes)
    images/    the same cameras stored as PNG images inside the parquet files, and one parquet and
               episode-metadata file per episode (a roll-over size of 1e-6 MB)

Beside each, `expected.safetensors`: LeRobotDataset(root, delta_timestamps={"action": [k / fps for k < 4]},
video_backend="pyav") item by item: the frames (uint8 CHW), state, the action chunk with `action_is_pad`,
indices, timestamps; the tasks in metadata.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
FPS, HORIZON, DIM = 10, 4, 6
EPISODES = [(7, "pick up the cube"), (12, "open the drawer"), (5, "pick up the cube")]
CAMERAS = {"observation.images.front": (24, 32), "observation.images.wrist": (32, 32)}


def frame_image(h: int, w: int, ep: int, i: int, cam: int) -> np.ndarray:
    """A smooth, moving pattern (video codecs keep it close) that differs from frame to frame."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 100 * np.sin(x / 5.0 + i * 0.7 + ep)
    g = 127 + 100 * np.cos(y / 4.0 - i * 0.5 + cam)
    b = np.full_like(x, 40.0 * (ep + 1) + 10 * i)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def write(root: Path, use_videos: bool, file_mb: float | None) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dtype = "video" if use_videos else "image"
    features = {k: {"dtype": dtype, "shape": (h, w, 3), "names": ["height", "width", "channels"]}
                for k, (h, w) in CAMERAS.items()}
    features["observation.state"] = {"dtype": "float32", "shape": (DIM,), "names": [f"s{i}" for i in range(DIM)]}
    features["action"] = {"dtype": "float32", "shape": (DIM,), "names": [f"a{i}" for i in range(DIM)]}
    kw = {} if file_mb is None else {"video_files_size_in_mb": file_mb, "data_files_size_in_mb": file_mb}
    ds = LeRobotDataset.create("pi0/fixture", FPS, features, root=root, use_videos=use_videos, **kw)
    rng = np.random.default_rng(0)
    for ep, (n, task) in enumerate(EPISODES):
        for i in range(n):
            frame = {k: frame_image(h, w, ep, i, c) for c, (k, (h, w)) in enumerate(CAMERAS.items())}
            frame["observation.state"] = rng.normal(size=DIM).astype(np.float32)
            frame["action"] = rng.normal(size=DIM).astype(np.float32)
            frame["task"] = task
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()


def expected(root: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from safetensors.torch import save_file

    ds = LeRobotDataset("pi0/fixture", root=root, video_backend="pyav", return_uint8=True,
                        delta_timestamps={"action": [k / FPS for k in range(HORIZON)]})
    out: dict[str, torch.Tensor] = {}
    tasks = []
    for idx in range(len(ds)):
        item = ds[idx]
        for k in CAMERAS:
            out[f"{idx}/{k}"] = item[k].contiguous()
        for k in ("observation.state", "action", "action_is_pad", "index", "episode_index", "frame_index", "timestamp",
                  "task_index"):
            out[f"{idx}/{k}"] = torch.as_tensor(item[k]).contiguous()
        tasks.append(item["task"])
    save_file(out, str(root.parent / f"{root.name}_expected.safetensors"),
              metadata={"tasks": json.dumps(tasks), "length": str(len(ds)), "horizon": str(HORIZON)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE.parent / "tests" / "fixtures" / "datasets"))
    args = ap.parse_args()
    out = Path(args.out)
    for name, use_videos, file_mb in (("videos", True, None), ("images", False, 1e-6)):
        root = out / name
        if root.exists():
            shutil.rmtree(root)
        write(root, use_videos, file_mb)
        expected(root)
        print(name, sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()))


if __name__ == "__main__":
    main()
