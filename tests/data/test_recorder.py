"""Recording episodes as they happen: the frames, actions and flags read back as recorded, writing never blocks the
loop (a full queue drops and counts), a killed process loses only the episode in progress and leaves a readable
dataset, and a restart appends."""

import json
import time

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("av")

from pi0.data.dataset import DatasetError, LeRobotDataset  # noqa: E402
from pi0.data.recorder import Recorder  # noqa: E402
from tests.data.recording import FEATURES, frame, killed_recording, record  # noqa: E402

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
        assert bool(item["intervention"]) == (i == 2) and int(item["chunk_index"]) == i // 2
        assert bool(item["next.done"]) == (i == 4)
        assert bool(item["next.success"]) == (i == 4 and e % 2 == 0)  # only where it happened
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
    """SIGKILL while the third episode's files are written: the two before it read back, the third's partial files
    are ignored, and a restart removes them and appends."""
    root = tmp_path / "ds"
    killed_recording(root)
    assert list((root / "data").rglob("*.partial"))  # what the killed process was writing
    ds = LeRobotDataset(root)
    assert ds.num_episodes == 2 and len(ds) == 10
    record(root, 1, start=9)  # a restart: the partial files removed, the new episode appended
    ds = LeRobotDataset(root)
    assert ds.num_episodes == 3 and np.array_equal(ds[12]["action"], frame(9, 2)["action"])
    assert not list(root.rglob("*.partial")) and len(list((root / "data").rglob("*.parquet"))) == 3


def test_frames_of_an_unlisted_episode_are_not_read(tmp_path):
    """Killed between an episode's last rename and the meta/ that lists it: its frames are in the data files but not
    in meta/, and the reader keeps to meta/."""
    root = tmp_path / "ds"
    record(root, 2)
    meta = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    kept = meta.read_bytes()
    record(root, 1, start=2)
    meta.write_bytes(kept)  # meta/ of two episodes beside the data of three
    ds = LeRobotDataset(root)
    assert ds.num_episodes == 2 and len(ds) == 10


def test_lerobot_reads_what_pi0_records(tmp_path):
    """LeRobot 0.6.1's loader read the same recordings (tools/make_record_fixtures.py: three episodes, two appended by
    a second session; a session killed while writing its third episode): every frame's features and flags as pi0
    reads them, the images to AV1's accuracy."""
    from pathlib import Path

    theirs = json.loads((Path(__file__).parents[1] / "fixtures" / "record" / "lerobot_read.json").read_text())
    record(tmp_path / "appended", 3)
    record(tmp_path / "appended", 2, start=3)
    killed_recording(tmp_path / "killed")
    for name in ("appended", "killed"):
        ds, want = LeRobotDataset(tmp_path / name), theirs[name]
        assert (ds.num_episodes, len(ds)) == (want["num_episodes"], want["num_frames"])
        for f in want["frames"]:
            item = ds[f["index"]]
            assert item["task"] == f["task"] and int(item["episode_index"]) == f["episode_index"]
            for key in ("action", "observation.state"):
                assert np.allclose(item[key], f[key], atol=1e-6), (name, f["index"], key)
            for key in ("intervention", "next.done", "next.success", "chunk_index"):
                assert int(item[key]) == int(f[key]), (name, f["index"], key)
            assert abs(float(item["latency_s"]) - f["latency_s"]) < 1e-6
            assert abs(float(item["observation.images.top"].mean()) - f["image_mean"]) < 1.0  # both decode AV1
