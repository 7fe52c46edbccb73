"""Recording episodes as they happen: the frames, actions and flags read back as recorded, writing never blocks the
loop (a full queue drops and counts), a killed process loses only the episode in progress and leaves a readable
dataset, and a restart appends."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("av")

from pi0.data.dataset import DatasetError, LeRobotDataset  # noqa: E402
from pi0.data.recorder import Recorder  # noqa: E402

SIZE = 16
FEATURES = {
    "observation.images.top": {"dtype": "video", "shape": (SIZE, SIZE, 3), "names": ["height", "width", "channels"]},
    "observation.state": {"dtype": "float32", "shape": (4,), "names": None},
    "action": {"dtype": "float32", "shape": (4,), "names": None},
}


def frame(e: int, i: int) -> dict:
    """Frame i of episode e: a flat image (its shade encodes the frame), a state and an action that encode both."""
    return {"observation.images.top": np.full((SIZE, SIZE, 3), 10 * i + 40 * e, np.uint8),
            "observation.state": np.array([e, i, 0.5, -1], np.float32),
            "action": np.array([i, -e, 0.25, 1], np.float32)}


def record(root, episodes, frames=5, start=0, **kw) -> dict:
    rec = Recorder(root, fps=10, features=FEATURES, robot_type="test", info={"source": "test"}, **kw)
    for e in range(start, start + episodes):
        for i in range(frames):
            rec.add(frame(e, i), f"task {e % 2}", intervention=i == 2, chunk_index=i // 2, latency_s=0.01 * i)
        rec.end_episode(success=e % 2 == 0)
    return rec.close()


def test_recorded_episodes_read_back(tmp_path):
    r = record(tmp_path / "ds", 3)
    assert r["episodes"] == 3 and r["dropped_episodes"] == 0
    ds = LeRobotDataset(tmp_path / "ds")
    assert ds.num_episodes == 3 and len(ds) == 15 and ds.tasks == ["task 0", "task 1"]
    for index in range(15):
        e, i = divmod(index, 5)
        item = ds[index]
        want = frame(e, i)
        assert np.array_equal(item["action"], want["action"]) and np.array_equal(item["observation.state"],
                                                                                want["observation.state"])
        assert abs(float(item["observation.images.top"].mean()) - 10 * i - 40 * e) < 3  # AV1, lossy
        assert bool(item["intervention"][0]) == (i == 2) and int(item["chunk_index"][0]) == i // 2
        assert bool(item["next.done"][0]) == (i == 4)
        assert bool(item["next.success"][0]) == (i == 4 and e % 2 == 0)  # only where it happened
        assert item["task"] == f"task {e % 2}"
    info = json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())
    assert info["pi0_record"] == [{"source": "test"}] and info["total_episodes"] == 3


def test_a_restart_appends(tmp_path):
    record(tmp_path / "ds", 2)
    r = record(tmp_path / "ds", 2, start=2)
    assert r["episodes"] == 2 and r["total_episodes"] == 4
    ds = LeRobotDataset(tmp_path / "ds")
    assert ds.num_episodes == 4 and len(ds) == 20
    assert np.array_equal(ds[17]["action"], frame(3, 2)["action"])
    assert json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())["pi0_record"] == [{"source": "test"}] * 2
    stats = json.loads((tmp_path / "ds" / "meta" / "stats.json").read_text())
    assert stats["action"]["count"] == [20] and stats["observation.images.top"]["count"][0] > 0
    with pytest.raises(DatasetError, match="other features"):
        Recorder(tmp_path / "ds", fps=10, features={**FEATURES, "extra": FEATURES["action"]})


def test_a_full_queue_drops_episodes_and_never_waits(tmp_path, monkeypatch):
    """A writer that takes a second per episode, and a loop that ends an episode every millisecond: the loop never
    waits, the episodes beyond the queue are dropped and counted, the queued ones are written."""
    from pi0.data.writer import LeRobotDatasetWriter

    slow = LeRobotDatasetWriter.add_episode

    def add_episode(self, frames, task):
        time.sleep(1.0)
        return slow(self, frames, task)

    monkeypatch.setattr(LeRobotDatasetWriter, "add_episode", add_episode)
    rec = Recorder(tmp_path / "ds", fps=10, features=FEATURES, max_queue=2)
    t0 = time.perf_counter()
    for e in range(6):
        rec.add(frame(e, 0), "task")
        rec.end_episode()
    assert time.perf_counter() - t0 < 0.5  # six episodes ended without waiting for a one-second writer
    r = rec.close()
    assert r["dropped_episodes"] >= 3 and r["episodes"] + r["dropped_episodes"] == 6 and r["dropped_frames"] >= 3
    assert LeRobotDataset(tmp_path / "ds").num_episodes == r["episodes"]


def test_a_killed_recorder_loses_only_the_episode_in_progress(tmp_path):
    """SIGKILL while the third episode is being written: the two before it read back, the third's files are gone
    after a restart, which appends."""
    root = tmp_path / "ds"
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        from pi0.data.writer import LeRobotDatasetWriter
        from tests.data.test_recorder import record
        add, calls = LeRobotDatasetWriter.add_episode, []

        def add_episode(self, frames, task):  # dies in the middle of the third episode's files
            calls.append(1)
            if len(calls) == 3:
                real = self.write_meta
                self.write_meta = lambda: os.kill(os.getpid(), signal.SIGKILL)
            return add(self, frames, task)

        LeRobotDatasetWriter.add_episode = add_episode
        record({str(root)!r}, 4)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert list((root / "data").rglob("*.parquet"))  # the killed episode's files are there, meta/ does not list them
    ds = LeRobotDataset(root)
    assert ds.num_episodes == 2 and len(ds) == 10
    record(root, 1, start=9)  # a restart: the killed episode's files removed, the new one appended
    ds = LeRobotDataset(root)
    assert ds.num_episodes == 3 and np.array_equal(ds[12]["action"], frame(9, 2)["action"])
    assert len(list((root / "data").rglob("*.parquet"))) == 3
