"""LeRobot v3 datasets: what LeRobot 0.6.1 wrote (tests/fixtures/datasets/, tools/make_dataset_fixtures.py)
reads as LeRobot's own loader reads it; what pi0 writes reads back; damaged datasets are named."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

pytest.importorskip("pyarrow")
pytest.importorskip("av")

from pi0.data.dataset import DatasetError, LeRobotDataset
from pi0.data.writer import LeRobotDatasetWriter  # noqa: E402

ROOT = Path(__file__).parents[1] / "fixtures" / "datasets"
FIELDS = ("observation.state", "action", "action_is_pad", "index", "episode_index", "frame_index", "timestamp",
          "task_index")


@pytest.mark.parametrize("name", ["videos", "images"])
def test_reads_what_lerobot_wrote_as_lerobot_reads_it(name):
    with safe_open(str(ROOT / f"{name}_expected.safetensors"), "np") as h:
        meta, want = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    ds = LeRobotDataset(ROOT / name, action_horizon=int(meta["horizon"]))
    tasks = json.loads(meta["tasks"])
    assert len(ds) == int(meta["length"]) == 24 and ds.num_episodes == 3 and ds.fps == 10
    assert ds.camera_keys == ["observation.images.front", "observation.images.wrist"]
    assert sum(it for it in (ds[i]["action_is_pad"].sum() for i in range(len(ds)))) == 3 * (1 + 2 + 3)
    for i in range(len(ds)):
        item = ds[i]
        assert item["task"] == tasks[i]
        for k in FIELDS:
            assert np.array_equal(np.asarray(item[k]), want[f"{i}/{k}"]), (i, k)
        for k in ds.camera_keys:
            got, exp = item[k], want[f"{i}/{k}"]
            assert got.dtype == np.uint8 and got.shape == exp.shape
            if exp.dtype == np.uint8:  # decoded video frames: the same AV1 decode, bit for bit
                assert np.array_equal(got, exp), (i, k)
            else:  # PNG images LeRobot returns as float in [0, 1]
                assert np.array_equal(got / np.float32(255), exp), (i, k)


def test_stats_and_metadata():
    ds = LeRobotDataset(ROOT / "videos", action_horizon=None)
    raw = json.loads((ROOT / "videos" / "meta" / "stats.json").read_text())
    assert np.allclose(ds.stats["observation.state"]["q99"], raw["observation.state"]["q99"])
    assert ds.stats["observation.images.front"]["mean"].shape == (3, 1, 1)
    assert ds.shape("observation.images.front") == (24, 32, 3)
    assert ds.tasks == ["pick up the cube", "open the drawer"]
    assert ds[3]["action"].shape == (6,) and "action_is_pad" not in ds[3]


def _episode(rng, n, h=32, w=48):
    y, x = np.mgrid[0:h, 0:w]
    video = np.stack([np.stack([(x * 5 + i * 9) % 256, (y * 7 + i * 3) % 256, np.full_like(x, 30 * i % 256)], -1)
                      for i in range(n)]).astype(np.uint8)
    return {"observation.images.cam": video, "observation.state": rng.normal(size=(n, 4)).astype(np.float32),
            "action": rng.normal(size=(n, 3)).astype(np.float32)}


def test_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    feats = {"observation.images.cam": {"dtype": "video", "shape": (32, 48, 3), "names": ["height", "width", "channels"]},
             "observation.state": {"dtype": "float32", "shape": (4,), "names": None},
             "action": {"dtype": "float32", "shape": (3,), "names": None}}
    w = LeRobotDatasetWriter(tmp_path / "ds", fps=20, features=feats, robot_type="sim")
    eps = [_episode(rng, n) for n in (9, 4, 13)]
    for e, task in zip(eps, ["open the drawer", "close the drawer", "open the drawer"]):
        w.add_episode(e, task)
    w.finalize()
    ds = LeRobotDataset(tmp_path / "ds", action_horizon=5)
    assert len(ds) == 26 and ds.num_episodes == 3 and ds.tasks == ["open the drawer", "close the drawer"]
    assert ds.info["features"]["observation.images.cam"]["info"]["video.codec"] == "av1"
    flat = {k: np.concatenate([e[k] for e in eps]) for k in eps[0]}
    for i in range(len(ds)):
        item = ds[i]
        assert np.array_equal(item["observation.state"], flat["observation.state"][i])
        frame = flat["observation.images.cam"][i].transpose(2, 0, 1).astype(int)
        assert np.abs(item["observation.images.cam"].astype(int) - frame).mean() < 12  # lossy AV1 at CRF 30
    last_of_first = ds[8]  # the first episode's last frame: 4 of 5 actions are padding, repeating its action
    assert last_of_first["action_is_pad"].tolist() == [False, True, True, True, True]
    assert np.array_equal(last_of_first["action"], np.repeat(flat["action"][8:9], 5, 0))
    assert ds[9]["task"] == "close the drawer" and ds[9]["frame_index"] == 0
    assert np.allclose(ds.stats["action"]["mean"], flat["action"].mean(0))
    with pytest.raises(DatasetError, match="already holds a dataset"):
        LeRobotDatasetWriter(tmp_path / "ds", fps=20, features=feats)


def test_damaged_datasets_are_named(tmp_path):
    with pytest.raises(DatasetError, match="no LeRobot dataset"):
        LeRobotDataset(tmp_path / "nothing")
    d = tmp_path / "v2"
    shutil.copytree(ROOT / "videos", d)
    info = json.loads((d / "meta" / "info.json").read_text())
    (d / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    with pytest.raises(DatasetError, match="v2.1"):
        LeRobotDataset(d)
    d = tmp_path / "cut"
    shutil.copytree(ROOT / "videos", d)
    mp4 = d / "videos" / "observation.images.wrist" / "chunk-000" / "file-000.mp4"
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    ds = LeRobotDataset(d, action_horizon=2)
    with pytest.raises(DatasetError, match=r"wrist/chunk-000/file-000.mp4: episode \d+: "):
        for i in range(len(ds)):
            ds[i]
    d = tmp_path / "notask"
    shutil.copytree(ROOT / "images", d)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"task_index": pa.array([0], pa.int64()), "task": ["pick up the cube"]}),
                   str(d / "meta" / "tasks.parquet"))
    ds = LeRobotDataset(d)
    with pytest.raises(DatasetError, match="names task 1"):
        ds[10]
