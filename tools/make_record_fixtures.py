"""What LeRobot 0.6.1's own loader reads from datasets pi0's `Recorder` wrote: three recorded episodes, two more
appended by a second session, and a session killed while an episode's files were written.

Run by hand, never by CI, inside the oracle venv (../shared/oracles/lerobot/setup.sh); it records with pi0 (its
data modules need numpy, pyarrow and PyAV only) and reads with LeRobot:

    /tmp/lerobot-oracle/bin/python tools/make_record_fixtures.py     # writes tests/fixtures/record/lerobot_read.json

tests/data/test_recorder.py records the same datasets and checks pi0 reads from them what LeRobot read here.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def lerobot_read(root: Path) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("pi0/recorded", root=root, video_backend="pyav")
    frames = []
    for i in range(len(ds)):
        item = ds[i]
        frames.append({
            "index": int(item["index"]), "episode_index": int(item["episode_index"]), "task": item["task"],
            "action": item["action"].tolist(), "observation.state": item["observation.state"].tolist(),
            "intervention": bool(item["intervention"].reshape(-1)[0]), "next.done": bool(item["next.done"].reshape(-1)[0]),
            "next.success": bool(item["next.success"].reshape(-1)[0]), "chunk_index": int(item["chunk_index"].reshape(-1)[0]),
            "latency_s": float(item["latency_s"].reshape(-1)[0]),
            "image_mean": float(item["observation.images.top"].mean()) * 255.0,
        })
    return {"num_episodes": ds.num_episodes, "num_frames": len(ds), "frames": frames}


def main() -> None:
    from tests.data.recording import killed_recording, record

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        record(tmp / "recorded", 3)
        record(tmp / "recorded", 2, start=3)  # a second session appends
        out["appended"] = lerobot_read(tmp / "recorded")
        killed_recording(tmp / "killed")
        out["killed"] = lerobot_read(tmp / "killed")
    import lerobot

    out["versions"] = {"lerobot": lerobot.__version__, "numpy": np.__version__}
    dst = ROOT / "tests" / "fixtures" / "record"
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "lerobot_read.json").write_text(json.dumps(out, indent=1))
    print(f"{dst / 'lerobot_read.json'}: appended {out['appended']['num_episodes']} episodes, "
          f"killed {out['killed']['num_episodes']}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
